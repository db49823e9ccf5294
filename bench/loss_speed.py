"""Forward+backward time and peak extra memory of the distillation losses.

Compares KD, DKD, PCD (paper joint K=3, curriculum, K=7, released) and two plain loops with autograd:
a per-group loop (sort once, then one softmax/KL/cosine per group over all rows at once) and a
per-row per-group loop (the definition read literally, as the tests' reference), at several shapes,
on the CPU and, when present, CUDA. Methods are timed in interleaved rounds, so machine noise hits
all of them alike; ratios are taken within this run only.

    python bench/loss_speed.py                 # all shapes, every available device
    python bench/loss_speed.py --quick         # fewer rounds
    python bench/loss_speed.py --sizes 256x1000 --device cpu
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from pcdistill.losses import dkd_loss, kd_loss, pcd_loss

TEMPERATURE, STAGES = 4.0, 3
DEFAULT_SIZES = ["64x100", "256x1000", "1024x1000", "128x32000"]


def per_group_loop(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """PCD written plainly: full sort, then each stage's groups one by one (each stage counted twice)."""
    key = ((t - t.mean(1, keepdim=True)) - (s.detach() - s.detach().mean(1, keepdim=True))).abs()
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    s_o, t_o = s.gather(1, order), t.gather(1, order)
    total = s.new_zeros(s.shape[0])
    for g in range(1, STAGES + 1):
        for chunk_s, chunk_t in zip(torch.tensor_split(s_o, g, dim=1), torch.tensor_split(t_o, g, dim=1)):
            q_t = F.softmax(chunk_t / TEMPERATURE, dim=1)
            log_q_s = F.log_softmax(chunk_s / TEMPERATURE, dim=1)
            kl = (q_t * (torch.log(q_t) - log_q_s)).sum(1) * TEMPERATURE**2
            total = total + (1 - F.cosine_similarity(q_t, log_q_s, dim=1, eps=1e-8)) * kl
    return (2 * total).mean()


def per_row_group_loop(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """PCD as the definition reads (and as the tests' reference is written): row by row, group by group."""
    rows = []
    for s_row, t_row in zip(s, t):
        key = ((t_row - t_row.mean()) - (s_row.detach() - s_row.detach().mean())).abs()
        order = torch.argsort(key, descending=True, stable=True)
        s_o, t_o = s_row[order], t_row[order]
        total = s_row.new_zeros(())
        for g in range(1, STAGES + 1):
            for chunk_s, chunk_t in zip(torch.tensor_split(s_o, g), torch.tensor_split(t_o, g)):
                q_t = F.softmax(chunk_t / TEMPERATURE, dim=0)
                log_q_s = F.log_softmax(chunk_s / TEMPERATURE, dim=0)
                kl = (q_t * (torch.log(q_t) - log_q_s)).sum() * TEMPERATURE**2
                total = total + (1 - F.cosine_similarity(q_t, log_q_s, dim=0, eps=1e-8)) * kl
        rows.append(2 * total)
    return torch.stack(rows).mean()


def methods(target: torch.Tensor):
    return {
        "KD": lambda s, t: kd_loss(s, t, temperature=TEMPERATURE),
        "DKD": lambda s, t: dkd_loss(s, t, target, temperature=TEMPERATURE),
        "PCD joint K=3": lambda s, t: pcd_loss(s, t, temperature=TEMPERATURE, stages=STAGES),
        "PCD curriculum K=3": lambda s, t: pcd_loss(s, t, temperature=TEMPERATURE, stages=STAGES,
                                                    schedule="curriculum", progress=0.3),
        "PCD joint K=7": lambda s, t: pcd_loss(s, t, temperature=TEMPERATURE, stages=7),
        "PCD released K=3": lambda s, t: pcd_loss(s, t, temperature=TEMPERATURE, stages=STAGES, variant="released"),
        "per-group loop K=3": per_group_loop,
        "per-row per-group loop K=3": per_row_group_loop,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(fn, s, t) -> None:
    s.grad = None
    fn(s, t).backward()


def peak_extra_bytes(fn, s, t, device: torch.device) -> int:
    """Peak bytes allocated by one forward+backward beyond what was allocated before it."""
    step(fn, s, t)  # warm caches (layouts, workspaces) so they are not counted
    s.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, s, t)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, s, t)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def time_methods(fns: dict, s, t, device, rounds: int, warmup: int = 3) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            step(fn, s, t)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            step(fn, s, t)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def describe_hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="ROWSxCLASSES shapes")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per method (median reported)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args(argv)

    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        parser.error("CUDA is not available on this machine")

    print(f"# loss_speed: {datetime.date.today()}, torch {torch.__version__}")
    checks = []
    for device in devices:
        print(f"\n## {device.type}: {describe_hardware(device)}\n")
        print("| rows x classes | method | fwd+bwd ms (median) | x KD | peak extra MiB | peak / (rows*classes*4 B) |")
        print("|---|---|---:|---:|---:|---:|")
        for size in args.sizes:
            rows, classes = (int(v) for v in size.lower().split("x"))
            gen = torch.Generator().manual_seed(0)
            s = (torch.randn(rows, classes, generator=gen) * 3).to(device).requires_grad_(True)
            t = (torch.randn(rows, classes, generator=gen) * 3).to(device)
            target = torch.randint(0, classes, (rows,), generator=gen).to(device)
            fns = methods(target)
            big = rows * classes >= 4_000_000
            rounds = args.rounds or (5 if args.quick else 15 if big else 41)
            if big and device.type == "cpu":
                rounds = min(rounds, 7)
            ms = time_methods(fns, s, t, device, rounds)
            unit = rows * classes * 4
            for name, fn in fns.items():
                peak = peak_extra_bytes(fn, s, t, device)
                print(f"| {rows} x {classes} | {name} | {ms[name]:.3f} | {ms[name] / ms['KD']:.2f} | "
                      f"{peak / 2**20:.1f} | {peak / unit:.1f} |")
            if device.type == "cpu" and (rows, classes) == (256, 1000):
                pcd = ms["PCD joint K=3"]
                checks.append(("CPU 256x1000: PCD / KD <= 3", pcd / ms["KD"], pcd / ms["KD"] <= 3))
                for loop in ("per-group loop K=3", "per-row per-group loop K=3"):
                    checks.append((f"CPU 256x1000: {loop} / PCD >= 8", ms[loop] / pcd, ms[loop] / pcd >= 8))
            if device.type == "cuda" and (rows, classes) == (256, 1000):
                ratio = ms["PCD joint K=3"] / ms["KD"]
                checks.append(("CUDA 256x1000: PCD / KD <= 1.5", ratio, ratio <= 1.5))
    if checks:
        print("\n## targets\n")
        for label, value, ok in checks:
            print(f"- {label}: {value:.2f} -> {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
