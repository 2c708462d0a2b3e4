"""The typed configs of the ensemble studies: a sweep (:class:`SweepConfig`, also each variant of
the ablation) and the ablation itself (:class:`AblationConfig`).

    cfg = SweepConfig.with_members(lr=(0.1, 0.01), momentum=(0.9,), seeds_per_point=3)
    cfg.members()          # [Member({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}, 0), ...]
    cfg.seeds              # (0, 1, 2, 0, 1, 2): one seed per member, what fit reads

A sweep's ``lr``, ``momentum`` and ``weight_decay`` are lists (the grid): its members are the
product of the three lists, once per seed ``seed .. seed + S - 1`` (``seeds`` spells it out, one
entry per member, in :meth:`SweepConfig.members`' order). A repeated value is refused (it would
train identical members and report them as replicates).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping

from ..common.settings import (SettingsError, boolean, choice, number_list, setting, whole,
                               whole_list, whole_number)
from ..data.settings import DataSettings
from ..train.settings import EnsembleSettings, OptimizerSettings, TrainSettings, device_name
from ..cifar.config import NetSettings
from .grid import Member

__all__ = ["NetSettings", "SweepConfig", "AblationConfig", "GRID", "MODEL_FLAGS",
           "ABLATION_MODEL_FLAGS"]

#: ``--model`` of ``experiments.sweep`` -> the registry's model name (experiments.train.registry).
MODEL_FLAGS = {"tutorial": "tutorial", "a": "cifar_model_a", "b": "cifar_model_b", "c": "cifar_model_c"}

#: ``--model`` of ``experiments.ablation`` -> the registry's model name (the report's models).
ABLATION_MODEL_FLAGS = {"a": "cifar_model_a", "b": "cifar_model_b", "c": "cifar_model_c"}

#: The hyperparameters a sweep's grid spans, in the order of its product.
GRID = ("lr", "momentum", "weight_decay")

#: Settings of runs written before the typed configs that a sweep never used, and the value each
#: had there (a config with another value was not a sweep's).
_INERT = {"lookahead": False, "lookahead_every": None, "lookahead_decay": None,
          "whiten_init": False, "whiten_images": None, "whiten_eps": None}


def _grid(low_open: bool):
    """The check of one grid list: finite, distinct numbers >= 0 (> 0 where ``low_open``)."""
    return number_list(0, math.inf, low_open=low_open, distinct=True)


@dataclass(frozen=True)
class SweepConfig(NetSettings, EnsembleSettings, DataSettings, OptimizerSettings, TrainSettings):
    """A sweep: K members of one net trained as one vmapped ensemble (docs/sweeps.md).

    ``lr``, ``momentum`` and ``weight_decay`` are the grid's lists (each value once); ``seeds``
    holds one seed per member of :meth:`members`; ``seed`` is the first seed of every point
    (and the key of the validation split).
    """

    # Overrides: the sweep's defaults are the PyTorch tutorial's training (SGD, batch 32, fp32,
    # no augmentation), and each grid hyperparameter is a list.
    lr: tuple = setting((1e-3,), _grid(low_open=True), "comma list of learning rates")
    momentum: tuple = setting((0.0,), _grid(low_open=False), "comma list of momenta")
    weight_decay: tuple = setting((0.0,), _grid(low_open=False), "comma list of L2 decays (coupled)")
    batch_size: int = setting(32, whole(1), "images per step (the report's 32)")
    epochs: int = setting(4, whole(1), "training epochs")
    seeds: tuple = setting((0,), whole_list(0), "one seed per member")
    model: str = setting("tutorial", choice(*MODEL_FLAGS.values()), "the net (the registry's name)")
    recipe: str = setting("sweep", choice("sweep"), "what wrote the run (a sweep)")
    crop: int = setting(0, whole(0, " of pixels"), "zero-pad by PIXELS and crop back at a random offset (0: off)")
    flip: bool = setting(False, boolean, "mirror each image with probability 1/2")
    cutout: int = setting(0, whole(0, " of pixels"), "set a random PIXELS x PIXELS square to the mean colour (0: off)")

    def check(self):
        super().check()
        if self.schedule != "constant":
            raise SettingsError(f"--schedule: expected constant in a sweep (the members' rates are "
                                f"the grid's), got {self.schedule!r}")
        if self.decay_mask:
            raise SettingsError("--decay-mask: expected none in a sweep, got true")
        if self.bf16:
            raise SettingsError("--bf16: expected none in a sweep (under vmap a convolution runs "
                                "outside autocast, docs/sweeps.md), got true")
        if self.optimizer == "adam" and self.momentum != (0.0,):
            raise SettingsError("--momentum: expected none with --optimizer adam (its betas are "
                                f"fixed), got {', '.join(f'{m:g}' for m in self.momentum)}")
        if self.optimizer == "sgd" and self.nesterov and 0.0 in self.momentum:
            raise SettingsError("--nesterov: expected every --momentum > 0 (Nesterov needs "
                                "momentum), got 0")
        points = math.prod(len(getattr(self, n)) for n in GRID)
        per_point, rest = divmod(len(self.seeds), points)
        expected = tuple(self.seed + j for j in range(per_point)) * points
        if rest or per_point < 1 or self.seeds != expected:
            raise SettingsError(f"seeds: expected seeds {self.seed}, {self.seed} + 1, ... once for each "
                                f"of the {points} grid point{'s' * (points != 1)} (one per member), got "
                                f"{list(self.seeds)}")

    def net_options(self) -> dict:
        """The net's options; the tutorial net takes none."""
        return {} if self.model == "tutorial" else super().net_options()

    @classmethod
    def with_members(cls, base: "SweepConfig | None" = None, *, seeds_per_point: int | None = None,
                     **changes) -> "SweepConfig":
        """``base`` (default: the defaults) with ``changes``, its ``seeds`` rebuilt for the
        grid and ``seeds_per_point`` (default: ``base``'s) starting at ``seed``."""
        base = cls() if base is None else base
        values = {f: changes.pop(f, getattr(base, f)) for f in GRID + ("seed",)}
        per_point = whole_number(base.seeds_per_point if seeds_per_point is None else seeds_per_point,
                                 "seeds")
        # Each list is checked before the seeds are spelled out from it.
        grid = {f: cls.__dataclass_fields__[f].metadata["check"](values[f], f) for f in GRID}
        seed = whole(0)(values["seed"], "first_seed")
        seeds = tuple(seed + j for j in range(per_point)) * math.prod(len(v) for v in grid.values())
        return base.replace(**changes, **grid, seed=seed, seeds=seeds)

    @property
    def seeds_per_point(self) -> int:
        return len(self.seeds) // math.prod(len(getattr(self, n)) for n in GRID)

    def grid(self) -> dict[str, tuple]:
        """``{"lr": (...), "momentum": (...), "weight_decay": (...)}``."""
        return {n: getattr(self, n) for n in GRID}

    def members(self) -> list[Member]:
        """Member k: its grid point (every product entry, in order) and its seed ``seeds[k]``."""
        points = itertools.product(*(getattr(self, n) for n in GRID))
        per_point = self.seeds_per_point
        return [Member(dict(zip(GRID, values)), self.seed + j) for values in points
                for j in range(per_point)]

    @classmethod
    def upgrade(cls, data: Mapping) -> dict:
        """A sweep's or an ablation variant's ``config.json`` written before the typed configs:
        its ``grid`` dict becomes the three lists, ``points`` (derived) goes, and the speedrun's
        settings (which a sweep never turned on) go; anything else is refused in one line."""
        data = dict(data)
        recipe = data.setdefault("recipe", "sweep")
        if recipe != "sweep":
            raise SettingsError(f"expected the config of a sweep (recipe 'sweep'), got recipe {recipe!r}: "
                                "this run was written by another command")
        grid = data.pop("grid", None)
        if grid is not None:
            if not isinstance(grid, Mapping) or set(grid) != set(GRID):
                raise SettingsError(f"grid: expected lists of {', '.join(GRID)}, got {grid!r}")
            data.update(grid)
        data.pop("points", None)
        for name, inert in _INERT.items():
            if name in data:
                value = data.pop(name)
                if inert is not None and value != inert:
                    raise SettingsError(f"{name}: expected {inert} in a sweep's config, got "
                                        f"{value!r}: this run cannot be read as a sweep")
        return data


@dataclass(frozen=True)
class AblationConfig(DataSettings):
    """What ``python -m experiments.ablation`` asks for: the model, how many seeds (members) per
    variant, how many epochs, and the data every variant reads."""

    model: str = setting("cifar_model_a", choice(*ABLATION_MODEL_FLAGS.values()), "the report's model")
    seeds: int = setting(3, whole(1), "seeds per variant, trained as one ensemble")
    epochs: int = setting(10, whole(1), "epochs per variant (the report: 20)")
    device: str = setting("auto", device_name, "auto, cpu, cuda, ...")
