"""``pcdistill bench accuracy | detection | lm | analysis | report``: the evidence suites from the command line."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    bench = sub.add_parser(
        "bench", help="the evidence suites (accuracy, detection, lm), their analysis, configs and README report",
        description="Evidence suites: each trains its teachers once, then its students over seeds, into --out "
                    "(resumable: finished runs are kept) and writes a table there. accuracy: classification on "
                    "digits, fashion_mnist and fashion_mnist_pairs (accuracy.md); detection: fashion_scenes "
                    "(detection.md); lm: python_stdlib language models, needs the lm extra (lm.md). Then analysis "
                    "(teacher-student gap by teacher rank), configs (the shipped configs at the weights the suites "
                    "chose on validation) and report (the tables into README.md).")
    what = bench.add_subparsers(dest="bench", required=True)
    p = _suite_parser(what, "accuracy", "teachers, then every student variant over seeds; resumable",
                      "a few-minute smoke run on digits")
    p.set_defaults(func=cmd_accuracy)
    p = _suite_parser(what, "detection", "fashion_scenes detection: teacher, then vanilla/KD/DKD/PCD students over "
                                         "seeds, weights chosen on val AP; resumable",
                      "a smoke run on tiny scenes (under 3 minutes)")
    p.add_argument("--fashion-root", help="folder of the Fashion-MNIST IDX files (default: the dataset's, "
                                          "/usr/share/datasets/fashion-mnist)")
    p.set_defaults(func=cmd_detection)
    p = _suite_parser(what, "lm", "language models: teacher, then vanilla/KD/DKD/PCD students over seeds, weights "
                                  "chosen on val perplexity; resumable",
                      "a smoke run with tiny models (under 3 minutes)")
    p.add_argument("--recipe", default="stdlib",
                   help="which suite: stdlib (default: python_stdlib, a teacher trained here) or smollm2 (students "
                        "of SmolLM2-135M from its GGUF file, cached once: run `pcdistill fetch smollm2-135m` first; "
                        "lm_smollm2.md)")
    p.set_defaults(func=cmd_lm)
    p = what.add_parser("analysis", help="teacher-student gap by teacher rank for the suite's students")
    p.add_argument("--out", default="results", help="results folder of a finished suite")
    p.add_argument("--dataset", default="fashion_mnist_pairs",
                   help="dataset whose students are analysed (default fashion_mnist_pairs)")
    p.set_defaults(func=cmd_analysis)
    p = what.add_parser("configs", help="write configs/fashion_mnist*, configs/fashion_scenes, "
                                        "configs/lm/{stdlib,smollm2} from the suites' recipes at the weights they "
                                        "chose on validation")
    p.add_argument("--out", default="results", help="results folder of the suites (runs.csv, detection.csv, lm.csv)")
    p.add_argument("--configs", default="configs", help="configs folder to write into (default configs/)")
    p.set_defaults(func=cmd_configs)
    p = what.add_parser("report", help="write results/ into the README between its results markers")
    p.add_argument("--out", default="results", help="results folder")
    p.add_argument("--readme", default="README.md",
                   help="file whose <!-- results:begin/end --> section is rewritten (default README.md)")
    p.set_defaults(func=cmd_report)


def _suite_parser(what, name: str, help: str, quick: str):
    p = what.add_parser(name, help=help)
    p.add_argument("--out", default="results", help="results folder (default results/)")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--jobs", type=int, default=2, help="parallel single-threaded training processes (default 2)")
    return p


def _run_suite(plan, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pcdistill.evidence.pipeline import run_suite
    run_suite(plan, Path(args.out), jobs=args.jobs, log=tqdm.write)
    print((Path(args.out) / plan.report_file).read_text())
    return 0


def cmd_accuracy(args: argparse.Namespace) -> int:
    from pcdistill.evidence.suite import full_plan, quick_plan
    return _run_suite(quick_plan() if args.quick else full_plan(), args)


def cmd_detection(args: argparse.Namespace) -> int:
    from pcdistill.evidence.detection import full_plan, quick_plan
    return _run_suite((quick_plan if args.quick else full_plan)(args.fashion_root), args)


def cmd_lm(args: argparse.Namespace) -> int:
    from pcdistill.config import ConfigError
    from pcdistill.tasks.causal_lm import require_lm_extra
    require_lm_extra()
    from pcdistill.evidence.lm import RECIPES
    if args.recipe not in RECIPES:
        raise ConfigError(f"--recipe {args.recipe!r} is not a language-model suite; the recipes are "
                          f"{', '.join(RECIPES)}")
    return _run_suite(RECIPES[args.recipe](args.quick), args)


def cmd_analysis(args: argparse.Namespace) -> int:
    from pcdistill.config import ConfigError
    from pcdistill.evidence.analysis import analyse
    if not (Path(args.out) / "runs.csv").exists():
        raise ConfigError(f"{args.out}/runs.csv does not exist: run `pcdistill bench accuracy --out {args.out}` first")
    print(analyse(Path(args.out), args.dataset))
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from pcdistill.evidence.configs import write_configs
    for path in write_configs(Path(args.out), Path(args.configs)):
        print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pcdistill.evidence.report import update_readme
    update_readme(Path(args.readme), Path(args.out))
    print(f"updated {args.readme} from {args.out}/")
    return 0
