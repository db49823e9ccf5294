"""Hugging Face integration: :class:`DistillationTrainer`, a ``transformers.Trainer`` that distills a causal LM."""
from .trainer import DistillationTrainer

__all__ = ["DistillationTrainer"]
