"""The typed configs of the transfer studies (docs/transfer.md), and the lifecycle of a study's
output folder.

* :class:`TransferConfig`: the CIFAR study's pretraining run on classes A (a run folder of the
  run lifecycle, ``model`` ``"cifar_transfer"``); :data:`PRETRAIN` is the study's recipe.
* :class:`HeadRecipe`: how a classifier on frozen features, a fine-tuned net or a net from scratch
  trains, with its epochs by the number of images per class (``epochs_by_shots``).
* :class:`CifarTransferStudy`: ``python -m experiments.cifar_transfer``'s settings.
* :class:`CaltechHeadConfig`, :class:`CaltechBlocksConfig`: the two Caltech-256 commands'.

:func:`check_output` / :func:`open_output`: a study folder holds its ``config.json``; a rerun into
it with other settings is refused in one line that names each differing setting, and the folder
is left as it was. Settings in the config's ``resumable`` (where the data and the cache are; the
cells a CIFAR study adds) may change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping

from ..common.files import DamagedFileError, read_json, write_json
from ..common.settings import (Settings, SettingsError, boolean, choice, number, optional, setting,
                               text, whole, whole_list)
from ..data.settings import DataSettings
from ..train.lifecycle import RunRefused, refuse_differences
from ..train.settings import OptimizerSettings, TrainSettings

__all__ = ["TransferConfig", "PRETRAIN", "HeadRecipe", "FEATURES", "FINETUNE", "SCRATCH",
           "CifarTransferStudy", "CaltechSettings", "CaltechHeadConfig", "CaltechBlocksConfig",
           "check_output", "open_output", "METHODS", "PRETRAIN_HASHED"]

METHODS = tuple(f"probe-block{k}" for k in range(1, 6)) + (
    "head-block3", "head-block4", "frozen+new-head", "fine-tune", "scratch")


@dataclass(frozen=True)
class TransferConfig(DataSettings, OptimizerSettings, TrainSettings):
    """The pretraining run of the CIFAR study: :func:`nets.small_vgg16` on classes A, trained by
    :func:`experiments.train.fit` with crop + flip augmentation."""

    model: str = setting("cifar_transfer", choice("cifar_transfer"), "the net (the registry's small_vgg16)")
    crop: int = setting(4, whole(0, " of pixels"), "zero-pad by PIXELS and crop back at a random offset (0: off)")
    flip: bool = setting(True, boolean, "mirror each image with probability 1/2")
    cutout: int = setting(0, whole(0, " of pixels"), "set a random PIXELS x PIXELS square to the mean colour (0: off)")

    def net_options(self) -> dict:
        """``nets.small_vgg16`` takes no options."""
        return {}


#: The study's pretraining (the CIFAR "fast" recipe, shortened to fit a shared 2-core CPU).
PRETRAIN = TransferConfig(name="pretrain-A", seed=0, epochs=8, batch_size=256, optimizer="sgd",
                          lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4, decay_mask=True,
                          schedule="onecycle", pct_start=0.25, div_factor=10.0,
                          final_div_factor=100.0, label_smoothing=0.1, crop=4, flip=True,
                          tta_flip=False, bf16=False, channels_last=True, device="cpu",
                          eval_batch_size=500)

#: The settings the pretraining folder's name hashes (``pretrain-<hash>``): those the study stored
#: before the typed config, so a folder written then is found again.
PRETRAIN_HASHED = ("seed", "epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov",
                   "weight_decay", "decay_mask", "schedule", "pct_start", "div_factor",
                   "final_div_factor", "label_smoothing", "crop", "flip", "tta_flip", "bf16",
                   "channels_last", "device", "eval_batch_size", "model", "name")


def epochs_by_shots(value, name: str) -> tuple:
    """The check of ``epochs_by_shots``: ``{images per class: epochs}`` (a JSON object's keys are
    text) as a sorted tuple of ``(n, epochs)`` pairs."""
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        out = tuple(sorted((int(n), e) for n, e in pairs))
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: expected {{images per class: epochs}}, got {value!r}") from None
    if not out or any(n < 1 or isinstance(e, bool) or not isinstance(e, int) or e < 1 for n, e in out):
        raise SettingsError(f"{name}: expected whole numbers >= 1 of images and epochs, got {value!r}")
    return out


@dataclass(frozen=True)
class HeadRecipe(OptimizerSettings):
    """How a classifier on frozen features, or a whole net, trains on ``n`` images per class:
    SGD + Nesterov with a one-cycle rate and no decay on biases and norms, ``epochs_for(n)``
    epochs of ``batch_size`` (the last partial batch kept)."""

    batch_size: int = setting(32, whole(1), "images per step")
    hidden: int = setting(1024, whole(1), "hidden width of the report's heads")
    epochs_by_shots: tuple = setting(((32, 30),), epochs_by_shots, "epochs by images per class")

    def epochs_for(self, n: int) -> int:
        """The epochs of ``n`` images per class; a size not listed takes the largest size's."""
        table = dict(self.epochs_by_shots)
        return table[n] if n in table else table[max(table)]

    def steps_per_epoch(self, examples: int) -> int:
        return math.ceil(examples / self.batch_size)


