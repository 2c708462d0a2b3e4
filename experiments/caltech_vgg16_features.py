"""Feature extraction as in the report: classifiers on VGG16's intermediate blocks, on Caltech-256.

The command line only; the study itself is :mod:`experiments.transfer.caltech_blocks`.

    python -m experiments.caltech_vgg16_features --data /data/caltech256 --out runs/caltech_features
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .transfer.caltech_blocks import run
from .transfer.caltech_head import WeightsNotFoundError, add_caltech_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.caltech_vgg16_features",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/transfer.md.")
    add_caltech_flags(p)
    a = p.add_argument
    a("--seed", type=int, default=0, help="split, inits and shuffling (default: 0)")
    a("--heads", type=int, nargs="*", choices=[1, 2, 3, 4, 5], default=[3, 4],
      help="blocks that get the report's FC-1024 head (default: 3 4)")
    a("--hidden", type=int, default=1024, help="hidden width of the report's head (default: 1024)")
    a("--epochs", type=int, default=10, help="epochs of the report's heads (default: 10)")
    a("--lr", type=float, default=1e-3, help="SGD lr of the report's heads (default: 0.001)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    a("--no-probes", dest="probes", action="store_false", help="skip the linear probes")
    a("--probe-epochs", type=int, default=30, help="epochs of the linear probes (default: 30)")
    a("--probe-lr", type=float, default=0.01, help="SGD lr of the linear probes (default: 0.01)")
    a("--probe-weight-decay", type=float, default=5e-4, help="probe L2 decay (default: 5e-4)")
    a("--batch-size", type=int, default=32, help="images per step (default: 32)")
    a("--resize", type=int, default=256, help="shorter side before the crop (default: 256)")
    a("--crop", type=int, default=224, help="centre crop (default: 224)")
    a("--feature-cache", help="feature cache folder (default: <purenn cache>/features)")
    a("--no-cache", action="store_true", help="compute the features without caching them")
    a("--cache-dtype", choices=["float32", "bfloat16", "float16"], default="float16",
      help="dtype of the cached flat block maps (default: float16)")
    a("--out", help="folder for results.json and probes.png")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = run(args)
    except (WeightsNotFoundError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({n: {k: v for k, v in r.items() if k != "history"} for n, r in rows.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
