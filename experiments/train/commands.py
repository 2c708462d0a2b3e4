"""What the training commands share: one-line refusals, running the trainer under Ctrl-C / kill,
and the data and device flags.

    code = refusal(err)                           # "error: ..." on stderr, exit status 2
    value, code = guarded(lambda: fit(...))       # code: None, 1 (NaN loss) or 2 (bad checkpoint)
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from nets.checkpoint import CheckpointError

from .loop import NonFiniteLossError, sigterm_as_interrupt

__all__ = ["refusal", "guarded", "add_data_flags"]


def refusal(err, prefix: str = "") -> int:
    """Print ``error: <prefix><err>`` on stderr (one line) and return exit status 2."""
    print(f"error: {prefix}{err}", file=sys.stderr)
    return 2


def guarded(train: Callable[[], object]):
    """``(train(), None)``, run with ``kill`` saving a checkpoint as Ctrl-C does; ``(None, 1)``
    when the loss became non-finite, ``(None, 2)`` when a checkpoint cannot be read (each
    reported in one line)."""
    try:
        with sigterm_as_interrupt():
            return train(), None
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return None, 1
    except CheckpointError as err:
        return None, refusal(err)


def add_data_flags(parser: argparse.ArgumentParser, *, out_help: str = "folder of the run folders") -> None:
    """``--val-split``, ``--limit-per-class``, ``--data-dir``, ``--device``, ``--out``."""
    a = parser.add_argument
    a("--val-split", default="0", help="validation images carved from train (default: 0)")
    a("--limit-per-class", type=int, help="only the first N images of each class (smoke runs)")
    a("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    a("--device", default="auto", help="auto, cpu, cuda, ...")
    a("--out", default="runs", help=f"{out_help} (default: runs)")
