"""Shared test helpers: small configs and subprocess runners."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def digits_config(**sections) -> dict:
    """A digits run that takes a second or two on the CPU; ``sections`` update the defaults."""
    cfg = {
        "data": {"name": "digits", "val_fraction": 0.1},
        "model": {"name": "cnn_tiny"},
        "optim": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "multistep", "milestones": [1]},
        "trainer": {"epochs": 2, "batch_size": 128, "seed": 0, "device": "cpu", "threads": 1, "log_every": 5},
    }
    for key, value in sections.items():
        cfg[key] = cfg.get(key, {}) | value if isinstance(value, dict) else value
    return cfg


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """``python -m pcdistill ARGS`` in a subprocess; returns the CompletedProcess (text)."""
    full_env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "pcdistill", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class Processes:
    """What two worker processes left: exit codes and output, per rank."""
    returncodes: list[int | None]
    stdout: list[str]
    stderr: list[str]

    def report(self) -> str:
        """Each rank's exit code and the end of its stderr, for an assertion message."""
        return "\n".join(f"--- rank {rank}: exit {code}, stderr:\n{err[-3000:]}"
                         for rank, (code, err) in enumerate(zip(self.returncodes, self.stderr)))


def run_two_processes(worker: str, *args: str, env: dict | None = None, timeout: float = 300,
                      check: bool = True) -> Processes:
    """``python tests/WORKER ARGS`` as ranks 0 and 1 (one thread each) of a process group that meets through a
    file (:func:`init_process_group`), not a TCP port; with ``check``, asserts that both succeeded.

    Neither process outlives ``timeout``, nor 60 s after the other failed (it may wait on a collective)."""
    with tempfile.TemporaryDirectory(prefix="pcdistill-two-") as tmp:
        logs = [(Path(tmp, f"{rank}.out"), Path(tmp, f"{rank}.err")) for rank in range(2)]
        procs = []
        for rank, (out, err) in enumerate(logs):
            with open(out, "w") as stdout, open(err, "w") as stderr:  # the child keeps its own descriptors
                procs.append(subprocess.Popen(
                    [sys.executable, str(REPO / "tests" / worker), *args], cwd=REPO, stdout=stdout, stderr=stderr,
                    env=worker_env(env) | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                           "LOCAL_WORLD_SIZE": "2", "PCDISTILL_TEST_STORE": str(Path(tmp, "store"))}))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + 60)
            time.sleep(0.05)
        timed_out = [p for p in procs if p.poll() is None]
        for p in timed_out:
            p.kill()
            p.wait()
        outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    done = Processes([None if p in timed_out else p.returncode for p in procs],
                     [o for o, _ in outputs], [e for _, e in outputs])
    assert not timed_out, f"{worker}: rank(s) still running after the deadline were killed\n{done.report()}"
    if check:
        assert done.returncodes == [0, 0], f"{worker} failed\n{done.report()}"
    return done


def run_torchrun(worker: str, *args: str, log_dir: Path, timeout: float = 300) -> tuple[int, str, list[str]]:
    """``torchrun --standalone --nproc_per_node 2 tests/WORKER ARGS`` (its c10d store on a port the OS gives it),
    each worker's output kept in ``log_dir``; returns the launcher's exit code, a report (its stderr, then the
    workers'), and each rank's stderr. Past ``timeout`` the launcher and its workers are killed."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "--log-dir", str(log_dir), "--redirects", "3", str(REPO / "tests" / worker), *args],
                            cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, to kill the workers with it
    try:
        _, launcher = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, launcher = proc.communicate()
    workers = ["".join(f.read_text() for f in log_dir.glob(f"*/attempt_0/{rank}/stderr.log")) for rank in range(2)]
    report = "\n".join(f"--- rank {rank} stderr:\n{err[-3000:]}" for rank, err in enumerate(workers))
    assert proc.returncode != -signal.SIGKILL, f"torchrun {worker}: killed after {timeout} s\n{launcher}\n{report}"
    return proc.returncode, f"{launcher}\n{report}", workers


def worker_env(env: dict | None = None) -> dict:
    """The environment of a worker process: this checkout's src and tests importable, one thread."""
    return os.environ | {"OMP_NUM_THREADS": "1",
                         "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])} | (env or {})


def init_process_group(timeout: timedelta | None = None) -> None:
    """In a worker of :func:`run_two_processes`: join the gloo group through the store file it was given
    (``timeout``: how long a collective may wait for the other rank; gloo's default is 30 minutes)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{os.environ['PCDISTILL_TEST_STORE']}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


def special_rows(C: int, seed: int):
    """8 float64 rows of PCD's special cases: random, small-integer ties (with -0.0), masked classes,
    teacher-only -inf, fewer live classes than groups, student-only -inf (+inf row), NaN, +inf."""
    import torch

    g = torch.Generator().manual_seed(seed)
    s = torch.randn(8, C, generator=g, dtype=torch.float64) * 3
    t = torch.randn(8, C, generator=g, dtype=torch.float64) * 3
    ints = torch.randint(-2, 3, (2, 2, C), generator=g).double()
    s[1:3], t[1:3] = ints[0], ints[1]
    t[1, ::3] = -t[1, ::3]  # zeros become -0.0, which ties with 0.0
    masked = torch.rand(C, generator=g) < 0.3
    s[2, masked], t[2, masked] = float("-inf"), float("-inf")
    t[3, 1::4] = float("-inf")
    s[3, ::7], t[3, ::7] = float("-inf"), float("-inf")
    s[4, 3:], t[4, 3:] = float("-inf"), float("-inf")  # 3 live classes
    s[5, C // 2] = float("-inf")
    t[6, C - 1] = float("nan")
    s[7, 0] = float("inf")
    return s, t
