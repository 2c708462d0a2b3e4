"""A transfer study that runs on this machine: CIFAR-10 split by class, pretrain on one half, move
to the other with few labels.

The command line only; the study itself is :mod:`experiments.transfer.cifar_split`.

    python -m experiments.cifar_transfer --out runs/cifar_transfer
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import torch

from .data.cifar10 import DataNotFoundError, find_data_dir, load_cifar10
from .transfer.cifar_split import METHODS, RECIPE, run_study


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.cifar_transfer",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Methods: " + ", ".join(METHODS) + ". See docs/transfer.md.")
    p.add_argument("--out", default="runs/cifar_transfer",
                   help="study folder: pretraining run, results.json, table.md (default: %(default)s)")
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    p.add_argument("--shots", type=int, nargs="+", default=[32, 500],
                   help="training images per class of B (default: 32 500)")
    p.add_argument("--draws", type=int, nargs="+", default=None,
                   help="random draws of the training images per --shots entry (default: 3 for "
                        "n <= 100, else 1)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="which rows to run (default: all)")
    p.add_argument("--pretrain-epochs", type=int, help=f"epochs on A (default: "
                   f"{RECIPE['pretrain']['epochs']})")
    p.add_argument("--limit-per-class", type=int,
                   help="use only the first N images of each class of CIFAR-10 (smoke runs)")
    p.add_argument("--feature-cache", help="folder of the frozen-feature cache (default: "
                   "<purenn cache>/features)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1: on a shared CPU, OpenMP threads spin-wait "
                        "for each other and small steps run ~10x slower with 2 than with 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    draws = args.draws or [3 if n <= 100 else 1 for n in args.shots]
    try:
        root = find_data_dir(args.data_dir)
        train = load_cifar10(root, "train", limit_per_class=args.limit_per_class)
        test = load_cifar10(root, "test", limit_per_class=args.limit_per_class)
    except (DataNotFoundError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        run_study(train, test, args.out, shots=args.shots, draws=draws, methods=args.methods,
                  pretrain_epochs=args.pretrain_epochs, feature_cache=args.feature_cache)
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun the same command to continue ({args.out})", file=sys.stderr)
        return 130
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"study done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
