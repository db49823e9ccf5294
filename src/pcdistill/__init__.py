"""pcdistill: Progressive Class-level Distillation (PCD) and logit-distillation baselines.

    from pcdistill import load_model
    teacher = load_model("runs/digits/teacher")     # a run folder of `pcdistill train`, or its model.safetensors
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    # imported on first use: `import pcdistill` (and `pcdistill --version`) stays free of torch
    if name == "load_model":
        from pcdistill.models.loading import load_model
        return load_model
    raise AttributeError(f"module 'pcdistill' has no attribute {name!r}")
