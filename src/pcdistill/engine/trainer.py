"""The training loop: one function, read top to bottom.

``train(cfg, out_dir)`` trains a teacher (plain cross-entropy) or distills a student, in one process
or under ``torchrun`` (DDP), and leaves a run folder:

    config.yaml            the resolved configuration
    metrics.jsonl          one JSON object per epoch (epoch, step, train_loss, val_acc, test_acc, lr, seconds, ...)
    tensorboard/           TensorBoard event files
    checkpoints/last.pt    written atomically at every epoch end (and every ``checkpoint_every`` steps)
    model.safetensors      the trained network

``train(resume=True)`` continues a killed run from ``checkpoints/last.pt``, with the config stored in
that checkpoint; on the CPU the result is bitwise identical to an uninterrupted run (data order and
augmentation are functions of (seed, epoch, rank); model, optimizer, schedule and RNG states are
restored). ``overrides`` may change the keys of :data:`pcdistill.config.RESUMABLE`, e.g.
``trainer.epochs`` to extend a finished run or ``optim.lr`` after a non-finite loss.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pcdistill import __version__
from pcdistill.config import Config, ConfigError, from_dict, resolve_paths, resume_config, save_config, to_dict
from pcdistill.engine import distributed
from pcdistill.engine.checkpoint import export_weights, load_checkpoint, save_checkpoint
from pcdistill.engine.records import RunRecords, read_metrics
from pcdistill.tasks import build_task, format_metric


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left as it was."""


@dataclass
class Summary:
    out_dir: Path
    headline: str
    final: dict[str, float]  # metrics of the last epoch, e.g. {"test_acc": ..., "val_acc": ...}
    best: dict[str, float]  # best over epochs, for reference only (never used for choices)
    epochs: int
    seconds: float
    student: nn.Module | None = None  # the trained network of this process (each DDP rank holds its copy)


# ----------------------------------------------------------------------------------------------
# Pieces the loop uses
# ----------------------------------------------------------------------------------------------
def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)


