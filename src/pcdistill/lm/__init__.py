"""Language-model distillation: tokenizers, token data, causal-LM students and teachers."""
