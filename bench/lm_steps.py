"""Step times of the language-model suite's runs, and the wall time of the whole suite they imply.

For the suite's recipe (``pcdistill.evidence.lm.FULL``): the median seconds of one training step
(forward, backward, AdamW; random tokens of one batch, batch x block_size) of the teacher and of
every student variant through the real models and ``CausalLMDistiller``; of one evaluation batch
(student and teacher logits, CE, agreement, KL); and of one batch of the test-token pass (8 blocks,
``bucket_gaps``). ``--processes 2`` (the default) times in two processes at once, one thread each,
as the suite runs them: two side-by-side processes share the memory bandwidth and run slower than
one alone. The estimate is the sum, over every run of the suite, of its steps and evaluation
batches at these times, divided by the processes (phase ends, where one worker waits for the
other, are not counted).

    python bench/lm_steps.py                 # the full recipe, two processes, 4 timed steps each
    python bench/lm_steps.py --quick         # the --quick recipe, one step: seconds

``--teacher-cache``: what the teacher cache buys with a real teacher's sizes (SmolLM2-135M: hidden 576,
30 layers, vocabulary 49,152; random weights, the time does not depend on them) and the student, batch
and block of ``configs/lm/smollm2/kd.yaml``: one training step of the vanilla student, of KD with the
teacher's forward in the step, of KD and PCD reading the teacher's hidden states from a float16 cache
(the teacher's logits recomputed inside the fused loss), each with its ratio to the vanilla step.

    python bench/lm_steps.py --teacher-cache            # two processes side by side, one thread each
    python bench/lm_steps.py --teacher-cache --quick    # one timed step

``--recipe smollm2``: the wall time of ``pcdistill bench lm --recipe smollm2`` (``lm.SMOLLM2``, its plan
``lm.smollm2_plan()``). Two processes side by side (as ``--jobs 2``), one thread each, time: a training step
of every variant's student (the teacher's sizes with the kept layers, reading a float16 teacher cache); an
evaluation batch (student and cached-teacher logits, CE, agreement, KL); a batch of the bucket pass; a
checkpoint and an export of the student; the start of a run (the GGUF file read and pruned into the student,
the fetched teacher, ``pcdistill fetch smollm2-135m``); and the teacher's forward of one batch (the cache
build, in the suite's own process on both cores). The projection lays the suite's runs out phase by phase
as the suite does (costliest first, each to the first free worker), the grid extended for every method
(the worst case), and adds the cache build unless ``--cache-built``.

    python bench/lm_steps.py --recipe smollm2           # needs the fetched teacher (for a run's start)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pcdistill.evidence import lm

KINDS = ["teacher"] + [v.name for v in lm.VARIANTS] + ["eval", "buckets"]
CACHE_KINDS = ["vanilla", "kd, teacher forward in the step", "kd, teacher cache", "pcd, teacher cache"]
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "lm", "smollm2", "kd.yaml")


def _models(recipe: lm.LMRecipe):
    from pcdistill.lm.models import create_causal_lm
    vocab = recipe.data_options["vocab_size"]
    make = (lambda options: create_causal_lm({"config": recipe.model, "vocab_size": vocab} | options))
    return make(recipe.teacher), make(recipe.student), vocab


def _timed(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(quick: bool, steps: int) -> dict[str, float]:
    """{kind: median seconds} in this process, one thread."""
    import torch.nn.functional as F

    from pcdistill.evidence.analysis import bucket_gaps
    from pcdistill.lm.distill import CausalLMDistiller
    from pcdistill.lm.models import full_logits
    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = lm.QUICK if quick else lm.FULL
    teacher, student, vocab = _models(recipe)
    block = recipe.data_options["block_size"]
    ids = torch.randint(0, vocab, (recipe.batch_size, block))
    out = {}

    def train_step(module: CausalLMDistiller, optimizer):
        def step():
            _, parts = module(ids, ids, epoch=1.0, progress=0.5)
            sum(parts.values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def distiller(variant) -> CausalLMDistiller:  # built when timed: a teacher-holding one freezes the teacher
        d = variant.distill(1.0, 0.0)
        if d["method"] == "vanilla":
            return CausalLMDistiller(student, None, loss="vanilla")
        return CausalLMDistiller(student, teacher, loss=d["method"], loss_options=d["loss"], alpha=d["alpha"],
                                 ce_weight=d["ce_weight"])

    runs = [("teacher", lambda: CausalLMDistiller(teacher, None, loss="vanilla"))]
    runs += [(v.name, lambda v=v: distiller(v)) for v in lm.VARIANTS]
    for name, build in runs:
        module = build().train()
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        out[name] = _timed(train_step(module, optimizer), steps)

    @torch.no_grad()
    def evaluate():
        s, t = full_logits(student, ids)[:, :-1].float(), full_logits(teacher, ids)[:, :-1].float()
        F.cross_entropy(s.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        (s.argmax(-1) == t.argmax(-1)).sum()
        F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")

    test_ids = ids[:8]

    @torch.no_grad()
    def buckets():
        s = full_logits(student, test_ids)[:, :-1].flatten(0, 1).float()
        t = full_logits(teacher, test_ids)[:, :-1].flatten(0, 1).float()
        bucket_gaps(s, t, lm.BUCKETS)
        F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")

    student.eval()
    out["eval"] = _timed(evaluate, steps)
    out["buckets"] = _timed(buckets, steps)
    return out


def _timed_cpu(fn, steps: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process) of ``fn`` after one warm-up call; on a machine
    shared with other jobs the CPU seconds of a one-thread process are the steadier measure."""
    fn()
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def cache_worker(steps: int) -> dict[str, list[float]]:
    """{kind: [median wall seconds, median CPU seconds]} of the --teacher-cache rows in this process, one thread."""
    import tempfile

    from pcdistill.config import load_config
    from pcdistill.lm.distill import CausalLMDistiller
    from pcdistill.lm.models import create_causal_lm
    from pcdistill.lm.teacher_cache import CachedTeacher, TeacherCache, write_teacher_cache
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(RECIPE)
    teacher = create_causal_lm({"config": "llama"} | SMOLLM2).eval()
    if cfg.model.init:  # the teacher's sizes with the kept layers (their values do not matter for the time)
        student = create_causal_lm({"config": "llama"} | SMOLLM2 | {"num_hidden_layers": len(cfg.model.init["layers"])})
    else:
        student = create_causal_lm({"config": cfg.model.name, "vocab_size": SMOLLM2["vocab_size"]} | cfg.model.options)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (cfg.trainer.batch_size, cfg.data.options["block_size"]))
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        write_teacher_cache(teacher, {"train": ids}, folder, identity={}, progress=False)
        cached = CachedTeacher(TeacherCache(folder))
        options = cfg.distill.loss
        runs = {"vanilla": (None, "vanilla", {}), "kd, teacher forward in the step": (teacher, "kd", options),
                "kd, teacher cache": (cached, "kd", options), "pcd, teacher cache": (cached, "pcd", {"stages": 3})}
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        for kind, (source, method, loss_options) in runs.items():
            module = CausalLMDistiller(student, source, loss=method, loss_options=loss_options).train()

            def step():
                _, parts = module(ids, ids, epoch=1.0, progress=0.5)
                sum(parts.values()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            out[kind] = list(_timed_cpu(step, steps))
    return out


def suite_counts(plan: lm.LMPlan, steps_per_epoch: int, val_batches: int, test_batches: int,
                 bucket_batches: int) -> dict[str, float]:
    """{kind: how many of it the suite runs}: training steps per run kind, evaluation and bucket batches."""
    recipe, seeds, grid = plan.recipe, len(plan.seeds), len(plan.alpha_grid)
    counts = {"teacher": recipe.teacher_epochs * steps_per_epoch}
    runs = 1
    for variant in plan.variants:
        finals = seeds * recipe.epochs * steps_per_epoch
        tuning = 0 if variant.method == "vanilla" else grid * recipe.tune_iterations
        counts[variant.name] = finals + tuning
        runs += seeds + (0 if variant.method == "vanilla" else grid)
    counts["eval"] = runs * (val_batches + test_batches)  # each run evaluates val and test once, at its end
    counts["buckets"] = len(plan.variants) * seeds * bucket_batches
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="processes timing side by side (the suite's --jobs)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per kind (median), after one warm-up")
    parser.add_argument("--quick", action="store_true", help="the --quick recipe, one timed step")
    # the full recipe's data (README "Evidence: the stdlib suite"): 214k / 17k / 23k train / val / test tokens
    parser.add_argument("--steps-per-epoch", type=int, default=104)
    parser.add_argument("--val-batches", type=int, default=9)
    parser.add_argument("--test-batches", type=int, default=12)
    parser.add_argument("--bucket-batches", type=int, default=23, help="batches of 8 blocks of the test-token pass")
    parser.add_argument("--blocks", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                        default=[SMOLLM2_DATA[s] for s in ("train", "val", "test")],
                        help="--recipe smollm2: blocks of its splits (default: lm.SMOLLM2's corpus, %(default)s)")
    parser.add_argument("--teacher-cache", action="store_true",
                        help="the teacher-cache rows: vanilla, KD with the teacher's forward, KD and PCD from a cache")
    parser.add_argument("--recipe", choices=["stdlib", "smollm2"], default="stdlib",
                        help="smollm2: the SmolLM2 suite's pieces and its projected wall time")
    parser.add_argument("--cache-built", action="store_true",
                        help="--recipe smollm2: the teacher cache is already there (copied), not built by the suite")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = 1 if args.quick else args.steps
    if args.worker:
        if args.recipe == "smollm2":
            print(json.dumps(smollm2_worker(steps)))
        else:
            print(json.dumps(cache_worker(steps) if args.teacher_cache else worker(args.quick, steps)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, __file__, "--worker", "--steps", str(steps)] + (["--quick"] if args.quick else []) \
        + (["--teacher-cache"] if args.teacher_cache else []) + ["--recipe", args.recipe]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True) for _ in range(args.processes)]
    results = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a timing process failed (exit {proc.returncode})")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    if args.recipe == "smollm2":
        return _print_smollm2(results, args, steps)
    if args.teacher_cache:
        return _print_cache_rows(results, args.processes, steps)
    seconds = {k: statistics.fmean(r[k] for r in results) for k in KINDS}
    plan = lm.quick_plan() if args.quick else lm.full_plan()
    counts = suite_counts(plan, args.steps_per_epoch, args.val_batches, args.test_batches, args.bucket_batches)
    print(f"# lm_steps: {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {os.cpu_count()} cores, "
          f"{args.processes} process(es) side by side, one thread each, median of {steps} step(s)\n")
    print("| kind | seconds each | count in the suite | CPU seconds |")
    print("|---|---:|---:|---:|")
    total = 0.0
    for kind in KINDS:
        cost = seconds[kind] * counts[kind]
        total += cost
        print(f"| {kind} | {seconds[kind]:.3f} | {counts[kind]:g} | {cost:.0f} |")
    wall = total / args.processes
    print(f"\nsuite: {total:.0f} CPU seconds; on {args.processes} process(es) about {wall:.0f} s = "
          f"{wall / 3600:.2f} h of wall time (phase ends not counted)")
    return 0


