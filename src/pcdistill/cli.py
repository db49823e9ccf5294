"""Command line: ``pcdistill train | eval | list | demo | bench | tune``.

    pcdistill train configs/fashion_mnist/teacher.yaml --out runs/t
    pcdistill train configs/fashion_mnist/pcd.yaml teacher.weights=runs/t/model.safetensors --out runs/pcd
    pcdistill train --resume runs/pcd
    pcdistill eval runs/pcd
    torchrun --nproc_per_node 2 -m pcdistill train configs/digits/pcd.yaml --out runs/ddp
    pcdistill bench accuracy --out results        # the evidence suite (resumable); --quick for a smoke run
    pcdistill tune configs/fashion_mnist/pcd.yaml data.root=/my/data --out runs/tune   # distill.alpha on val

Errors in what you asked for (a config key, a missing dataset, a bad weights file) are printed as one
paragraph, without a traceback, and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pcdistill.config import ConfigError


def _user_errors():
    from pcdistill.data import DatasetError
    from pcdistill.engine.trainer import NonFiniteLossError
    return ConfigError, DatasetError, NonFiniteLossError, FileNotFoundError


def cmd_train(args) -> int:
    from pcdistill.config import load_config
    from pcdistill.engine.trainer import format_summary, train
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume DIR continues a run with the config saved in DIR/config.yaml; "
                              "do not pass a config file or overrides with it")
        summary = train(None, args.resume, resume=True)
    else:
        if not args.config:
            raise ConfigError("pcdistill train needs a CONFIG file (e.g. configs/digits/pcd.yaml) or --resume DIR")
        if not args.out:
            raise ConfigError("pcdistill train needs --out DIR, the run folder to write")
        summary = train(load_config(args.config, args.overrides), args.out)
    if summary.epochs and _is_main():
        print(format_summary(summary))
    return 0


def _is_main() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"


def cmd_eval(args) -> int:
    from pcdistill.config import load_config
    from pcdistill.engine.trainer import evaluate_weights
    target = Path(args.target)
    if target.is_dir():
        config = args.config or target / "config.yaml"
        weights = target / "model.safetensors"
    else:
        if not args.config:
            raise ConfigError(f"evaluating the weights file {str(target)!r} needs --config, the config it was "
                              f"trained with (a run folder has it as config.yaml)")
        config, weights = args.config, target
    cfg = load_config(config, args.overrides)
    results = evaluate_weights(cfg, weights, splits=args.split)
    for split, metrics in results.items():
        print(f"{split}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return 0


def cmd_list(args) -> int:
    from pcdistill import data, losses, models
    sections = {"models": models.list_models(), "datasets": data.list_datasets(), "methods": losses.list_methods()}
    try:
        from pcdistill import detection
        sections["detectors"] = detection.list_detectors()
        sections["detection_datasets"] = detection.list_detection_datasets()
    except ImportError:
        pass
    unknown = [w for w in args.what if w not in sections]
    if unknown:
        raise ConfigError(f"pcdistill list: unknown section {unknown[0]!r}; choose from {', '.join(sections)}")
    for name in args.what or list(sections):
        print(f"{name}: {', '.join(sections[name])}")
    return 0


def cmd_demo(args) -> int:
    from pcdistill.demo import run_demo
    run_demo(out_dir=Path(args.out), epochs=args.epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcdistill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a teacher or distill a student from a YAML config")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.epochs=3 data.root=/path")
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run folder or a weights file on the val/test splits")
    p.add_argument("target", help="run folder (with config.yaml and model.safetensors) or a .safetensors file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/path")
    p.add_argument("--config", help="config of the weights (a run folder's config.yaml is used by default)")
    p.add_argument("--split", nargs="+", default=["val", "test"], choices=["val", "test"])
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("list", help="list models, datasets and distillation methods")
    p.add_argument("what", nargs="*", help="models, datasets, methods, detectors, detection_datasets (default: all)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("demo", help="teacher, then vanilla/KD/DKD/PCD students on the embedded digits data")
    p.add_argument("--out", default="runs/demo", help="folder for the demo runs (default runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the digits recipe's)")
    p.set_defaults(func=cmd_demo)

    from pcdistill.evidence.cli import add_parser
    add_parser(sub)
    from pcdistill.evidence.tune import add_parser as add_tune_parser
    add_tune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
