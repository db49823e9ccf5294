"""The one-time cost of PCD's native CPU kernel: the first call in a fresh process.

PCD's CPU rows build their C++ kernel (``losses/_pcd_native.cpp``) with the system's compiler on first use
and keep it under ``$PCDISTILL_CACHE/kernels``; later processes load it from there. This prints, for one
fresh process, the first and the second call's seconds and the RSS they add (peak, and still held after
each), so that the README can quote the cost.

    python bench/pcd_first_call.py                 # 256 x 1000, PCD K=3
    python bench/pcd_first_call.py --cold          # with an empty kernel cache (a fresh machine)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def probe(rows: int, classes: int) -> dict:
    import torch

    from pcdistill.losses import pcd_loss
    s = torch.randn(rows, classes).mul(3).requires_grad_()
    t = torch.randn(rows, classes) * 3
    out = {}
    for call in ("first", "second"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark
        base = _status_kib("VmRSS")
        start = time.perf_counter()
        pcd_loss(s, t, stages=3).backward()
        seconds = time.perf_counter() - start
        s.grad = None
        out[call] = {"seconds": round(seconds, 3), "peak_mib": round((_status_kib("VmHWM") - base) / 1024, 1),
                     "held_mib": round((_status_kib("VmRSS") - base) / 1024, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="256x1000", help="ROWSxCLASSES (default 256x1000)")
    parser.add_argument("--cold", action="store_true", help="an empty kernel cache (PCDISTILL_CACHE)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows, classes = (int(x) for x in args.shape.split("x"))
    if args.probe:
        print(json.dumps(probe(rows, classes)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    with tempfile.TemporaryDirectory() as cache:
        if args.cold:
            env["PCDISTILL_CACHE"] = cache
        out = subprocess.run([sys.executable, __file__, "--probe", "--shape", args.shape], capture_output=True,
                             text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"PCD K=3 at {args.shape}, {'empty' if args.cold else 'warm'} kernel cache, fresh process:")
    for call, r in result.items():
        print(f"  {call} call: {r['seconds']:.3f} s, peak RSS +{r['peak_mib']} MiB, held after +{r['held_mib']} MiB")


if __name__ == "__main__":
    main()