def _print_cache_rows(results: list[dict], processes: int, steps: int) -> int:
    wall = {k: statistics.fmean(r[k][0] for r in results) for k in CACHE_KINDS}
    cpu = {k: statistics.fmean(r[k][1] for r in results) for k in CACHE_KINDS}
    print(f"# lm_steps --teacher-cache: {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {os.cpu_count()} "
          f"cores, {processes} process(es) side by side, one thread each, median of {steps} step(s); teacher of "
          f"SmolLM2-135M's sizes, student and batch of configs/lm/smollm2/kd.yaml\n")
    print("| training step | seconds | / vanilla | CPU seconds | / vanilla |")
    print("|---|---:|---:|---:|---:|")
    for kind in CACHE_KINDS:
        print(f"| {kind} | {wall[kind]:.2f} | {wall[kind] / wall['vanilla']:.2f}x | {cpu[kind]:.2f} | "
              f"{cpu[kind] / cpu['vanilla']:.2f}x |")
    return 0


# ----------------------------------------------------------------------------------------------
# --recipe smollm2
# ----------------------------------------------------------------------------------------------
SMOLLM2_DATA = {"train": 1033, "val": 83, "test": 88}  # blocks of 128 tokens of lm.SMOLLM2's corpus and tokenizer
SMOLLM2_KINDS = [v.name for v in lm.SMOLLM2_VARIANTS] + ["eval", "buckets", "checkpoint", "export", "start",
                                                          "teacher forward"]


