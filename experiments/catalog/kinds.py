"""What a run folder holds: the kind of run, told from its stored config, and that config typed.

    kind = kind_of(data)                      # data: the config.json object of any run
    cfg = read_config(kind, data, where)      # the study's typed config of that run

The kinds, and the one place they are told apart (:func:`kind_of`):

| kind | told by the stored keys | typed config |
| --- | --- | --- |
| ``speedrun`` | ``model`` is ``"airbench94"`` | :class:`experiments.airbench.config.SpeedrunConfig` |
| ``sweep`` | ``recipe`` is ``"sweep"``, or a list of ``seeds`` (K ensemble members; the ablation's variants too) | :class:`experiments.ensembles.config.SweepConfig` |
| ``transfer`` | ``model`` is ``"cifar_transfer"`` (the transfer study's pretraining run) | :class:`experiments.transfer.config.TransferConfig` |
| ``cifar`` | ``model`` is ``cifar_model_a``, ``_b`` or ``_c`` | :class:`experiments.cifar.config.CifarConfig` |
| ``bare`` | no ``model``: a tree of ``nets.save``, or a torchvision ``.pth`` | none: the caller names the model |

A config reads through its class's ``upgrade`` (a config.json written before the typed configs:
keys renamed or derived since) and ``from_json`` (unknown keys refused in one line). Every class
has the trainer's settings (``tta_flip``, ``bf16``, ...), ``model`` and ``net_options()``; a sweep's
has ``seeds`` and ``members()``. A new study is one row of :data:`KINDS` and one line of
:func:`kind_of`.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

from ..airbench.config import SpeedrunConfig
from ..cifar.config import ARCHITECTURES, CifarConfig
from ..common.settings import Settings
from ..ensembles.config import SweepConfig
from ..transfer.config import TransferConfig

__all__ = ["RunKind", "KINDS", "BARE", "kind_of", "read_config"]


class RunKind(NamedTuple):
    """One kind of run: its ``name``, how a message calls it (``what``), its typed config class
    (None: a bare checkpoint), and whether it trains an ensemble (its config's ``seeds``: one
    member each)."""

    name: str
    what: str
    config: type[Settings] | None
    ensemble: bool = False


#: Every kind of run folder the commands read (the module docstring's table).
KINDS: dict[str, RunKind] = {
    "cifar": RunKind("cifar", "a CIFAR run", CifarConfig),
    "sweep": RunKind("sweep", "a sweep", SweepConfig, ensemble=True),
    "speedrun": RunKind("speedrun", "a speedrun", SpeedrunConfig),
    "transfer": RunKind("transfer", "the transfer study's pretraining run", TransferConfig),
}
#: A checkpoint without a config: a tree of ``nets.save``, or torchvision's VGG16 weights.
BARE = RunKind("bare", "a bare checkpoint", None)


def kind_of(data: Mapping) -> RunKind:
    """The kind of run whose stored config is ``data`` (the module docstring's table)."""
    model = data["model"] if "model" in data else None
    if model == "airbench94":
        return KINDS["speedrun"]
    if ("recipe" in data and data["recipe"] == "sweep") or (
            "seeds" in data and isinstance(data["seeds"], list)):
        return KINDS["sweep"]
    if model == "cifar_transfer":
        return KINDS["transfer"]
    if model in ARCHITECTURES:
        return KINDS["cifar"]
    return BARE


def read_config(kind: RunKind, data: Mapping, *, where: str) -> Settings:
    """``data`` as ``kind``'s typed config (``upgrade`` then ``from_json``); SettingsError (one
    line, naming ``where``) when it does not read."""
    return kind.config.from_json(kind.config.upgrade(data), where=where)
