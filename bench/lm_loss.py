"""Language-model distillation loss: the fused output-layer loss against materialized logits.

Per shape (tokens x hidden x vocabulary) and method (KD, PCD K=3, DKD, RKL, JSD, TVD), three ways to get the loss and
the student's gradients (hidden states and output weight) from the last hidden states:
* fused: ``fused_linear_distill_loss`` (logits never built for all tokens at once);
* unfused: logits materialized (``h @ W.T``, the teacher's under no_grad), our loss on them, as a
  user would call it;
* torch KD by hand (KD only): ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True,
  reduction="batchmean") * T^2`` on the materialized logits.
KD also runs as the causal-LM distiller calls it, with the cross-entropy (``ce_weight=1``): "unfused + CE"
(materialized), "fused + CE" (one gradient for the total) and "fused + CE, parts apart" (``return_parts=True``,
the distillation term and CE each with its own gradient, summed); these compare with "unfused + CE".
Time: median forward+backward ms over rounds that alternate the variants (after one warm-up each).
Memory: one forward+backward in a fresh subprocess after a first one at the same shape (lazy initialisation)
(CPU: peak RSS growth, CUDA: max_memory_allocated growth; the returned gradients included), and what is
still held once they are freed.
Targets of the fused loss against unfused: memory <= 25%, time <= 1.3x.

    python bench/lm_loss.py                                  # 1024x512x128000:fp32 2048x256x32000:fp32
    python bench/lm_loss.py --shapes 4096x1024x128000:bf16 --device cuda
    python bench/lm_loss.py --quick                          # tiny shapes, seconds
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmark, for its helpers
import torch.nn.functional as F  # noqa: E402
from loss_speed import DTYPES, T, _status_kib, describe_hardware, sync, textbook_kd  # noqa: E402

from pcdistill.losses import (dkd_loss, fused_linear_distill_loss, jsd_loss, kd_loss, memory_budget_mib,  # noqa: E402
                              pcd_loss, rkl_loss, set_memory_budget, tvd_loss)

SHAPES = ["1024x512x128000:fp32", "2048x256x32000:fp32"]
QUICK_SHAPES = ["64x32x500:fp32"]
METHODS = {  # name: (fused method, its options, the unfused loss on logits)
    "KD": ("kd", {}, lambda s, t, y: kd_loss(s, t, temperature=T)),
    "PCD K=3": ("pcd", {"stages": 3}, lambda s, t, y: pcd_loss(s, t, temperature=T, stages=3)),
    "DKD": ("dkd", {}, lambda s, t, y: dkd_loss(s, t, y, temperature=T)),
    "RKL": ("rkl", {}, lambda s, t, y: rkl_loss(s, t, temperature=T)),
    "JSD": ("jsd", {"beta": 0.5}, lambda s, t, y: jsd_loss(s, t, temperature=T, beta=0.5)),
    "TVD": ("tvd", {}, lambda s, t, y: tvd_loss(s, t, temperature=T)),
}
TARGET_MEMORY, TARGET_TIME = 0.25, 1.3
WITH_CE = ["unfused + CE", "fused + CE", "fused + CE, parts apart"]  # KD only


def parse_shape(text: str):
    size, _, dtype = text.partition(":")
    rows, hidden, vocab = (int(v) for v in size.lower().split("x"))
    return rows, hidden, vocab, DTYPES[dtype or "fp32"]


def inputs(shape: str, device):
    """Hidden states and output weights of student and teacher (logits of std about 3), targets."""
    rows, hidden, vocab, dtype = parse_shape(shape)
    gen = torch.Generator().manual_seed(0)

    def make(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    h_s = make(rows, hidden).requires_grad_(True)
    w_s = make(vocab, hidden, scale=3 / hidden**0.5).requires_grad_(True)
    h_t, w_t = make(rows, hidden), make(vocab, hidden, scale=3 / hidden**0.5)
    return h_s, w_s, h_t, w_t, torch.randint(0, vocab, (rows,), generator=gen).to(device)


def loss_of(method: str, variant: str, h_s, w_s, h_t, w_t, y):
    name, options, unfused = METHODS[method]
    ce = variant in WITH_CE
    if variant.startswith("fused"):
        out = fused_linear_distill_loss(h_s, w_s, h_t, w_t, method=name, target=y if name == "dkd" or ce else None,
                                        ce_weight=float(ce), return_parts=variant.endswith("parts apart"),
                                        temperature=T, **options)
        return sum(out[1].values()) if isinstance(out, tuple) else out
    s = h_s @ w_s.T
    with torch.no_grad():
        t = h_t @ w_t.T
    if variant == "torch KD by hand":
        return textbook_kd(s, t, y)
    return unfused(s, t, y) + (F.cross_entropy(s, y) if ce else 0)


def step(method: str, variant: str, x) -> torch.Tensor:
    x[0].grad = x[1].grad = None
    loss = loss_of(method, variant, *x)
    loss.backward()
    return loss.detach()


def variants_of(method: str) -> list[str]:
    return ["fused", "unfused"] + (["torch KD by hand"] + WITH_CE if method == "KD" else [])


def baseline(variant: str) -> str:
    """The materialized variant a row is compared with."""
    return "unfused + CE" if variant in WITH_CE else "unfused"


def probe(method: str, variant: str, shape: str, device_name: str) -> dict:
    """One forward+backward in this (fresh) process: peak extra and held-after bytes."""
    device = torch.device(device_name)
    x = inputs(shape, device)
    # lazy initialisation (threads, kernels, PCD's compiled CPU passes and their variant for rows where a key ties
    # across a group boundary) is not the loss's memory: a first call at the same shape
    step(method, variant, x)
    x[0].grad = x[1].grad = None
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(method, variant, x)
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
        x[0].grad = x[1].grad = None
        gc.collect()
        held = torch.cuda.memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        base = _status_kib("VmRSS")
        step(method, variant, x)
        peak = (_status_kib("VmHWM") - base) * 1024
        x[0].grad = x[1].grad = None
        gc.collect()
        held = (_status_kib("VmRSS") - base) * 1024
    return {"peak": peak, "held": held}


def measure_memory(method: str, variant: str, shape: str, device: str) -> dict:
    # big blocks always mmapped: freed memory goes back to the OS, so "held after" is what stays allocated
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", method, variant, shape, device],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {method} / {variant} / {shape} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(method: str, variant: str, x, device) -> float:
    sync(device)
    start = time.perf_counter()
    step(method, variant, x)
    sync(device)
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", help="ROWSxHIDDENxVOCAB[:fp32|bf16|fp64]")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (median)")
    parser.add_argument("--quick", action="store_true", help=f"tiny shapes ({' '.join(QUICK_SHAPES)}), one round")
    parser.add_argument("--budget", type=int, help="workspace budget in MiB (default: the library's, 128)")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory probes")
    parser.add_argument("--probe", nargs=4, metavar=("METHOD", "VARIANT", "SHAPE", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(*args.probe)))
        return 0
    if args.budget:
        set_memory_budget(args.budget)
        os.environ["PCDISTILL_MEMORY_BUDGET_MIB"] = str(args.budget)  # for the probes' fresh processes
    device = torch.device(args.device)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    rounds = 1 if args.quick else args.rounds
    print(f"# lm_loss: {datetime.date.today()}, torch {torch.__version__}, {describe_hardware(device)}, "
          f"memory budget {memory_budget_mib():.0f} MiB, {rounds} round(s)\n")
    print("| shape | method | variant | ms | time x unfused | peak extra MiB | memory x unfused | held after MiB "
          "| value vs unfused |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    checks = []
    for shape in shapes:
        x = inputs(shape, device)
        # every timing of the shape first, then the memory probes: a probe's subprocess can leave this process's
        # next timings slower on a VM (bench/loss_speed.py saw up to 100x at small shapes)
        measured = {}
        for method in args.methods:
            variants = variants_of(method)
            values = {v: step(method, v, x) for v in variants}  # the warm-up round
            times = {v: [] for v in variants}
            for _ in range(rounds):
                for v in variants:
                    times[v].append(timed(method, v, x, device))
            measured[method] = (variants, values, {v: statistics.median(times[v]) for v in variants})
        del x
        gc.collect()
        for method, (variants, values, ms) in measured.items():
            mem = {v: None if args.no_memory else measure_memory(method, v, shape, device.type) for v in variants}
            for v in variants:
                base = baseline(v)
                cells = ["-"] * 3
                if mem[v]:
                    cells = [f"{mem[v]['peak'] / 2**20:.0f}", f"{mem[v]['peak'] / mem[base]['peak']:.3f}",
                             f"{mem[v]['held'] / 2**20:.0f}"]
                diff = abs(float(values[v]) - float(values[base])) / max(abs(float(values[base])), 1e-30)
                print(f"| {shape} | {method} | {v} | {ms[v]:.1f} | {ms[v] / ms[base]:.2f} | "
                      + " | ".join(cells) + f" | {diff:.1e} |", flush=True)
            for v in [v for v in variants if v in ("fused", "fused + CE")]:
                base = baseline(v)
                checks.append((f"{shape} {method}: time {v} / {base} <= {TARGET_TIME}", ms[v] / ms[base],
                               ms[v] <= TARGET_TIME * ms[base]))
                if mem[v]:
                    ratio = mem[v]["peak"] / mem[base]["peak"]
                    checks.append((f"{shape} {method}: memory {v} / {base} <= {TARGET_MEMORY}", ratio,
                                   ratio <= TARGET_MEMORY))
    print("\n## targets\n")
    for label, value, ok in checks:
        print(f"- {label}: {value:.3f} -> {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
