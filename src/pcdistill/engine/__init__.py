"""Training engine: the trainer, checkpoints, distributed setup and run records."""
