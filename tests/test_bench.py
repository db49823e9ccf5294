"""The loss benchmark's plain loop computes the same loss as pcd_loss (so its ratio compares like with
like), and the benchmark runs end to end on a tiny shape."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pcdistill.losses import pcd_loss

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", [(5, 23), (3, 7)])
def test_loss_bench_loop_equals_pcd(shape):
    bench = load("loss_speed")
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    want = pcd_loss(s, t, temperature=bench.T, stages=3)
    (g_want,) = torch.autograd.grad(want, s)
    got = bench.per_row_group_loop(s, t, None)
    (g_got,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)


def test_loss_bench_prints_every_method(capsys):
    bench = load("loss_speed")
    methods = [m for m in bench.METHODS if "Triton" not in m]  # Triton: CUDA, or the interpreter (test_pcd_triton)
    assert bench.main(["--shapes", "4x12:fp32", "--device", "cpu", "--quick", "--no-memory",
                       "--methods", *methods]) == 0
    out = capsys.readouterr().out
    for name in methods:
        assert f"| 4x12:fp32 | {name} |" in out


def test_pcd_first_call_reports_both_calls():
    out = subprocess.run([sys.executable, str(BENCH / "pcd_first_call.py"), "--shape", "4x50"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "first call:" in out.stdout and "second call:" in out.stdout and "MiB" in out.stdout


def test_lm_bench_runs_every_method_and_its_fused_value_equals_unfused(capsys, monkeypatch):
    bench = load("lm_loss")
    assert bench.main(["--quick", "--shapes", "6x4x40:fp32", "--no-memory"]) == 0
    out = capsys.readouterr().out
    for method in bench.METHODS:
        for variant in bench.variants_of(method):
            row = next(line for line in out.splitlines() if line.startswith(f"| 6x4x40:fp32 | {method} | {variant} |"))
            if variant.startswith("fused"):  # relative difference to unfused (with CE: to unfused + CE)
                assert float(row.rstrip(" |").rsplit("|", 1)[1]) < 1e-5
        assert f"6x4x40:fp32 {method}: time fused / unfused <= 1.3" in out
    # the fresh-process probe sees the materialized logits (two of 4 MiB and a kept gradient), and the fused
    # loss stay under its 1 MiB budget
    monkeypatch.setenv("PCDISTILL_MEMORY_BUDGET_MIB", "1")
    unfused = bench.measure_memory("KD", "unfused", "256x8x4096:fp32", "cpu")
    fused = bench.measure_memory("KD", "fused", "256x8x4096:fp32", "cpu")
    assert unfused["peak"] >= 10 * 2**20 and fused["peak"] < unfused["peak"] / 3


def test_lm_steps_counts_every_run_of_the_suite():
    bench = load("lm_steps")
    from pcdistill.evidence import lm
    plan = lm.full_plan()  # 1 teacher, vanilla x 3 seeds, 5 distilled variants x (3 tuning + 3 final seeds)
    counts = bench.suite_counts(plan, steps_per_epoch=10, val_batches=2, test_batches=3, bucket_batches=4)
    r = plan.recipe
    assert counts["teacher"] == r.teacher_epochs * 10
    assert counts["vanilla"] == 3 * r.epochs * 10
    assert counts["pcd"] == 3 * r.epochs * 10 + 3 * r.tune_iterations
    assert counts["eval"] == (1 + 3 + 5 * 6) * (2 + 3)
    assert counts["buckets"] == 6 * 3 * 4


@pytest.mark.slow
def test_lm_steps_quick_prints_every_kind(capsys):
    bench = load("lm_steps")
    assert bench.main(["--quick", "--processes", "1"]) == 0
    out = capsys.readouterr().out
    for kind in bench.KINDS:
        assert f"| {kind} | " in out
    assert "h of wall time" in out


def test_lm_steps_teacher_cache_rows_time_every_kind(capsys, monkeypatch):
    bench = load("lm_steps")
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 300}
    monkeypatch.setattr(bench, "SMOLLM2", bench.SMOLLM2 | tiny)  # the recipe's student and batch, tiny models
    seconds = bench.cache_worker(steps=1)
    assert sorted(seconds) == sorted(bench.CACHE_KINDS) and all(v > 0 for times in seconds.values() for v in times)
    assert bench._print_cache_rows([seconds], processes=1, steps=1) == 0
    out = capsys.readouterr().out
    for kind in bench.CACHE_KINDS:
        assert f"| {kind} | " in out


def test_lm_steps_smollm2_projection_lays_out_every_run_of_the_suite():
    bench = load("lm_steps")
    from pcdistill.evidence import lm
    plan = lm.smollm2_plan()  # vanilla x 3 seeds; 4 methods x (3 tuning + 1 beyond the grid + 3 finals)
    zero = dict.fromkeys(bench.SMOLLM2_KINDS, 0.0)
    data = {"train": 80, "val": 16, "test": 24}  # 10 steps an epoch at batch 8; 2 + 3 eval batches a run

    def phases(seconds: dict, cache_built: bool = True) -> dict[str, tuple[int, float]]:
        return {name: (runs, wall) for name, runs, wall in
                bench.smollm2_projection(zero | seconds, plan, data, jobs=2, cache_built=cache_built)}
    starts = phases({"start": 1.0})  # one second a run: ceil(runs / 2) on two workers
    assert list(starts.values())[1:] == [(3 + 12, 8.0), (4, 2.0), (12, 6.0), (15, 0.0)]
    assert plan.recipe.epochs == 1
    assert phases({"vanilla": 1.0})["vanilla finals and tuning"] == (15, 20.0)  # 3 epochs of 10 steps: 2 + 1
    timed = phases({"pcd": 10.0, "eval": 100.0})  # 5 eval batches a run
    # finals: 3 PCD runs of 600 s, 9 of 500 s (KD, RKL, JSD steps cost 0 here), costliest first to the first
    # free worker: 600 600 | 600 to the first, then the 500s alternate: 3200 and 3100
    assert timed["finals"] == (12, 3200.0)
    building = phases({"teacher forward": 1.0}, cache_built=False)
    assert list(building.values())[0] == (0, 15.0)  # ceil(120 blocks / 8) teacher batches


def test_lm_steps_smollm2_worker_times_every_piece(tmp_path, monkeypatch):
    from dataclasses import replace

    from pcdistill.evidence import lm
    from tests.gguf_fixtures import tiny_gguf
    bench = load("lm_steps")
    file, _, _ = tiny_gguf(tmp_path)
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 300}
    monkeypatch.setattr(bench, "SMOLLM2", bench.SMOLLM2 | tiny)
    monkeypatch.setattr(lm, "SMOLLM2", replace(lm.SMOLLM2, teacher=str(file), layers=(1,)))
    seconds = bench.smollm2_worker(steps=1)
    assert sorted(seconds) == sorted(bench.SMOLLM2_KINDS) and all(v >= 0 for t in seconds.values() for v in t)
