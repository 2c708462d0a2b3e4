"""The airbench94 recipe (Jordan 2024, arXiv 2404.00498) on CIFAR-10, built from purenn.

The command line only; the recipe is :mod:`experiments.airbench` (docs/speedrun.md).

    python -m experiments.speedrun                          # 10 epochs, all parts on
    python -m experiments.speedrun --recipe cpu             # the CPU recipe (docs/speedrun.md)
    python -m experiments.speedrun --no-whiten --name no-whiten   # one part off (ablation)
    python -m experiments.speedrun --resume runs/speedrun-s0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .airbench import RECIPE, RECIPES, SpeedrunConfig, run_speedrun
from .cifar.recipes import resolve_data_dir
from .common.settings import SettingsError, whole_number
from .data.cifar10 import DataNotFoundError
from .train.commands import refusal
from .train.lifecycle import RunRefused, open_run, resumed_config, run_folder

COMMAND = "python -m experiments.speedrun"

B = argparse.BooleanOptionalAction

#: Flags that set the setting of the same name (``--batch-size`` -> ``batch_size``).
SETTING_FLAGS = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
                 "bias_scaler", "label_smoothing", "schedule", "activation", "bn_scale", "whiten",
                 "whiten_bias_epochs", "flip", "alt_flip", "translate", "lookahead", "seed",
                 "device", "bf16", "channels_last", "compile", "val_split", "limit_per_class",
                 "data_dir", "bn_momentum", "lookahead_every", "eval_every_epoch")


def build_parser() -> argparse.ArgumentParser:
    """Every setting flag defaults to None: the ``--recipe``'s value (a new run; airbench94's are
    shown in --help) or the run's own (``--resume``)."""
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Recipe: " + ", ".join(f"{k}={v}" for k, v in RECIPE.to_json().items()
                                                              if k not in ("name", "data_dir"))
                                + ". See docs/speedrun.md.")
    a = p.add_argument
    a("--recipe", choices=sorted(RECIPES), help="the values the flags are laid over: airbench94 "
                                                "(default) or cpu (docs/speedrun.md)")
    a("--epochs", type=int, help="training epochs (default 10)")
    a("--batch-size", type=int, help="images per step (default 1024; the rates scale with it)")
    a("--lr", type=float, help="learning rate per 1024 examples, airbench's decoupled form (11.5)")
    a("--momentum", type=float, help="SGD momentum (0.85)")
    a("--nesterov", action=B, help="Nesterov momentum (on)")
    a("--weight-decay", type=float, help="weight decay per 1024 examples, decoupled (0.0153)")
    a("--bias-scaler", type=float, help="learning-rate multiplier of the batch-norm biases (64)")
    a("--label-smoothing", type=float, help="label smoothing of the loss (0.2)")
    a("--schedule", help="learning-rate schedule: triangular (default) or constant")
    a("--widths", help="the three conv groups' widths (64,256,256)")
    a("--activation", help="activation: gelu (default) or relu")
    a("--bn-momentum", type=float, help="batch norm's running-statistics momentum, torch's "
                                        "convention (0.4)")
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
    a("--lookahead-every", type=int, help="steps between lookahead pulls (5)")
    a("--tta", action=B, help="test-time augmentation: mirror and 1-pixel translations (on); "
                              "sets the trainer's tta_flip and tta_shift")
    a("--seed", type=int, help="seed of the run key (0)")
    a("--device", help="auto (CUDA when available, else CPU), cpu, cuda, ...")
    a("--bf16", action=B, help="bfloat16 autocast (on)")
    a("--channels-last", action=B, help="channels-last memory format (on)")
    a("--compile", action=B, help="torch.compile the step (off)")
    a("--out", help="folder of the run folders (default: runs)")
    a("--name", help="run folder name (default: speedrun-s<seed>)")
    a("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    a("--val-split", help="validation images carved from train: a fraction or a count (0)")
    a("--limit-per-class", type=int, help="only the first N images of each class (smoke runs)")
    a("--no-test", action="store_true", help="do not evaluate on the test split each epoch")
    a("--eval-every-epoch", action=B, help="evaluate val / test after every epoch (on; off: only "
                                           "after the last)")
    a("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint, with its saved "
                                          "settings (a flag that changes one is refused unless the "
                                          "run can soundly continue with it)")
    a("--max-epochs", type=int, help="stop (resumably) after this many completed epochs")
    return p


def parse_widths(text: str) -> tuple[int, ...]:
    """``"64,256,256"`` -> ``(64, 256, 256)`` (the config checks the count and the range)."""
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise SettingsError(f"--widths: expected three whole numbers >= 1 (e.g. 64,256,256), "
                            f"got {text!r}") from None


def _given(args: argparse.Namespace) -> dict:
    """The settings the command line sets: the flags that were given."""
    given = {k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k) is not None}
    if "val_split" in given:
        given["val_split"] = str(given["val_split"])
    if args.widths is not None:
        given["widths"] = parse_widths(args.widths)
    if args.tta is not None:
        given.update(tta_flip=args.tta, tta_shift=1 if args.tta else 0)
    if args.no_test:
        given["test"] = False
    return given


def requested_config(args: argparse.Namespace) -> tuple[SpeedrunConfig, Path, bool]:
    """``(config, run folder, resume)`` the flags ask for; SettingsError / RunRefused (one line).

    A new run is airbench94's recipe with the given flags laid over it; ``--resume`` lays them
    over the run's stored config, and the lifecycle then continues or refuses."""
    given = _given(args)
    if args.max_epochs is not None:
        whole_number(args.max_epochs, "max_epochs")
    if args.resume:
        cfg = resumed_config(args.resume, SpeedrunConfig, given,
                             own={"name": args.name, "out": args.out, "recipe": args.recipe})
        return cfg, Path(args.resume), True
    recipe = args.recipe or "airbench94"
    cfg = RECIPES[recipe].replace(**given)
    prefix = "speedrun" if recipe == "airbench94" else f"speedrun-{recipe}"
    cfg = cfg.replace(name=args.name or f"{prefix}-s{cfg.seed}")
    return cfg, run_folder(args.out or "runs", cfg.name), False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, run_dir, resume = requested_config(args)
        run = open_run(run_dir, resolve_data_dir(cfg), command=COMMAND, resume=resume)
        result, code = run_speedrun(run, max_epochs=args.max_epochs)
    except (SettingsError, RunRefused, DataNotFoundError, FileNotFoundError) as err:
        return refusal(err)
    if code == 0 and result.status == "done":
        last = result.history[-1] if result.history else {}
        print(json.dumps({k: last.get(k) for k in ("epoch", "val_accuracy", "test_accuracy")}))
    return code


if __name__ == "__main__":
    sys.exit(main())

