"""pcdistill: Progressive Class-level Distillation (PCD) and logit-distillation baselines."""
__version__ = "0.1.0"
