"""The training loop, read top to bottom: build and restore a run, then per epoch ``train_one_epoch`` and
``end_of_epoch`` (check and reduce the losses, evaluate, record, checkpoint).

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
``trainer.epochs`` or ``trainer.iterations`` to extend a run or ``optim.lr`` after a non-finite loss.
The position in the data is a function of the optimizer steps done, so a run cut short inside an epoch
(``trainer.iterations``) and extended goes on from where it stopped.

A step leaves its losses on the device; they are read (one host sync) every ``trainer.log_every`` steps,
before each checkpoint and at each epoch's end, where a non-finite loss on any rank stops every rank with
:class:`NonFiniteLossError`. The steps between the bad one and that check are lost with the process: no
checkpoint is written in between.
"""
from __future__ import annotations

import contextlib
import math
import sys
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
from pcdistill.tasks import Task, build_task, format_metric


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss on some rank; every rank raises this at the same step, and the
    last good checkpoint is left as it was."""

    reported = False  # True when rank 0 has printed the message already (under DDP, before any process exited)


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
# The loop, as torchvision's references read: build and restore, train_one_epoch, end_of_epoch
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
        where = f"after epoch {checkpoint['epoch']}" if not checkpoint["batch"] else \
            f"in epoch {checkpoint['epoch'] + 1}, after its batch {checkpoint['batch']}"
        note = f"resuming {out_dir} {where} (step {checkpoint['step']}) with the config stored in {ckpt_path}" + \
            "".join(f"; {k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
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
    except NonFiniteLossError as err:
        if ctx.distributed:  # a launcher stops every process at the first exit: rank 0 says why before any exits
            if ctx.is_main:
                print(f"error: {err}", file=sys.stderr, flush=True)
            distributed.barrier(ctx)
            err.reported = True
        raise
    finally:
        distributed.teardown(ctx)


@dataclass
class Run:
    """One training run: the pieces its phases share, and how far it got."""
    cfg: Config
    ctx: distributed.Context
    out_dir: Path
    given: dict[str, str]  # config paths as typed, for config.yaml's comments
    task: Task
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    total_steps: int
    step: int = 0  # optimizer steps done; the position in the data is divmod(step, steps_per_epoch)
    saved_at: int | None = None  # the step checkpoints/last.pt holds
    train_module: nn.Module | None = None  # task.module as trained: DDP-wrapped and/or compiled
    eval_net: nn.Module | None = None
    records: RunRecords | None = None

    @property
    def student(self) -> nn.Module:
        return self.task.student

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of ``epoch`` (0-based): all its batches, fewer in a last epoch that the run cuts short."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


def _train(cfg: Config, out_dir: Path, ctx: distributed.Context, checkpoint: dict | None,
           given: dict[str, str]) -> Summary:
    run = build_run(cfg, out_dir, ctx, given)
    partial = restore(run, checkpoint) if checkpoint is not None else None
    if run.step >= run.total_steps:
        if ctx.is_main:
            extend = f"trainer.iterations=N` (N > {run.step})" if cfg.trainer.iterations else \
                f"trainer.epochs=N` (N > {run.epochs})"
            print(f"the run in {out_dir} already finished ({run.epochs} epochs, {run.step} steps); extend it with "
                  f"`pcdistill train --resume {out_dir} {extend}")
        return _summary(out_dir, run.task, 0.0, run.student)
    wrap(run)
    start_epoch, start_batch = divmod(run.step, run.steps_per_epoch)
    run.records = RunRecords(out_dir, enabled=ctx.is_main, purge_step=run.step if checkpoint is not None else None)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml", given)
        run.records.truncate(start_epoch)

    run_start = time.perf_counter()
    try:
        for epoch in range(start_epoch, run.epochs):
            epoch_start = time.perf_counter()
            resumed = epoch == start_epoch
            losses = train_one_epoch(run, epoch, start_batch if resumed else 0, partial if resumed else None)
            end_of_epoch(run, epoch, losses, epoch_start)
    finally:
        run.records.close()

    if ctx.is_main:
        export_weights(run.student, out_dir / "model.safetensors", run.task.metadata | {"pcdistill": __version__})
        if run.task.export is not None:
            run.task.export(run.student, out_dir)
    distributed.barrier(ctx)
    return _summary(out_dir, run.task, time.perf_counter() - run_start, run.student)


def build_run(cfg: Config, out_dir: Path, ctx: distributed.Context, given: dict[str, str]) -> Run:
    """The task (data, models, loss) on its device, the optimizer and the schedule, at step 0."""
    check_environment(cfg, ctx)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.trainer.seed)  # same initial weights on every rank
    task = build_task(cfg, ctx)
    if cfg.trainer.sync_bn:
        task.module = nn.SyncBatchNorm.convert_sync_batchnorm(task.module)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.preserve_format
    task.module.to(ctx.device, memory_format=memory_format)
    optimizer = make_optimizer(cfg, [p for p in task.student.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.trainer.amp == "fp16")
    steps_per_epoch = len(task.train_loader)
    total_steps = cfg.trainer.iterations or cfg.trainer.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, total_steps))
    return Run(cfg, ctx, out_dir, given, task, optimizer, scheduler, scaler, steps_per_epoch, total_steps)


def restore(run: Run, checkpoint: dict) -> dict | None:
    """Load ``checkpoint``'s state into ``run``; returns the loss sums of the epoch it stopped in (None at an
    epoch's end)."""
    run.student.load_state_dict(checkpoint["student"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"]:  # empty when saved without fp16, e.g. before a resume switched amp on
        run.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"], run.ctx.device)
    run.step = run.saved_at = checkpoint["step"]
    # the saved schedule holds the old base lr; a resume may have changed optim.lr (or the run's length)
    lr = run.cfg.optim.lr
    run.scheduler.base_lrs = [lr for _ in run.optimizer.param_groups]
    for group in run.optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * lr_factor(run.cfg, run.step, run.steps_per_epoch, run.total_steps)
    return checkpoint.get("partial")


def wrap(run: Run) -> None:
    """DDP across processes, then ``torch.compile`` if asked for."""
    run.train_module, run.eval_net = run.task.module, run.student
    if run.ctx.distributed:
        device_ids = [run.ctx.device.index] if run.ctx.device.type == "cuda" else None
        run.train_module = nn.parallel.DistributedDataParallel(run.task.module, device_ids=device_ids)
    if run.cfg.trainer.compile:
        run.train_module, run.eval_net = torch.compile(run.train_module), torch.compile(run.student)


def train_one_epoch(run: Run, epoch: int, first_batch: int, partial: dict | None) -> EpochLosses:
    """Steps ``first_batch`` .. of ``epoch``; checks the losses every ``log_every`` steps and before a mid-epoch
    checkpoint (the epoch's end checks the rest)."""
    cfg, ctx = run.cfg, run.ctx
    steps = run.steps_in(epoch)
    losses = EpochLosses(min(cfg.trainer.log_every, steps), ctx.device, partial)
    run.task.train_loader.set_epoch(epoch, start_batch=first_batch)
    run.task.module.train()
    with tqdm(total=steps, initial=first_batch, desc=f"epoch {epoch + 1}/{run.epochs}", disable=not ctx.is_main,
              leave=False, dynamic_ncols=True) as bar:  # closed before an error is printed
        for batch, (inputs, targets) in enumerate(run.task.train_loader, start=first_batch):
            if batch >= steps:
                break
            # epochs done, counted continuously: 1.0 at the end of the first epoch, as in mdistiller's warmup
            losses.add(*train_step(run, inputs, targets, epoch + (batch + 1) / run.steps_per_epoch))
            bar.update(1)
            last = batch + 1 == steps
            log_now = run.step % cfg.trainer.log_every == 0 and not last
            save_now = bool(cfg.trainer.checkpoint_every) and run.step % cfg.trainer.checkpoint_every == 0 \
                and not last
            if log_now or save_now:
                check_finite(run, losses)
            if log_now:
                log_step(run, losses, bar)
            if save_now:
                save(run, losses.partial())
    return losses


def train_step(run: Run, inputs, targets, epochs_done: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step; returns the step's named losses and their sum, left on the device."""
    cfg = run.cfg
    if cfg.trainer.channels_last and isinstance(inputs, torch.Tensor):
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with autocast(cfg, run.ctx.device):
        _, losses = run.train_module(inputs, targets, epoch=epochs_done, progress=run.step / run.total_steps)
    loss = sum(losses.values())
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if cfg.optim.clip_grad_norm:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.student.parameters(), cfg.optim.clip_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.step += 1
    return losses, loss


def end_of_epoch(run: Run, epoch: int, losses: EpochLosses, epoch_start: float) -> None:
    """Check and reduce the epoch's training losses over ranks, evaluate, record, checkpoint."""
    cfg, ctx = run.cfg, run.ctx
    check_finite(run, losses)
    log_step(run, losses)  # at each epoch end too, so that short runs have curves
    record = {"epoch": epoch + 1, "step": run.step} | losses.means_over_ranks(ctx)
    run.task.module.eval()
    if (epoch + 1) % cfg.trainer.eval_every == 0 or epoch + 1 == run.epochs:
        cuda = [ctx.device] if ctx.device.type == "cuda" else []
        # evaluating leaves the training RNG alone: a run cut short here and extended equals an uninterrupted one
        with torch.no_grad(), autocast(cfg, ctx.device), torch.random.fork_rng(cuda):
            for split, loader in run.task.eval_loaders.items():
                for metric, value in run.task.evaluate(run.eval_net, loader).items():
                    record[f"{split}_{metric}"] = value
    record |= {"lr": run.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - epoch_start,
               "world_size": ctx.world_size}
    run.records.epoch(record)
    # an epoch the run cuts short is saved as a position inside it, so that extending the run finishes it
    save(run, losses.partial() if run.step % run.steps_per_epoch else None)
    if ctx.is_main:
        shown = ", ".join(f"{k} {format_metric(k, record[k])}" for k in record
                          if k.startswith(("val_", "test_")) and isinstance(record[k], float))
        tqdm.write(f"epoch {epoch + 1}/{run.epochs}: train_loss {record['train_loss']:.4f}, {shown}")


def save(run: Run, partial: dict | None) -> None:
    """Write checkpoints/last.pt (rank 0, atomically) at the current step; ``partial``: the loss sums of the
    epoch so far when the step is inside one."""
    epoch, batch = divmod(run.step, run.steps_per_epoch)
    if run.ctx.is_main:
        save_checkpoint({
            "config": to_dict(run.cfg), "epoch": epoch, "batch": batch, "step": run.step, "partial": partial,
            "student": run.student.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "rng": rng_state(run.ctx.device), "pcdistill": __version__, "paths_given": run.given,
        }, run.out_dir / "checkpoints" / "last.pt")
    run.saved_at = run.step
    distributed.barrier(run.ctx)


def log_step(run: Run, losses: EpochLosses, bar: tqdm | None = None) -> None:
    """TensorBoard's train/* scalars of the last step read, and the epoch's mean loss on the bar (rank 0)."""
    if not run.ctx.is_main or not losses.last:
        return
    if bar is not None:
        bar.set_postfix(loss=f"{losses.sums['total'] / losses.count:.4f}")
    last = dict(losses.last)
    run.records.scalars(run.step, {f"train/{k}": v for k, v in last.items() if k != "total"}
                        | {"train/loss": last["total"], "train/lr": run.optimizer.param_groups[0]["lr"]})


# ----------------------------------------------------------------------------------------------
# The losses of an epoch, and the non-finite check
# ----------------------------------------------------------------------------------------------
class EpochLosses:
    """One rank's losses over an epoch. Each step writes its losses into a buffer on the device (no host sync
    per step, which would stall a GPU's queue); :meth:`read` fetches the steps since the last read and adds
    them to the epoch's sums, every ``log_every`` steps, before a checkpoint and at the epoch's end."""

    def __init__(self, capacity: int, device: torch.device, partial: dict | None = None):
        self.sums: dict[str, float] = dict(partial["sums"]) if partial else {}  # name -> sum over the steps read
        self.count: int = partial["count"] if partial else 0  # steps read
        self.names: list[str] = []  # of a buffer row: the losses, then their sum ("total")
        self.last: dict[str, float] = {}  # the losses of the last step read
        self._capacity, self._device = capacity, device
        self._buffer: torch.Tensor | None = None
        self._unread = 0

    def add(self, losses: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        values = torch.stack([*losses.values(), total]).detach()
        if self._buffer is None:
            self.names = [*losses, "total"]
            self._buffer = torch.empty(self._capacity, len(self.names), dtype=torch.float64, device=self._device)
        self._buffer[self._unread] = values
        self._unread += 1

    def read(self) -> list[list[float]]:
        """The rows of the steps since the last read (one host sync), added to the sums."""
        rows = self._buffer[:self._unread].tolist() if self._unread else []
        self._unread = 0
        for row in rows:
            for name, value in zip(self.names, row):
                self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += len(rows)
        if rows:
            self.last = dict(zip(self.names, rows[-1]))
        return rows

    def partial(self) -> dict:
        """The sums to store in a checkpoint inside the epoch (after a :meth:`read`)."""
        return {"sums": dict(self.sums), "count": self.count}

    def means_over_ranks(self, ctx: distributed.Context) -> dict[str, float]:
        """``train_loss`` and ``train_<name>``: each loss's mean over the epoch's steps on every rank."""
        names = sorted(self.sums)
        reduced = distributed.all_reduce_sum(
            torch.tensor([self.sums[n] for n in names] + [self.count], dtype=torch.float64, device=ctx.device), ctx)
        mean = {n: (reduced[i] / reduced[-1]).item() for i, n in enumerate(names)}
        return {"train_loss": mean.pop("total")} | {f"train_{n}": v for n, v in mean.items()}


def check_finite(run: Run, losses: EpochLosses) -> None:
    """Read this rank's unread steps and stop every rank together (the same error on each) if any rank's
    loss was not finite at one of them; the steps after that one are not saved: no checkpoint comes first."""
    rows = losses.read()
    first = run.step - len(rows) + 1  # the global step (1-based) of rows[0]
    mine = next(((first + i, row) for i, row in enumerate(rows) if not math.isfinite(row[-1])), None)
    seen = run.ctx.gather_objects(mine)  # one collective per check, none per step
    if any(s is not None for s in seen):
        raise NonFiniteLossError(_non_finite_message(run, losses.names, seen))


def _non_finite_message(run: Run, names: list[str], seen: list[tuple[int, list[float]] | None]) -> str:
    cfg, ctx = run.cfg, run.ctx
    step = min(s[0] for s in seen if s is not None)
    ranks = [rank for rank, s in enumerate(seen) if s is not None and s[0] == step]
    values = ", ".join(f"{n}={v:.4g}" for n, v in zip(names[:-1], seen[ranks[0]][1]))
    epoch, batch = divmod(step - 1, run.steps_per_epoch)
    on = f" on rank {', '.join(map(str, ranks))} of {ctx.world_size}" if ctx.distributed else ""
    where = (f"non-finite loss at epoch {epoch + 1}, step {batch + 1} of {run.steps_in(epoch)} (global step {step})"
             f"{on}: {values}. The run stopped.")
    lower = f"optim.lr={cfg.optim.lr / 10:g}"
    amp = " or trainer.amp=none" if cfg.trainer.amp != "none" else ""
    if run.saved_at is None:
        return (f"{where} No checkpoint was written yet, so there is nothing to resume: run the same command "
                f"again (the same --out is accepted while it holds no checkpoint) with a lower learning rate "
                f"({lower}){amp}.")
    done, inside = divmod(run.saved_at, run.steps_per_epoch)
    state = f"after epoch {done} (step {run.saved_at})" if not inside else \
        f"after step {run.saved_at} (in epoch {done + 1})"
    return (f"{where} {run.out_dir / 'checkpoints' / 'last.pt'} holds the state {state}; continue from there "
            f"with `pcdistill train --resume {run.out_dir} {lower}`{amp}.")


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
