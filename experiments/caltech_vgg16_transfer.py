"""Transfer learning as in the report: ImageNet VGG16, last layer replaced by 4096x256, only that
layer trained on Caltech-256 (32 training and 8 test images per class; SGD, lr 0.001, 10 epochs).

The command line only; the study itself is :mod:`experiments.transfer.caltech_head`.

    python -m experiments.caltech_vgg16_transfer --data /data/caltech256 --out runs/caltech_transfer
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch

from .common.settings import SettingsError
from .train.commands import computed
from .train.lifecycle import RunRefused
from .transfer.caltech_head import CUT, WeightsNotFoundError, add_caltech_flags, benchmark, run
from .transfer.config import CaltechHeadConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.caltech_vgg16_transfer",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/transfer.md.")
    add_caltech_flags(p, data_required=False)
    d = CaltechHeadConfig()
    a = p.add_argument
    a("--seed", type=int, default=d.seed, help="split, head init and shuffling (default: 0)")
    a("--epochs", type=int, default=d.epochs, help="epochs (default: 10)")
    a("--lr", type=float, default=d.lr, help="SGD learning rate (default: 0.001)")
    a("--momentum", type=float, default=d.momentum, help="SGD momentum (default: 0.9)")
    a("--batch-size", type=int, default=d.batch_size, help="images per step and per feature batch (default: 32)")
    a("--dropout", choices=sorted(CUT), default=d.dropout,
      help="eval: cache the 4096-d penultimate features, dropout off; train: replay VGG16's "
           "classifier dropouts each step, exactly as training through the net (default: eval)")
    a("--resize", type=int, default=d.resize, help="shorter side before the crop (default: 256)")
    a("--crop", type=int, default=d.crop, help="centre crop (default: 224)")
    a("--feature-cache", help="feature cache folder (default: <purenn cache>/features)")
    a("--no-cache", action="store_true", help="compute the frozen features without caching them")
    a("--cache-dtype", choices=["float32", "bfloat16", "float16"], default=d.cache_dtype,
      help="dtype of the cached features (default: float32)")
    a("--out", help="folder for config.json, results.json and the trained head (a folder "
                    "holding results of other settings is refused and left as it was)")
    a("--benchmark", type=int, metavar="STEPS",
      help="time STEPS head steps through the frozen net vs on cached features (random weights, "
           "--crop sized images, --batch-size), then exit")
    a("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.benchmark:
        print(json.dumps(benchmark(args.benchmark, crop=args.crop, batch_size=args.batch_size,
                                   dropout=args.dropout)))
        return 0
    if not args.data:
        parser.error("--data is required (unless --benchmark)")
    results, code = computed(
        lambda: run(CaltechHeadConfig(**{k: getattr(args, k) for k in CaltechHeadConfig.names()}), args.out),
        (SettingsError, RunRefused, WeightsNotFoundError, FileNotFoundError, ValueError))
    if code:
        return code
    print(json.dumps({k: v for k, v in results.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