_HEAD = dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4, decay_mask=True,
             schedule="onecycle", pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
#: Every classifier on frozen features (probes, the report's heads, the new head).
FEATURES = HeadRecipe(lr=0.01, batch_size=32, hidden=1024, epochs_by_shots=((32, 60), (500, 20)), **_HEAD)
#: The pretrained net with a new last layer, everything trained.
FINETUNE = HeadRecipe(lr=0.01, batch_size=32, epochs_by_shots=((32, 30), (500, 8)), **_HEAD)
#: The same net from a random init.
SCRATCH = HeadRecipe(lr=0.05, batch_size=32, epochs_by_shots=((32, 30), (500, 8)), **_HEAD)


def _methods(value, name: str) -> tuple:
    return tuple(choice(*METHODS)(m, name) for m in value)


@dataclass(frozen=True)
class CifarTransferStudy(DataSettings):
    """``python -m experiments.cifar_transfer``: the data, the pretraining's length, and the cells
    of the table (``shots`` x draws x ``methods``). A rerun with more cells trains only those
    missing; the table shows every cell the folder holds."""

    resumable: ClassVar[tuple[str, ...]] = DataSettings.resumable + (
        "shots", "draws", "methods", "feature_cache", "threads")

    shots: tuple = setting((32, 500), whole_list(1), "training images per class of B")
    draws: tuple | None = setting(None, optional(whole_list(1)), "random draws per --shots entry (none: 3 for n <= 100, else 1)")
    methods: tuple = setting(METHODS, _methods, "which rows to run")
    pretrain_epochs: int | None = setting(None, optional(whole(1)), "epochs on A (none: the recipe's)")
    feature_cache: str | None = setting(None, optional(text), "folder of the frozen-feature cache")
    threads: int = setting(1, whole(0), "torch CPU threads (0: torch's)")

    def check(self):
        super().check()
        if self.draws is not None and len(self.draws) != len(self.shots):
            raise SettingsError(f"--draws: expected one count per --shots entry ({len(self.shots)}), "
                                f"got {len(self.draws)}")

    def draw_counts(self) -> tuple:
        return self.draws if self.draws is not None else tuple(3 if n <= 100 else 1 for n in self.shots)


