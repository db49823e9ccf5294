"""Language models: Hugging Face causal LMs, their tokenizers and token data, and their distillation."""
