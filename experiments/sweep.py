"""The report's learning-rate and momentum sweeps, trained as one vmapped ensemble.

The command line only; the study is :mod:`experiments.ensembles.sweep`.

    python -m experiments.sweep --model tutorial --lr 1e-1,1e-2,1e-3,1e-4,1e-5 --momentum 0.9 --seeds 3 --epochs 4
    python -m experiments.sweep --model tutorial --lr 1e-3 --momentum 0.85,0.9,0.92,0.95,0.99,1.2 --seeds 3
    python -m experiments.sweep --resume runs/<name>
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .cifar.recipes import check_config, load_data
from .data.cifar10 import DataNotFoundError
from .ensembles.grid import check_grid, members, parse_values
from .ensembles.sweep import DEFAULTS, MODELS, run_sweep
from .train import MAX_MEMBERS, load_run, retain_freed_memory
from .train.commands import add_data_flags, guarded, refusal

#: The sweep's own defaults: the tutorial's training (SGD, no augmentation, batch 32, fp32).
BASE = dict(optimizer="sgd", nesterov=False, weight_decay=0.0, decay_mask=False, schedule="constant",
            label_smoothing=0.0, crop=0, flip=False, cutout=0, tta_flip=False, tta_shift=0,
            bf16=False, channels_last=False, compile=False, eval_batch_size=1000, device="auto",
            val_split="0", retain_freed_memory=True, momentum=0.0, lr=1e-3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/sweeps.md.")
    a = p.add_argument
    a("--model", choices=sorted(MODELS), default="tutorial", help="the net (default: tutorial)")
    a("--lr", default="1e-3", help="comma list of learning rates (default: 1e-3)")
    a("--momentum", default="0", help="comma list of momenta (default: 0)")
    a("--weight-decay", default="0", help="comma list of L2 decays (default: 0)")
    a("--seeds", type=int, default=1, help="seeds per grid point (default: 1)")
    a("--first-seed", type=int, default=0, help="seed of the first member of each point (default: 0)")
    a("--optimizer", choices=("sgd", "adam"), default="sgd", help="(default: sgd, as the report)")
    a("--nesterov", action="store_true", help="Nesterov momentum")
    a("--epochs", type=int, default=4, help="epochs (default: 4)")
    a("--batch-size", type=int, default=32, help="images per step (default: 32, the report's)")
    a("--member-data-order", action="store_true",
      help="each member its own data order (default: all members see the same batches)")
    a("--flip", action="store_true", help="random horizontal flips (default: none, as the tutorial)")
    a("--crop", type=int, default=0, metavar="PIXELS", help="random crop padding (default: 0)")
    a("--max-members", type=int, default=MAX_MEMBERS,
      help=f"refuse grids with more members (default: {MAX_MEMBERS})")
    add_data_flags(p)
    a("--name", help="run folder name (default: sweep-<model>-<n> members)")
    a("--resume", metavar="RUN_DIR", help="continue a sweep from its checkpoint")
    a("--max-epochs", type=int, help="stop (resumably) after this many completed epochs")
    return p


def sweep_config(args: argparse.Namespace) -> dict:
    """The run's config from the flags; ValueError (one line naming the flag) for a bad grid."""
    grid = {"lr": parse_values("lr", args.lr), "momentum": parse_values("momentum", args.momentum),
            "weight_decay": parse_values("weight_decay", args.weight_decay)}
    if args.optimizer == "adam" and grid["momentum"] != [0.0]:
        raise ValueError("--momentum: expected none with --optimizer adam (its betas are fixed), "
                         f"got {args.momentum}")
    check_grid(grid, args.seeds, args.max_members)
    ms = members(grid, args.seeds, args.first_seed)
    cfg = dict(BASE, model=MODELS[args.model], optimizer=args.optimizer, nesterov=args.nesterov,
               epochs=args.epochs, batch_size=args.batch_size, crop=args.crop, flip=args.flip,
               val_split=str(args.val_split), limit_per_class=args.limit_per_class,
               data_dir=args.data_dir, device=args.device, test=True, seed=args.first_seed,
               grid=grid, points=[m.point for m in ms], seeds=[m.seed for m in ms],
               member_data_order=args.member_data_order, recipe="sweep")
    cfg["lr"] = grid["lr"][0]   # (check_config's learning-rate check; members take theirs)
    cfg["name"] = args.name or f"sweep-{args.model}-{len(ms)}members"
    check_config(cfg)
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ValueError(f"--max-epochs: expected a whole number >= 1, got {args.max_epochs}")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        if args.resume:
            run_dir = Path(args.resume)
            _, _, cfg = load_run(run_dir)
            if cfg.get("recipe") != "sweep":
                raise ValueError(f"{run_dir} is not a sweep (its config names recipe "
                                 f"{cfg.get('recipe')!r})")
            if args.data_dir:
                cfg["data_dir"] = args.data_dir
        else:
            cfg = sweep_config(args)
            run_dir = Path(args.out) / cfg["name"]
            if (run_dir / "checkpoint.safetensors").exists():
                raise ValueError(f"{run_dir} already holds a run; continue it with --resume "
                                 f"{run_dir} or pick another --name")
        train, val, test = load_data(cfg)
    except (ValueError, FileNotFoundError, DataNotFoundError) as err:   # CheckpointError too
        return refusal(err)
    if len(train.labels) < cfg["batch_size"]:
        return refusal(f"--batch-size {cfg['batch_size']}: expected at most the "
                      f"{len(train.labels)} training images")
    if cfg.get("retain_freed_memory", True):
        retain_freed_memory()
    print(f"sweep of {len(cfg['seeds'])} members ({cfg['model']}, grid "
          f"{ {k: v for k, v in cfg['grid'].items() if v != [DEFAULTS[k]]} }) -> {run_dir}",
          file=sys.stderr)
    done, code = guarded(lambda: run_sweep(
        cfg, train=train, val=val, test=test, run_dir=run_dir, resume=bool(args.resume),
        max_epochs=args.max_epochs, resume_command=f"python -m experiments.sweep --resume {run_dir}"))
    if code is not None:
        return code
    result, rows = done
    if result.status == "interrupted":
        return 130
    if result.status == "done":
        print((run_dir / "table.md").read_text(), file=sys.stderr)
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
