"""The checks a config's values pass before a run starts, with messages that name the flag.

``whole_number`` and ``number_in`` refuse with a ValueError of one line,
``--<flag>: expected ..., got ...``, where ``<flag>`` is the config key with dashes; the
command lines print it as it is. (Layer arguments have their own checks in ``layers._checks``,
whose messages name the layer instead.)
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["flag", "whole_number", "number_in"]


def flag(name: str) -> str:
    """``"batch_size" -> "--batch-size"``."""
    return "--" + name.replace("_", "-")


def whole_number(value: Any, name: str, low: int = 1, *, unit: str = "") -> int:
    """``value`` if it is an int (not a bool) ``>= low``; ``unit`` (e.g. ``" of pixels"``) is
    named in the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{flag(name)}: expected a whole number{unit} >= {low}, got {value!r}")
    return value


def number_in(value: Any, name: str, *, low: float, high: float = math.inf,
              low_open: bool = False, high_open: bool = False) -> float:
    """``value`` if it is a finite int or float in the interval (ends included unless
    ``*_open``)."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        raise ValueError(f"{flag(name)}: expected a number in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return float(value)
