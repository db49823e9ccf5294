"""``transformers.Trainer`` with a frozen teacher and a pcdistill loss on every next-token prediction.

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                                  train_dataset=data, loss="pcd", loss_options={"temperature": 2.0})
    trainer.train()

Everything else is the user's ``TrainingArguments``: bf16 (the fused output-layer loss runs under the
model's autocast), gradient accumulation, DDP/FSDP through torchrun or accelerate, checkpoints and resume,
``report_to``. The teacher is not part of the trained model: it is never saved in a checkpoint and never
seen by the optimizer.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer

from pcdistill.lm.distill import CausalLMDistiller


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss is ``ce_weight * CE + alpha * <loss>(student, teacher_model)``.

    Batches hold ``input_ids``, ``labels`` (shifted inside, -100 ignored) and optionally
    ``attention_mask``. With ``num_items_in_batch`` (the Trainer passes it for models whose forward
    takes ``**kwargs``: Llama, Qwen2, GPT-2, ...) the token losses are summed and divided by it, so
    gradient accumulation gives the gradient of the whole accumulated batch, as the model's own loss
    does; it counts ``labels[:, 1:] != -100``, so give padding the label -100 (the Hugging Face
    collators do). The parts are logged as ``ce_loss`` and ``<loss>_loss`` next to ``loss``. PCD's
    curriculum schedule gets ``progress = global_step / max_steps``.
    """

    def __init__(self, *args, teacher_model: nn.Module, loss: str = "pcd", loss_options: dict | None = None,
                 alpha: float = 1.0, ce_weight: float = 1.0, fused: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        teacher_model.to(self.args.device)  # dtype and autocast (bf16) are TrainingArguments' business
        self.distiller = CausalLMDistiller(self.model, teacher_model, loss=loss, loss_options=loss_options,
                                           alpha=alpha, ce_weight=ce_weight, fused=fused,
                                           part_gradients=False)  # compute_loss only sums the entries
        self._parts: dict[str, torch.Tensor] = {}
        self._parts_from_step: int | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        state = self.state
        progress = state.global_step / state.max_steps if state.max_steps else 0.0
        # the fused output layer runs outside the model's forward: under the same mixed precision as the forward
        with self.accelerator.autocast():
            losses = self.distiller.losses(model, inputs["input_ids"], inputs["labels"],
                                           attention_mask=inputs.get("attention_mask"), progress=progress,
                                           num_items=num_items_in_batch)
        # normalized by the accumulated batch's token count: the Trainer must not divide by the steps again
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        scale = 1.0
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # the count is global, DDP averages gradients over processes: as Trainer.compute_loss does
            scale = self.accelerator.num_processes // self.get_tp_size()
            scale = scale if self.args.n_gpu <= 1 else self.args.n_gpu
        loss = sum(losses.values()) * scale
        if model.training:
            steps = 1 if self.loss_is_scaled_for_ga else self.current_gradient_accumulation_steps
            self._record(losses, scale / steps)  # each part as it enters the logged loss
        return (loss, {"loss": loss}) if return_outputs else loss

    def _record(self, losses: dict[str, torch.Tensor], scale: float) -> None:
        """Sum the parts on the device (no sync); :meth:`log` averages them per optimizer step."""
        if self._parts_from_step is None:
            self._parts_from_step = self.state.global_step
        for name, value in losses.items():
            self._parts[name] = self._parts.get(name, 0) + value.detach() * scale

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts:
            steps = max(self.state.global_step - self._parts_from_step, 1)
            for name, value in self._parts.items():
                logs[f"{name}_loss"] = self.accelerator.gather(value).mean().item() / steps  # at log time only
            self._parts, self._parts_from_step = {}, None
        super().log(logs, start_time)