def lr_factor(cfg: Config, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    s = cfg.schedule
    per_unit = steps_per_epoch if s.unit == "epoch" else 1
    warmup = s.warmup * per_unit
    if warmup and step < warmup:
        return (step + 1) / warmup
    if s.name == "multistep":
        return s.gamma ** sum(step >= m * per_unit for m in s.milestones)
    if s.name == "cosine":
        floor = s.min_lr / cfg.optim.lr
        t = (step - warmup) / max(total_steps - warmup, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return 1.0


def autocast(cfg: Config, device: torch.device):
    if cfg.trainer.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.trainer.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_environment(cfg: Config, ctx: distributed.Context) -> None:
    if cfg.trainer.amp == "fp16" and ctx.device.type != "cuda":
        raise ConfigError("trainer.amp=fp16 needs CUDA (it relies on a GradScaler); on the CPU use bf16 or none")
    if cfg.trainer.sync_bn and ctx.device.type != "cuda":
        raise ConfigError("trainer.sync_bn needs CUDA (SyncBatchNorm has no CPU implementation); set it to false")


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def train(cfg: Config | None, out_dir: str | Path, *, resume: bool = False, overrides: list[str] = ()) -> Summary:
    """Train from ``cfg`` into ``out_dir``, or with ``resume=True`` continue the run in ``out_dir`` with the
    config of its checkpoint, changed by ``overrides`` (``key=value``; only resumable keys)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is a file; the run folder must be a folder to create "
                          f"(or an existing run to --resume)")
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    checkpoint = None
    if resume:
        if not out_dir.is_dir():
            raise ConfigError(f"--resume {str(out_dir)!r}: no such run folder (expected a folder holding "
                              f"checkpoints/last.pt, written by `pcdistill train ... --out DIR`)")
        checkpoint = load_checkpoint(ckpt_path)
        cfg, changed = resume_config(checkpoint["config"], list(overrides))
        cfg, newly_given = resolve_paths(cfg)
        given = {k: v for k, v in checkpoint.get("paths_given", {}).items() if k not in changed} | newly_given
        note = f"resuming {out_dir} after epoch {checkpoint['epoch']} (step {checkpoint['step']}) with the config " \
               f"stored in {ckpt_path}" + "".join(f"; {k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
    else:
        if overrides:
            raise ConfigError("train(overrides=...) applies to resume=True; apply them to the config instead")
        if ckpt_path.exists():
            raise ConfigError(f"{str(out_dir)!r} already holds a run; continue it with `pcdistill train --resume "
                              f"{out_dir}` (extend it with e.g. trainer.epochs=N) or choose another --out folder")
        assert cfg is not None
        cfg, given = resolve_paths(cfg)
        note = ""
    ctx = distributed.setup(cfg.trainer.device)
    try:
        if note and ctx.is_main:
            print(note)
        return _train(cfg, out_dir, ctx, checkpoint, given)
    finally:
        distributed.teardown(ctx)


def _train(cfg: Config, out_dir: Path, ctx: distributed.Context, checkpoint: dict | None,
           given: dict[str, str]) -> Summary:
    check_environment(cfg, ctx)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.trainer.seed)  # same initial weights on every rank
    task = build_task(cfg, ctx)
    student, module = task.student, task.module
    if cfg.trainer.sync_bn:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.preserve_format
    module.to(ctx.device, memory_format=memory_format)
    optimizer = make_optimizer(cfg, [p for p in student.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.trainer.amp == "fp16")

    steps_per_epoch = len(task.train_loader)
    total_steps = cfg.trainer.iterations or cfg.trainer.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, total_steps))

    start_epoch, start_batch, step, partial = 0, 0, 0, None
    if checkpoint is not None:
        student.load_state_dict(checkpoint["student"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["scaler"]:  # empty when saved without fp16, e.g. before a resume switched amp on
            scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"], ctx.device)
        start_epoch, start_batch, step = checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]
        partial = checkpoint.get("partial")
        # the saved schedule holds the old base lr; a resume may have changed optim.lr (or the run's length)
        scheduler.base_lrs = [cfg.optim.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.optim.lr
            group["lr"] = cfg.optim.lr * lr_factor(cfg, step, steps_per_epoch, total_steps)
    if step >= total_steps:
        if ctx.is_main:
            print(f"the run in {out_dir} already finished ({epochs} epochs, {step} steps); extend it with "
                  f"`pcdistill train --resume {out_dir} trainer.epochs=N` (N > {epochs})")
        return _summary(out_dir, task, 0.0, student)

    train_module = module
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    if cfg.trainer.compile:
        train_module = torch.compile(train_module)
        eval_net = torch.compile(student)
    else:
        eval_net = student

    records = RunRecords(out_dir, enabled=ctx.is_main, purge_step=step if checkpoint is not None else None)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml", given)
        records.truncate(start_epoch)
    # (epoch, step) that checkpoints/last.pt holds, for the message after a non-finite loss
    saved_at = (checkpoint["epoch"], checkpoint["step"]) if checkpoint is not None else None

    def save(epoch: int, batch: int, partial_sums) -> None:
        nonlocal saved_at
        if ctx.is_main:
            save_checkpoint({
                "config": to_dict(cfg), "epoch": epoch, "batch": batch, "step": step, "partial": partial_sums,
                "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(ctx.device),
                "pcdistill": __version__, "paths_given": given,
            }, out_dir / "checkpoints" / "last.pt")
        saved_at = (epoch, step)
        distributed.barrier(ctx)

    run_start = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        epoch_start = time.perf_counter()
        first = start_batch if epoch == start_epoch else 0
        steps_this_epoch = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        task.train_loader.set_epoch(epoch, start_batch=first)
        # loss sums of this epoch on this rank: {name: sum over steps}, plus the step count
        sums = dict(partial["sums"]) if partial and epoch == start_epoch else {}
        count = partial["count"] if partial and epoch == start_epoch else 0
        partial = None
        module.train()
        bar = tqdm(total=steps_this_epoch, initial=first, desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not ctx.is_main, leave=False, dynamic_ncols=True)
        for batch, (inputs, targets) in enumerate(task.train_loader, start=first):
            if batch >= steps_this_epoch:
                break
            if cfg.trainer.channels_last and isinstance(inputs, torch.Tensor):
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(cfg, ctx.device):
                # epochs done, counted continuously: 1.0 at the end of the first epoch, as in mdistiller's warmup
                _, losses = train_module(inputs, targets, epoch=epoch + (batch + 1) / steps_per_epoch,
                                         progress=step / total_steps)
            loss = sum(losses.values())
            if not torch.isfinite(loss).item():
                bar.close()  # clear the bar now, not after the error is printed
                raise NonFiniteLossError(_non_finite_message(cfg, out_dir, losses, epoch, batch, steps_this_epoch,
                                                             step, saved_at))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.clip_grad_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            count += 1
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.item()
            sums["total"] = sums.get("total", 0.0) + loss.item()
            bar.update(1)
            # every log_every steps, and at each epoch end so that short runs have curves too
            if ctx.is_main and (step % cfg.trainer.log_every == 0 or batch + 1 == steps_this_epoch):
                bar.set_postfix(loss=f"{sums['total'] / count:.4f}")
                records.scalars(step, {f"train/{k}": v.item() for k, v in losses.items()}
                                | {"train/loss": loss.item(), "train/lr": optimizer.param_groups[0]["lr"]})
            if cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0 \
                    and batch + 1 < steps_this_epoch:
                save(epoch, batch + 1, {"sums": dict(sums), "count": count})
        bar.close()

        # epoch end: reduce the training losses over ranks, evaluate, record, checkpoint
        names = sorted(sums)
        reduced = distributed.all_reduce_sum(
            torch.tensor([sums[n] for n in names] + [count], dtype=torch.float64, device=ctx.device), ctx)
        mean = {n: (reduced[i] / reduced[-1]).item() for i, n in enumerate(names)}
        record = {"epoch": epoch + 1, "step": step, "train_loss": mean.pop("total")}
        record |= {f"train_{n}": v for n, v in mean.items()}
        module.eval()
        if (epoch + 1) % cfg.trainer.eval_every == 0 or epoch + 1 == epochs:
            with torch.no_grad(), autocast(cfg, ctx.device):
                for split, loader in task.eval_loaders.items():
                    for metric, value in task.evaluate(eval_net, loader).items():
                        record[f"{split}_{metric}"] = value
        record |= {"lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - epoch_start,
                   "world_size": ctx.world_size}
        records.epoch(record)
        save(epoch + 1, 0, None)
        if ctx.is_main:
            shown = ", ".join(f"{k} {format_metric(k, record[k])}" for k in record
                              if k.startswith(("val_", "test_")) and isinstance(record[k], float))
            tqdm.write(f"epoch {epoch + 1}/{epochs}: train_loss {record['train_loss']:.4f}, {shown}")

    if ctx.is_main:
        export_weights(student, out_dir / "model.safetensors", task.metadata | {"pcdistill": __version__})
        if task.export is not None:
            task.export(student, out_dir)
    records.close()
    distributed.barrier(ctx)
    return _summary(out_dir, task, time.perf_counter() - run_start, student)


def _non_finite_message(cfg: Config, out_dir: Path, losses: dict, epoch: int, batch: int, steps_this_epoch: int,
                        step: int, saved_at: tuple[int, int] | None) -> str:
    values = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
    lower = f"optim.lr={cfg.optim.lr / 10:g}"
    amp = " or trainer.amp=none" if cfg.trainer.amp != "none" else ""
    where = (f"non-finite loss at epoch {epoch + 1}, step {batch + 1} of {steps_this_epoch} (global step {step + 1}): "
             f"{values}. The run stopped.")
    if saved_at is None:
        return (f"{where} No checkpoint was written yet, so there is nothing to resume: run the same command "
                f"again (the same --out is accepted while it holds no checkpoint) with a lower learning rate "
                f"({lower}){amp}.")
    return (f"{where} {out_dir / 'checkpoints' / 'last.pt'} holds the state after epoch {saved_at[0]} "
            f"(step {saved_at[1]}); continue from there with `pcdistill train --resume {out_dir} {lower}`{amp}.")


def evaluate_weights(cfg: Config, weights: str | Path | None, splits=("val", "test")) -> dict[str, dict[str, float]]:
    """Metrics of the network in ``weights`` (built as ``cfg.model``; None: ``cfg.model`` as it loads itself,
    e.g. a causal LM folder in ``model.weights``) on the requested splits."""
    from pcdistill.models.weights import load_weights
    eval_cfg = from_dict(to_dict(cfg) | {"distill": {}, "teacher": {}})
    if weights is not None:
        eval_cfg.model.weights = None  # ``weights`` replaces any initial weights
    ctx = distributed.setup(eval_cfg.trainer.device)
    try:
        task = build_task(eval_cfg, ctx)
        try:
            if weights is not None:
                load_weights(task.student, weights)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from None
        task.student.to(ctx.device).eval()
        results = {}
        with torch.no_grad(), autocast(eval_cfg, ctx.device):
            for split in splits:
                if split in task.eval_loaders:
                    results[split] = task.evaluate(task.student, task.eval_loaders[split])
        return results
    finally:
        distributed.teardown(ctx)


def _summary(out_dir: Path, task, seconds: float, student: nn.Module | None = None) -> Summary:
    rows = read_metrics(out_dir)
    final = {k: v for k, v in (rows[-1] if rows else {}).items() if k.startswith(("val_", "test_"))}
    best = {}
    for key in final:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            best[key] = min(values) if key.split("_", 1)[1] in task.lower_is_better else max(values)
    return Summary(out_dir, task.headline, final, best, len(rows), seconds, student)


def format_summary(summary: Summary) -> str:
    key = f"test_{summary.headline}"
    epochs = f"{summary.epochs} epoch{'s' if summary.epochs != 1 else ''}"
    lines = [f"run: {summary.out_dir}  ({epochs}, {summary.seconds:.1f} s)"]
    if key in summary.final:
        lines.append(f"final-epoch {key}: {format_metric(key, summary.final[key])}")
        val = f"val_{summary.headline}"
        if val in summary.final:
            lines.append(f"final-epoch {val}: {format_metric(val, summary.final[val])}")
        lines.append(f"best {key} over epochs (for reference only; not used for any choice): "
                     f"{format_metric(key, summary.best.get(key, float('nan')))}")
    return "\n".join(lines)
