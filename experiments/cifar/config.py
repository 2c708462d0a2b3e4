"""The typed config of a CIFAR-10 run of Models A, B, C (``python -m experiments.cifar_model_b``),
and the recipes as instances of it (each value's reason is in docs/training.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from layers.init import SCHEMES

from ..common.settings import (Settings, SettingsError, boolean, choice, number, optional,
                               setting, whole)
from ..data.settings import DataSettings
from ..train.settings import OptimizerSettings, TrainSettings

__all__ = ["CifarConfig", "NetSettings", "ARCHITECTURES", "RECIPES", "recipe"]

#: The models a CIFAR run trains (the registry's names, :mod:`experiments.train.registry`).
ARCHITECTURES = ("cifar_model_a", "cifar_model_b", "cifar_model_c")


@dataclass(frozen=True)
class NetSettings(Settings):
    """The keyword arguments of ``nets.model_a/b/c`` a run may set (None: the model's own
    default). :class:`CifarConfig` and the sweeps' ``SweepConfig`` take them."""

    dropout: float | None = setting(None, optional(number(0, 1, high_open=True)), "drop probability after each conv block")
    head_dropout: float | None = setting(None, optional(number(0, 1, high_open=True)), "drop probability in the classifier")
    batch_norm: bool = setting(True, boolean, "batch norm after each convolution")
    init: str | None = setting(None, optional(choice(*SCHEMES)), "weight initialisation (layers.init)")
    bn_momentum: float = setting(0.1, number(0, 1), "batch norm's running-statistics momentum (torch: 0.1)")
    bn_eps: float = setting(1e-5, number(0, low_open=True), "batch norm's epsilon (torch: 1e-5)")

    def net_options(self) -> dict:
        """The keyword arguments of ``nets.model_a/b/c`` this config sets
        (:func:`experiments.train.registry.build_net`)."""
        options = dict(batch_norm=self.batch_norm, bn_momentum=self.bn_momentum, bn_eps=self.bn_eps)
        options.update({k: getattr(self, k) for k in ("dropout", "head_dropout", "init")
                        if getattr(self, k) is not None})
        return options


@dataclass(frozen=True)
class CifarConfig(NetSettings, DataSettings, OptimizerSettings, TrainSettings):
    """One CIFAR-10 run: the trainer's settings, the optimizer's, the data's, and these."""

    #: ``--sync-bn`` may change on resume, as the number of processes may (docs/distributed.md).
    resumable: ClassVar[tuple[str, ...]] = DataSettings.resumable + ("sync_bn",)

    model: str = setting("cifar_model_b", choice(*ARCHITECTURES), "the report's model")
    recipe: str = setting("fast", choice("report", "fast"), "the hyperparameter set laid under the flags")
    # Training augmentation.
    crop: int = setting(4, whole(0, " of pixels"), "zero-pad by PIXELS and crop back at a random offset (0: off)")
    flip: bool = setting(True, boolean, "mirror each image with probability 1/2")
    cutout: int = setting(0, whole(0, " of pixels"), "set a random PIXELS x PIXELS square to the mean colour (0: off)")
    # The speedrun's tricks, off by default (docs/training.md).
    lookahead: bool = setting(False, boolean, "pull the weights to a slow moving average every --lookahead-every steps")
    lookahead_every: int = setting(5, whole(1), "steps between lookahead pulls")
    lookahead_decay: float = setting(0.95 ** 5, number(0, 1), "the lookahead's largest decay")
    whiten_init: bool = setting(False, boolean, "start the first convolution from the 3x3 whitening filters")
    whiten_images: int = setting(5000, whole(1), "training images the whitening filters are computed from")
    whiten_eps: float = setting(5e-4, number(0, low_open=True), "whitening: added to the eigenvalues")
    sync_bn: bool | None = setting(None, optional(boolean), "under torchrun: batch norm over the global batch")

    def schedule_spans_run(self) -> bool:
        return super().schedule_spans_run() or self.lookahead


# "report": the report's conditions as far as its text states them; the rest is our default.
# Its data section names two dataloader transforms, "normalization of pixel values, random
# flipping of images": so normalise + random horizontal flip, and no crop (not named).
_COMMON = dict(val_split="5000", bf16=True, channels_last=True)
_REPORT = dict(optimizer="adam", lr=1e-3, crop=0, epochs=20)
# "fast": SGD + Nesterov, one-cycle, label smoothing, crop + flip, decay mask, flip TTA (C: with
# the views moved by one pixel too, chosen on its validation split, docs/results.md). It trains
# on all 50,000 train images: its choices were made on 45,000 / 5,000 runs.
_FAST = dict(val_split="0", optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
             decay_mask=True, schedule="onecycle", label_smoothing=0.1, tta_flip=True, batch_size=512)
_DROPOUT = dict(dropout=0.1, head_dropout=0.2)

RECIPES: dict[str, dict[str, CifarConfig]] = {
    "cifar_model_a": {
        "report": CifarConfig(model="cifar_model_a", recipe="report", **_COMMON, **_REPORT, batch_size=32),
        "fast": CifarConfig(model="cifar_model_a", recipe="fast", **{**_COMMON, **_FAST}, lr=0.2, epochs=30),
    },
    "cifar_model_b": {
        "report": CifarConfig(model="cifar_model_b", recipe="report", **_COMMON, **_REPORT, batch_size=125, **_DROPOUT),
        "fast": CifarConfig(model="cifar_model_b", recipe="fast", **{**_COMMON, **_FAST}, lr=0.4, epochs=45, **_DROPOUT),
    },
    "cifar_model_c": {
        "report": CifarConfig(model="cifar_model_c", recipe="report", **_COMMON, **_REPORT, batch_size=125, **_DROPOUT),
        "fast": CifarConfig(model="cifar_model_c", recipe="fast", **{**_COMMON, **_FAST}, lr=0.4, epochs=50,
                            tta_shift=1, **_DROPOUT),
    },
}


def recipe(model: str, name: str) -> CifarConfig:
    """``RECIPES[model][name]``, refused in one line when either is unknown."""
    if model not in RECIPES or name not in RECIPES[model]:
        raise SettingsError(f"--recipe: expected one of {', '.join(RECIPES.get(model, {}))} for "
                            f"{model}, got {name!r}")
    return RECIPES[model][name]
