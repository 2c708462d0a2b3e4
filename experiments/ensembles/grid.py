"""Hyperparameter grids for ensemble studies: comma lists from the command line, their product,
and the members a grid and a number of seeds make.

    parse_values("--lr", "1e-1,1e-2")            -> [0.1, 0.01]
    members({"lr": [0.1, 0.01], "momentum": [0.9]}, seeds=3)
        -> 6 members: every grid point once per seed 0, 1, 2 (seed j of every point draws the
           same initialisation and augmentation: grid points are compared on paired draws)
"""
from __future__ import annotations

import itertools
import math
from typing import Mapping, NamedTuple, Sequence

from ..common.settings import flag, whole_number

__all__ = ["parse_values", "Member", "members", "check_grid"]


class Member(NamedTuple):
    """One member of a study: its grid point ``{name: value}`` and its seed."""

    point: dict
    seed: int


def parse_values(name: str, text: str) -> list[float]:
    """``"0.1,1e-2"`` -> ``[0.1, 0.01]``; ValueError (one line naming ``--name``) for an empty
    list, an empty entry or a non-number. Ranges (``inf``, ``nan``, a learning rate <= 0) and
    repeated values are the config's to refuse (:class:`~experiments.ensembles.config.SweepConfig`)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(p == "" for p in parts):
        raise ValueError(f"{flag(name)}: expected a comma-separated list of numbers, got {text!r}")
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise ValueError(f"{flag(name)}: expected numbers, got {p!r} in {text!r}") from None
        values.append(v)
    return values


def check_grid(grid: Mapping[str, Sequence[float]], seeds: int, max_members: int) -> None:
    """Refuse (ValueError, one line naming the flag) fewer than one seed, a ``--max-members``
    below 1, or more members (``points * seeds``) than ``max_members``. The values' ranges are
    the config's checks."""
    whole_number(seeds, "seeds")
    whole_number(max_members, "max_members")
    count = math.prod(len(v) for v in grid.values()) * seeds
    if count > max_members:
        raise ValueError(f"--max-members: expected at most {max_members} members, got {count} "
                         f"({' x '.join(str(len(v)) for v in grid.values())} grid points x {seeds} "
                         "seeds); shrink the grid or raise --max-members")


def members(grid: Mapping[str, Sequence[float]], seeds: int, first_seed: int = 0) -> list[Member]:
    """Every point of the product of ``grid``'s lists, once per seed ``first_seed + j``."""
    names = list(grid)
    return [Member(dict(zip(names, values)), first_seed + j)
            for values in itertools.product(*(grid[n] for n in names)) for j in range(seeds)]
