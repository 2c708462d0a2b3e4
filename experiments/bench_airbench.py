"""The airbench package itself (airbench 0.1.8, ``train94``) trained unmodified on the CPU, on
any CIFAR-10 folder purenn reads; accuracy at each TTA level and the time per epoch, to JSON.

The command line only; the study is :mod:`experiments.benchmarks.airbench_package`
(docs/speedrun.md, "The airbench package itself"). Needs the extra: pip install -e '.[airbench]'.

    python -m experiments.bench_airbench --data-dir ../shared/datasets/cifar10-jpeg --seed 0 \\
        --out runs/airbench-package/s0.json
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .benchmarks.airbench_package import PackageConfig, run_package
from .cifar.recipes import resolve_data_dir
from .common.files import write_json
from .common.settings import SettingsError
from .data.cifar10 import DataNotFoundError
from .train.commands import refusal

COMMAND = "python -m experiments.bench_airbench"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    a("--seed", type=int, default=0, help="seed of torch's global generator (0)")
    a("--epochs", type=float, default=9.9, help="training epochs (airbench94: 9.9)")
    a("--batch-size", type=int, default=1024, help="images per step (airbench94: 1024)")
    a("--bf16", action=argparse.BooleanOptionalAction, default=True,
      help="forward under bfloat16 autocast (on; off: float32)")
    a("--val-split", default="0", help="validation images carved from train (0)")
    a("--limit-per-class", type=int, help="only the first N images of each class (smoke runs)")
    a("--no-test", action="store_true", help="evaluate on the validation split only")
    a("--out", default="runs/airbench-package/s0.json", help="the JSON file written")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_data_dir(PackageConfig(
            data_dir=args.data_dir, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
            bf16=args.bf16, val_split=args.val_split, limit_per_class=args.limit_per_class,
            test=not args.no_test))
        result = run_package(cfg)
    except (SettingsError, DataNotFoundError, FileNotFoundError, ImportError, ValueError) as err:
        return refusal(err)
    write_json(args.out, result)
    print(json.dumps({"accuracy": result["accuracy"], "epoch_s": result["epoch_s"],
                      "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
