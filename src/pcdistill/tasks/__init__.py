"""Tasks: what the trainer trains, built from a config by name (``cfg.task``).

    from pcdistill.tasks import build_task, list_tasks
    task = build_task(cfg, ctx)      # a pcdistill.tasks.base.Task for the trainer

Each task is a module with ``build(cfg, ctx) -> Task``, imported only when used, so the vision path never
imports a language-model library (and classification never imports pycocotools).
"""
from __future__ import annotations

import importlib

from pcdistill.registry import Registry
from pcdistill.tasks.base import Task

TASKS: Registry[str] = Registry("task")
TASKS.register("classification")("pcdistill.tasks.classification")
TASKS.register("detection")("pcdistill.tasks.detection")
TASKS.register("causal_lm")("pcdistill.tasks.causal_lm")


PERCENT = ("acc", "top5", "agree", "AP", "AP50", "AP75", "APs", "APm", "APl")  # metrics reported in % (0-100)


def format_metric(name: str, value: float) -> str:
    """``97.50%`` for a metric in percent (accuracy, COCO AP, agreement), ``3.14`` otherwise (ppl, kl)."""
    return f"{value:.2f}{'%' if name.split('_', 1)[-1] in PERCENT else ''}"


def list_tasks() -> list[str]:
    return TASKS.names()


def build_task(cfg, ctx) -> Task:
    """The :class:`Task` of ``cfg.task`` for the process described by ``ctx`` (a ``distributed.Context``)."""
    return importlib.import_module(TASKS.get(cfg.task)).build(cfg, ctx)


__all__ = ["TASKS", "Task", "build_task", "format_metric", "list_tasks"]
