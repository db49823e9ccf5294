"""Language models: tokenizers, token data, Hugging Face causal LMs and their distillation."""
