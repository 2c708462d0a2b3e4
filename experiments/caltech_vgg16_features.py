"""Feature extraction as in the report: classifiers on VGG16's intermediate blocks, on Caltech-256.

The command line only; the study itself is :mod:`experiments.transfer.caltech_blocks`.

    python -m experiments.caltech_vgg16_features --data /data/caltech256 --out runs/caltech_features
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
from .transfer.caltech_blocks import run
from .transfer.caltech_head import WeightsNotFoundError, add_caltech_flags
from .transfer.config import CaltechBlocksConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.caltech_vgg16_features",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/transfer.md.")
    add_caltech_flags(p)
    d = CaltechBlocksConfig()
    a = p.add_argument
    a("--seed", type=int, default=d.seed, help="split, inits and shuffling (default: 0)")
    a("--heads", type=int, nargs="*", choices=[1, 2, 3, 4, 5], default=list(d.heads),
      help="blocks that get the report's FC-1024 head (default: 3 4)")
    a("--hidden", type=int, default=d.hidden, help="hidden width of the report's head (default: 1024)")
    a("--epochs", type=int, default=d.epochs, help="epochs of the report's heads (default: 10)")
    a("--lr", type=float, default=d.lr, help="SGD lr of the report's heads (default: 0.001)")
    a("--momentum", type=float, default=d.momentum, help="SGD momentum (default: 0.9)")
    a("--no-probes", dest="probes", action="store_false", help="skip the linear probes")
    a("--probe-epochs", type=int, default=d.probe_epochs, help="epochs of the linear probes (default: 30)")
    a("--probe-lr", type=float, default=d.probe_lr, help="SGD lr of the linear probes (default: 0.01)")
    a("--probe-weight-decay", type=float, default=d.probe_weight_decay, help="probe L2 decay (default: 5e-4)")
    a("--batch-size", type=int, default=d.batch_size, help="images per step (default: 32)")
    a("--resize", type=int, default=d.resize, help="shorter side before the crop (default: 256)")
    a("--crop", type=int, default=d.crop, help="centre crop (default: 224)")
    a("--feature-cache", help="feature cache folder (default: <purenn cache>/features)")
    a("--no-cache", action="store_true", help="compute the features without caching them")
    a("--cache-dtype", choices=["float32", "bfloat16", "float16"], default=d.cache_dtype,
      help="dtype of the cached flat block maps (default: float16)")
    a("--out", help="folder for config.json, results.json and probes.png (a folder holding "
                    "results of other settings is refused and left as it was)")
    a("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, code = computed(
        lambda: run(CaltechBlocksConfig(**{k: getattr(args, k) for k in CaltechBlocksConfig.names()}), args.out),
        (SettingsError, RunRefused, WeightsNotFoundError, FileNotFoundError, ValueError))
    if code:
        return code
    print(json.dumps({n: {k: v for k, v in r.items() if k != "history"} for n, r in rows.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
