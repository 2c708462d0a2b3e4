"""What the training commands share: one-line refusals and the data and device flags.

    code = refusal(err)                           # "error: ..." on stderr, exit status 2

The run folder's lifecycle (new or resume, the guarded run, exit codes) is
:mod:`experiments.train.lifecycle`.
"""
from __future__ import annotations

import argparse
import sys

from typing import Callable

from .lifecycle import EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED

__all__ = ["refusal", "add_data_flags", "computed"]


def refusal(err, prefix: str = "", *, writes: bool = True) -> int:
    """Print ``error: <prefix><err>`` on stderr (one line; only where ``writes``: rank 0 of a
    torchrun job) and return exit status 2."""
    if writes:
        print(f"error: {prefix}{err}", file=sys.stderr)
    return EXIT_REFUSED


def computed(compute: Callable[[], object], refused: tuple[type[BaseException], ...]):
    """``(compute(), exit status)`` of a study that writes its results when it ends (no
    checkpoint): 0; 2 with the one-line refusal for an error of ``refused``; 130 on Ctrl-C, which
    leaves nothing written."""
    try:
        return compute(), EXIT_OK
    except refused as err:
        return None, refusal(err)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing written (the results are written when the run ends)",
              file=sys.stderr)
        return None, EXIT_INTERRUPTED


def add_data_flags(parser: argparse.ArgumentParser, *, out_help: str = "folder of the run folders") -> None:
    """``--val-split``, ``--limit-per-class``, ``--data-dir``, ``--device``, ``--out``."""
    a = parser.add_argument
    a("--val-split", default="0", help="validation images carved from train (default: 0)")
    a("--limit-per-class", type=int, help="only the first N images of each class (smoke runs)")
    a("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    a("--device", default="auto", help="auto, cpu, cuda, ...")
    a("--out", default="runs", help=f"{out_help} (default: runs)")
