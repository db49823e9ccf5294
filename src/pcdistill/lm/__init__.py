"""Language models: Hugging Face causal LMs, their data and their distillation."""