@dataclass(frozen=True)
class CaltechSettings(Settings):
    """What both Caltech-256 commands share: the data, the weights, the split, the preprocessing."""

    resumable: ClassVar[tuple[str, ...]] = ("data", "weights", "offline", "feature_cache",
                                            "no_cache", "threads")

    data: str | None = setting(None, optional(text), "Caltech-256 folder (holding 256_ObjectCategories/ or being it)")
    weights: str | None = setting(None, optional(text), "torchvision VGG16 .pth (default: torch hub cache, else download)")
    offline: bool = setting(False, boolean, "never download the weights")
    clutter: bool = setting(False, boolean, "keep class 257.clutter")
    train_per_class: int = setting(32, whole(1), "training images per class")
    test_per_class: int = setting(8, whole(1), "test images per class")
    seed: int = setting(0, whole(0), "split, inits and shuffling")
    epochs: int = setting(10, whole(1), "epochs")
    lr: float = setting(1e-3, number(0, low_open=True), "SGD learning rate")
    momentum: float = setting(0.9, number(0, 1, high_open=True), "SGD momentum")
    batch_size: int = setting(32, whole(1), "images per step and per feature batch")
    resize: int = setting(256, whole(1), "shorter side before the crop")
    crop: int = setting(224, whole(1), "centre crop")
    feature_cache: str | None = setting(None, optional(text), "feature cache folder")
    no_cache: bool = setting(False, boolean, "compute the frozen features without caching them")
    threads: int | None = setting(None, optional(whole(1)), "torch CPU threads")


@dataclass(frozen=True)
class CaltechHeadConfig(CaltechSettings):
    """``python -m experiments.caltech_vgg16_transfer``: VGG16's last layer replaced and trained."""

    dropout: str = setting("eval", choice("eval", "train"), "eval: cached penultimate features; train: replay the classifier's dropouts")
    cache_dtype: str = setting("float32", choice("float32", "bfloat16", "float16"), "dtype of the cached features")


def _heads(value, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise SettingsError(f"--heads: expected blocks among 1 2 3 4 5, got {value!r}")
    for k in value:
        if k not in (1, 2, 3, 4, 5) or isinstance(k, bool):
            raise SettingsError(f"--heads: expected blocks among 1 2 3 4 5, got {k!r}")
    return tuple(value)


@dataclass(frozen=True)
class CaltechBlocksConfig(CaltechSettings):
    """``python -m experiments.caltech_vgg16_features``: classifiers on VGG16's blocks."""

    heads: tuple = setting((3, 4), _heads, "blocks that get the report's FC-1024 head")
    hidden: int = setting(1024, whole(1), "hidden width of the report's head")
    probes: bool = setting(True, boolean, "train the linear probes")
    probe_epochs: int = setting(30, whole(1), "epochs of the linear probes")
    probe_lr: float = setting(0.01, number(0, low_open=True), "SGD lr of the linear probes")
    probe_weight_decay: float = setting(5e-4, number(0), "probe L2 decay")
    cache_dtype: str = setting("float16", choice("float32", "bfloat16", "float16"), "dtype of the cached flat block maps")


CONFIG = "config.json"


def check_output(out: str | Path, cfg: Settings, *, results: str = "results.json") -> None:
    """Whether ``cfg`` may write into the study folder ``out`` (RunRefused, one line, otherwise;
    nothing is written): a new folder, or one whose ``config.json`` differs from ``cfg`` only in
    ``type(cfg).resumable``. A folder with ``results`` but no ``config.json`` was written by an
    older purenn that did not record its settings, and is refused."""
    out = Path(out)
    path = out / CONFIG
    if not path.is_file():
        if (out / results).is_file():
            raise RunRefused(f"{out} holds results of an older purenn, which did not record the "
                             "settings they were computed with; it is left as it was: pick another --out")
        return
    kind = type(cfg)
    try:
        stored = kind.from_json(kind.upgrade(read_json(path)), where=str(path))
    except (DamagedFileError, SettingsError) as err:
        raise RunRefused(f"{err}; it is left as it was: pick another --out") from None
    diffs = stored.differences(cfg, ignore=kind.resumable)
    if diffs:
        raise refuse_differences(out, "results computed", diffs,
                                 "rerun with its settings, or pick another --out")


def open_output(out: str | Path, cfg: Settings, **kwargs) -> Path:
    """:func:`check_output`, then ``out/config.json`` written (the folder created): ``out``."""
    check_output(out, cfg, **kwargs)
    out = Path(out)
    write_json(out / CONFIG, cfg.to_json())
    return out
