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

from nets.checkpoint import CheckpointError

from .cifar.recipes import resolve_data_dir
from .common.files import DamagedFileError
from .common.settings import SettingsError
from .data.cifar10 import DataNotFoundError, find_data_dir, load_cifar10
from .train.commands import refusal
from .train.lifecycle import EXIT_DIVERGED, EXIT_INTERRUPTED, NonFiniteLossError, RunRefused
from .transfer.cifar_split import METHODS, RECIPE, run_study
from .transfer.config import CifarTransferStudy, check_output


def build_parser() -> argparse.ArgumentParser:
    d = CifarTransferStudy()
    p = argparse.ArgumentParser(prog="python -m experiments.cifar_transfer",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Methods: " + ", ".join(METHODS) + ". See docs/transfer.md.")
    p.add_argument("--out", default="runs/cifar_transfer",
                   help="study folder: config.json, pretraining run, results.json, table.md "
                        "(default: %(default)s); a rerun continues it with the same settings, or "
                        "with more --shots, --draws, --methods")
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    p.add_argument("--shots", type=int, nargs="+", default=list(d.shots),
                   help="training images per class of B (default: 32 500)")
    p.add_argument("--draws", type=int, nargs="+", default=None,
                   help="random draws of the training images per --shots entry (default: 3 for "
                        "n <= 100, else 1)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="which rows to run (default: all)")
    p.add_argument("--pretrain-epochs", type=int, help=f"epochs on A (default: "
                   f"{RECIPE['pretrain'].epochs})")
    p.add_argument("--limit-per-class", type=int,
                   help="use only the first N images of each class of CIFAR-10 (smoke runs)")
    p.add_argument("--feature-cache", help="folder of the frozen-feature cache (default: "
                   "<purenn cache>/features)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads (default: 1: on a shared CPU, OpenMP threads spin-wait "
                        "for each other and small steps run ~10x slower with 2 than with 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        study = CifarTransferStudy(
            data_dir=args.data_dir, limit_per_class=args.limit_per_class, shots=tuple(args.shots),
            draws=None if args.draws is None else tuple(args.draws), methods=tuple(args.methods),
            pretrain_epochs=args.pretrain_epochs, feature_cache=args.feature_cache,
            threads=args.threads)
        check_output(args.out, study)
        study = resolve_data_dir(study)
        root = find_data_dir(study.data_dir)
        train = load_cifar10(root, "train", limit_per_class=study.limit_per_class)
        test = load_cifar10(root, "test", limit_per_class=study.limit_per_class)
    except (SettingsError, RunRefused, DataNotFoundError, FileNotFoundError) as err:
        return refusal(err)
    if study.threads:
        torch.set_num_threads(study.threads)
    t0 = time.perf_counter()
    try:
        run_study(train, test, args.out, study)
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun the same command to continue ({args.out})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except (RunRefused, CheckpointError, DamagedFileError, ValueError) as err:
        return refusal(err)
    print(f"study done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