def smollm2_worker(steps: int) -> dict[str, list[float]]:
    """{kind: [median wall seconds, median CPU seconds]} of the SmolLM2 suite's pieces in this process, one thread."""
    import tempfile

    import torch.nn.functional as F

    from pcdistill.evidence.analysis import bucket_gaps
    from pcdistill.lm.distill import CausalLMDistiller
    from pcdistill.lm.fetch import resolve
    from pcdistill.lm.gguf import load_gguf_tokenizer
    from pcdistill.lm.models import create_causal_lm, full_logits, keep_layers
    from pcdistill.lm.teacher_cache import CachedTeacher, TeacherCache, write_teacher_cache
    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = lm.SMOLLM2
    teacher = create_causal_lm({"config": "llama"} | SMOLLM2).eval()
    student = create_causal_lm({"config": "llama"} | SMOLLM2 | {"num_hidden_layers": len(recipe.layers)})
    ids = torch.randint(0, SMOLLM2["vocab_size"], (recipe.batch_size, recipe.data_options["block_size"]))
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        with torch.no_grad():
            out["teacher forward"] = list(_timed_cpu(lambda: teacher(ids), 1))
        write_teacher_cache(teacher, {"train": ids}, Path(folder, "cache"), identity={}, progress=False)
        teacher = None  # 540 MB the rest does not need
        cached = CachedTeacher(TeacherCache(Path(folder, "cache")))
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        for variant in lm.SMOLLM2_VARIANTS:
            d = variant.distill(1.0, 0.0)
            module = CausalLMDistiller(student, None if d["method"] == "vanilla" else cached, loss=d["method"],
                                       loss_options=d.get("loss", {})).train()

            def step():
                _, parts = module(ids, ids, epoch=1.0, progress=0.5)
                sum(parts.values()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            out[variant.name] = list(_timed_cpu(step, steps))
        student.eval()

        @torch.no_grad()
        def evaluate():  # as causal_lm's evaluate: CE, agreement and KL against the cached teacher
            s, t = full_logits(student, ids)[:, :-1].float(), full_logits(cached, ids)[:, :-1].float()
            F.cross_entropy(s.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            (s.argmax(-1) == t.argmax(-1)).sum()
            F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")

        @torch.no_grad()
        def buckets():  # lm.test_token_stats on one batch of 8 blocks
            s = full_logits(student, ids)[:, :-1].flatten(0, 1).float()
            t = full_logits(cached, ids)[:, :-1].flatten(0, 1).float()
            bucket_gaps(s, t, lm.SMOLLM2_BUCKETS)
            F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")

        out["eval"] = list(_timed_cpu(evaluate, steps))
        out["buckets"] = list(_timed_cpu(buckets, steps))
        state = {"student": student.state_dict(), "optimizer": optimizer.state_dict()}
        out["checkpoint"] = list(_timed_cpu(lambda: torch.save(state, Path(folder, "last.pt")), 1))
        out["export"] = list(_timed_cpu(lambda: student.save_pretrained(Path(folder, "hf")), 1))
    file = resolve(recipe.teacher)  # a run's start: the GGUF read, pruned into the student; the tokenizer copied

    def start():
        keep_layers(create_causal_lm({"path": str(file)}), list(recipe.layers))
        load_gguf_tokenizer(file)
    out["start"] = list(_timed_cpu(start, 1))
    return out


def smollm2_projection(seconds: dict[str, float], plan: lm.SmolLM2Plan, data: dict[str, int], jobs: int,
                       cache_built: bool) -> list[tuple[str, int, float]]:
    """(phase, runs, wall seconds) of the suite at ``seconds`` per piece: each phase's runs (seconds of a run:
    its start, steps, checkpoints, evaluation and export) laid out as the suite's pool does, the longest first
    to the first free worker (the pool takes them in cost order: close); every method's grid extended once
    (the worst case)."""
    recipe = plan.recipe
    steps_per_epoch = data["train"] // recipe.batch_size
    eval_batches = sum(-(-data[split] // recipe.batch_size) for split in ("val", "test"))

    def run(variant: str, steps: int) -> float:
        checkpoints = (steps - 1) // recipe.checkpoint_every if recipe.checkpoint_every else 0
        return (seconds["start"] + steps * seconds[variant] + checkpoints * seconds["checkpoint"]
                + eval_batches * seconds["eval"] + seconds["export"])

    def wall(durations: list[float]) -> float:
        workers = [0.0] * jobs
        for d in sorted(durations, reverse=True):
            workers[workers.index(min(workers))] += d
        return max(workers)

    seeds, final = len(plan.seeds), recipe.epochs * steps_per_epoch
    tuned = [v.name for v in plan.variants if v.method != "vanilla"]
    phases = [("vanilla finals and tuning", [run("vanilla", final)] * seeds
               + [run(v, recipe.tune_iterations) for v in tuned for _ in plan.alpha_grid]),
              ("tuning beyond the grid (every method)", [run(v, recipe.tune_iterations) for v in tuned]),
              ("finals", [run(v, final) for v in tuned for _ in plan.seeds]),
              # the bucket pass loads each final student from its export (about as long as writing it)
              ("bucket pass", [seconds["export"] + -(-data["test"] // 8) * seconds["buckets"]]
               * (seeds * len(plan.variants)))]
    rows = [(name, len(durations), wall(durations)) for name, durations in phases]
    blocks = sum(data.values())
    # the cache build and the teacher's perplexity run in the suite's own process (counted at one thread's speed,
    # though it has both cores: its 2-thread speed-up is not measured here)
    prepare = seconds["start"] + (0 if cache_built else -(-blocks // 8) * seconds["teacher forward"]) \
        + eval_batches * seconds["eval"]
    return [("prepare: the teacher cache" + (" (already built)" if cache_built else "") + " and its perplexity",
             0, prepare)] + rows


def _print_smollm2(results: list[dict], args, steps: int) -> int:
    wall = {k: statistics.fmean(r[k][0] for r in results) for k in SMOLLM2_KINDS}
    cpu = {k: statistics.fmean(r[k][1] for r in results) for k in SMOLLM2_KINDS}
    plan = lm.smollm2_plan()
    recipe = plan.recipe
    data = dict(zip(("train", "val", "test"), args.blocks))
    print(f"# lm_steps --recipe smollm2: {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {os.cpu_count()} "
          f"cores, {args.processes} process(es) side by side, one thread each, median of {steps} step(s); "
          f"student of layers {list(recipe.layers)}, {recipe.batch_size} x {recipe.data_options['block_size']} "
          f"tokens a step\n")
    print("| piece | seconds | CPU seconds | / vanilla step |")
    print("|---|---:|---:|---:|")
    for kind in SMOLLM2_KINDS:
        print(f"| {kind} | {wall[kind]:.2f} | {cpu[kind]:.2f} | {wall[kind] / wall['vanilla']:.2f}x |")
    steps_per_epoch = data["train"] // recipe.batch_size
    print(f"\nrecipe: {recipe.epochs} epoch(s) of {steps_per_epoch} steps, tuning runs of {recipe.tune_iterations} "
          f"steps, grid {list(plan.alpha_grid)} (+1 beyond it), seeds {list(plan.seeds)}, {args.processes} jobs; "
          f"the phases at the seconds measured, and at the CPU seconds (a job alone on its core: the steadier "
          f"measure on a shared machine)\n")
    print("| phase | runs | wall seconds | at CPU seconds |")
    print("|---|---:|---:|---:|")
    by_wall = smollm2_projection(wall, plan, data, args.processes, args.cache_built)
    by_cpu = smollm2_projection(cpu, plan, data, args.processes, args.cache_built)
    for (name, runs, seconds), (_, _, cpu_seconds) in zip(by_wall, by_cpu):
        print(f"| {name} | {runs or ''} | {seconds:.0f} | {cpu_seconds:.0f} |")
    total, total_cpu = sum(r[2] for r in by_wall), sum(r[2] for r in by_cpu)
    print(f"\nsuite: about {total / 3600:.2f} h of wall time at the seconds measured, {total_cpu / 3600:.2f} h at the "
          f"CPU seconds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
