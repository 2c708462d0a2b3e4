"""The report's learning-rate and momentum sweeps, trained as one vmapped ensemble.

The command line only; the study is :mod:`experiments.ensembles.sweep`.

    python -m experiments.sweep --model tutorial --lr 1e-1,1e-2,1e-3,1e-4,1e-5 --momentum 0.9 --seeds 3 --epochs 4
    python -m experiments.sweep --model tutorial --lr 1e-3 --momentum 0.85,0.9,0.92,0.95,0.99,1.2 --seeds 3
    python -m experiments.sweep --resume runs/<name>                 # continue it
    python -m experiments.sweep --resume runs/<name> --epochs 8      # more epochs (constant rate)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .cifar.recipes import load_data, resolve_data_dir
from .common.files import dumps
from .common.settings import SettingsError, whole_number
from .data.cifar10 import DataNotFoundError
from .ensembles.config import MODEL_FLAGS, SweepConfig
from .ensembles.grid import check_grid, parse_values
from .ensembles.sweep import read_results, train_sweep, write_results
from .train import MAX_MEMBERS, retain_freed_memory
from .train.commands import refusal
from .train.lifecycle import RunRefused, open_run, run_folder, stored_config

COMMAND = "python -m experiments.sweep"

#: Flags that are not settings of the run (they say how this command runs, not what it trains).
_NOT_SETTINGS = ("out", "resume", "max_epochs", "max_members", "seeds", "first_seed")

_D = SweepConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/sweeps.md.", argument_default=argparse.SUPPRESS)
    a = p.add_argument
    a("--model", choices=sorted(MODEL_FLAGS), help="the net (default: tutorial)")
    a("--lr", help=f"comma list of learning rates (default: {_D.lr[0]:g})")
    a("--momentum", help="comma list of momenta (default: 0)")
    a("--weight-decay", help="comma list of L2 decays (default: 0)")
    a("--seeds", type=int, default=None, help="seeds per grid point (default: 1)")
    a("--first-seed", type=int, default=None, help="seed of the first member of each point (default: 0)")
    a("--optimizer", choices=("sgd", "adam"), help="(default: sgd, as the report)")
    a("--nesterov", action="store_true", help="Nesterov momentum")
    a("--epochs", type=int, help=f"epochs (default: {_D.epochs})")
    a("--batch-size", type=int, help=f"images per step (default: {_D.batch_size}, the report's)")
    a("--member-data-order", action="store_true",
      help="each member its own data order (default: all members see the same batches)")
    a("--flip", action="store_true", help="random horizontal flips (default: none, as the tutorial)")
    a("--crop", type=int, metavar="PIXELS", help="random crop padding (default: 0)")
    a("--max-members", type=int, default=MAX_MEMBERS,
      help=f"refuse grids with more members (default: {MAX_MEMBERS})")
    a("--val-split", help="validation images carved from train (default: 0)")
    a("--limit-per-class", type=int, help="only the first N images of each class (smoke runs)")
    a("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    a("--device", help="auto, cpu, cuda, ... (default: auto)")
    a("--out", default="runs", help="folder of the run folders (default: runs)")
    a("--name", help="run folder name (default: sweep-<model>-<n>members)")
    a("--resume", metavar="RUN_DIR", default=None, help="continue a sweep from its checkpoint (flags given "
                                          "with it must match its settings, or add epochs)")
    a("--max-epochs", type=int, default=None, help="stop (resumably) after this many completed epochs")
    return p


def requested_config(args: argparse.Namespace) -> tuple[SweepConfig, Path, bool]:
    """``(config, run folder, resume)`` the flags ask for: the defaults, or on ``--resume`` the
    stored config, with the given flags laid over (SettingsError / RunRefused: one line).
    Setting flags that were not given are absent from ``args`` (argparse.SUPPRESS)."""
    changes = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    for name in ("lr", "momentum", "weight_decay"):
        if name in changes:
            changes[name] = parse_values(name, changes[name])
    if "model" in changes:
        changes["model"] = MODEL_FLAGS[changes["model"]]
    if args.first_seed is not None:
        changes["seed"] = args.first_seed
    if args.max_epochs is not None:
        whole_number(args.max_epochs, "max_epochs")
    base = None if args.resume is None else stored_config(Path(args.resume), SweepConfig)[0]
    cfg = SweepConfig.with_members(base, seeds_per_point=args.seeds, **changes)
    check_grid(cfg.grid(), cfg.seeds_per_point, args.max_members)
    if base is not None:
        return cfg, Path(args.resume), True
    cfg = cfg.replace(name=cfg.name or f"sweep-{_flag_of(cfg.model)}-{len(cfg.seeds)}members")
    return cfg, run_folder(args.out, cfg.name), False


def _flag_of(model: str) -> str:
    return next(k for k, v in MODEL_FLAGS.items() if v == model)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, run_dir, resume = requested_config(args)
        cfg = resolve_data_dir(cfg)
        run = open_run(run_dir, cfg, command=COMMAND, resume=resume)
        train, val, test = load_data(cfg)
    except (SettingsError, RunRefused, DataNotFoundError, FileNotFoundError, ValueError) as err:
        return refusal(err)
    if len(train.labels) < cfg.batch_size:
        return refusal(f"--batch-size {cfg.batch_size}: expected at most the "
                       f"{len(train.labels)} training images (lower --batch-size, or raise "
                       "--limit-per-class)")
    if cfg.retain_freed_memory:
        retain_freed_memory()
    swept = {n: list(v) for n, v in cfg.grid().items() if len(v) > 1 or v != getattr(_D, n)}
    print(f"sweep of {len(cfg.seeds)} members ({cfg.model}, grid {swept}, "
          f"{cfg.seeds_per_point} seed{'s' * (cfg.seeds_per_point != 1)} per point) -> {run_dir}",
          file=sys.stderr)
    result, code = run.guarded(lambda: train_sweep(cfg, run=run, train=train, val=val, test=test,
                                                   max_epochs=args.max_epochs))
    if code != 0 or result.status != "done":
        return code
    try:   # the table is the folder's, never the flags'
        results = read_results(run_dir)
    except RunRefused as err:
        return refusal(err)
    write_results(run_dir, results)
    print((run_dir / "table.md").read_text(), file=sys.stderr)
    print(dumps(results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
