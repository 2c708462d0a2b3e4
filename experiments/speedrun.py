"""The airbench94 recipe (Jordan 2024, arXiv 2404.00498) on CIFAR-10, built from purenn.

The command line only; the recipe is :mod:`experiments.airbench` (docs/speedrun.md).

    python -m experiments.speedrun                          # 10 epochs, all parts on
    python -m experiments.speedrun --no-whiten --name no-whiten   # one part off (ablation)
    python -m experiments.speedrun --resume runs/speedrun-s0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .airbench import RECIPE, check_config, run_speedrun
from .airbench.recipe import MODEL
from .data.cifar10 import DataNotFoundError
from .train import CHECKPOINT, load_run
from .train.commands import guarded, refusal

#: Flags a resumed run may take (the rest would be ignored: the saved config is used).
RESUME_FLAGS = ("data_dir", "device", "max_epochs")

B = argparse.BooleanOptionalAction


def build_parser() -> argparse.ArgumentParser:
    """Every recipe flag defaults to None = "take airbench94's value" (shown in --help)."""
    p = argparse.ArgumentParser(prog="python -m experiments.speedrun", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Recipe: " + ", ".join(f"{k}={v}" for k, v in RECIPE.items())
                                + ". See docs/speedrun.md.")
    a = p.add_argument
    a("--epochs", type=int, help="training epochs (default 10)")
    a("--batch-size", type=int, help="images per step (default 1024; the rates scale with it)")
    a("--lr", type=float, help="learning rate per 1024 examples, airbench's decoupled form (11.5)")
    a("--momentum", type=float, help="SGD momentum (0.85)")
    a("--nesterov", action=B, help="Nesterov momentum (on)")
    a("--weight-decay", type=float, help="weight decay per 1024 examples, decoupled (0.0153)")
    a("--bias-scaler", type=float, help="learning-rate multiplier of the batch-norm biases (64)")
    a("--label-smoothing", type=float, help="label smoothing of the loss (0.2)")
    a("--schedule", choices=("triangular", "constant"), help="learning-rate schedule (triangular)")
    a("--widths", help="the three conv groups' widths (64,256,256)")
    a("--activation", choices=("gelu", "relu"), help="activation (gelu)")
    a("--bn-scale", action=B, help="train the batch norms' scale (off: fixed at 1)")
    a("--whiten", action=B, help="first conv fixed to the data's whitening filters (on); "
                                 "--no-whiten trains it from the default init")
    a("--whiten-bias-epochs", type=int, help="epochs the first conv's bias trains (3)")
    a("--flip", action=B, help="mirror augmentation (on)")
    a("--alt-flip", action=B, help="mirror each image on alternate epochs (on); --no-alt-flip: "
                                   "a fresh coin per image and step")
    a("--translate", type=int, metavar="PIXELS", help="random translation, reflection padded (2; 0: off)")
    a("--ema", "--lookahead", dest="lookahead", action=B,
      help="lookahead: pull the weights to their moving average every 5 steps (on)")
    a("--tta", action=B, help="test-time augmentation: mirror and 1-pixel translations (on)")
    a("--seed", type=int, help="seed of the run key (0)")
    a("--device", help="auto (CUDA when available, else CPU), cpu, cuda, ...")
    a("--bf16", action=B, help="bfloat16 autocast (on)")
    a("--channels-last", action=B, help="channels-last memory format (on)")
    a("--compile", action=B, help="torch.compile the step (off)")
    a("--out", default="runs", help="folder of the run folders (default: runs)")
    a("--name", help="run folder name (default: speedrun-s<seed>)")
    a("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    a("--val-split", help="validation images carved from train: a fraction or a count (0)")
    a("--limit-per-class", type=int, help="only the first N images of each class (smoke runs)")
    a("--no-test", action="store_true", help="do not evaluate on the test split each epoch")
    a("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    a("--max-epochs", type=int, help="stop (resumably) after this many completed epochs")
    return p


def parse_widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--widths: expected three whole numbers >= 1 (e.g. 64,256,256), got {text!r}") from None
    return widths


RECIPE_FLAGS = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "bias_scaler",
                "label_smoothing", "schedule", "activation", "bn_scale", "whiten",
                "whiten_bias_epochs", "flip", "alt_flip", "translate", "lookahead", "tta", "seed",
                "device", "bf16", "channels_last", "compile", "val_split", "limit_per_class")


def resolve_config(args: argparse.Namespace) -> dict:
    """airbench94's recipe with the given flags laid over it, checked (ValueError, one line)."""
    cfg = dict(RECIPE)
    cfg.update({k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) is not None})
    if args.widths is not None:
        cfg["widths"] = parse_widths(args.widths)
    cfg["val_split"] = str(cfg["val_split"])
    cfg.update(data_dir=args.data_dir, test=not args.no_test)
    cfg["name"] = args.name or f"speedrun-s{cfg['seed']}"
    check_config(cfg)
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ValueError(f"--max-epochs: expected a whole number >= 1, got {args.max_epochs}")
    return cfg


def resume_config(args: argparse.Namespace) -> dict:
    """The saved config of ``--resume``'s run with ``--data-dir`` / ``--device`` applied;
    ValueError for any other flag, or a run of another experiment."""
    defaults = vars(build_parser().parse_args([]))
    given = sorted(k for k, v in vars(args).items()
                   if k not in RESUME_FLAGS + ("resume", "out") and v != defaults.get(k))
    if given:
        raise ValueError("--resume: expected only --data-dir, --device or --max-epochs beside it "
                         "(the run's saved config is used), got "
                         + ", ".join("--" + k.replace("_", "-") for k in given))
    _, _, cfg = load_run(Path(args.resume))
    if cfg.get("model") != MODEL:
        raise ValueError(f"{args.resume}: expected a run of experiments.speedrun, got one of "
                         f"{cfg.get('model')!r}")
    cfg.update({k: getattr(args, k) for k in ("data_dir", "device") if getattr(args, k)})
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ValueError(f"--max-epochs: expected a whole number >= 1, got {args.max_epochs}")
    check_config(cfg)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.resume:
            cfg, run_dir = resume_config(args), Path(args.resume)
        else:
            cfg = resolve_config(args)
            run_dir = Path(args.out) / cfg["name"]
            if (run_dir / CHECKPOINT).exists():
                raise ValueError(f"{run_dir} already holds a run; continue it with --resume "
                                 f"{run_dir} or pick another --name")
    except (ValueError, FileNotFoundError) as err:   # CheckpointError is a ValueError
        return refusal(err)
    resume_cmd = f"python -m experiments.speedrun --resume {run_dir}"
    try:
        out, code = guarded(lambda: run_speedrun(cfg, run_dir, resume=bool(args.resume),
                                                 max_epochs=args.max_epochs,
                                                 resume_command=resume_cmd))
    except (DataNotFoundError, FileNotFoundError) as err:
        return refusal(err)
    if code is not None:
        return code
    result, problem = out
    if problem is not None:
        return refusal(problem)
    if result.status == "interrupted":
        return 130
    if result.status == "stopped":
        print(f"stopped after epoch {args.max_epochs}; continue with: {resume_cmd}", file=sys.stderr)
        return 0
    last = result.history[-1] if result.history else {}
    print(json.dumps({k: last.get(k) for k in ("epoch", "val_accuracy", "test_accuracy")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
