"""The trainer's typed settings: what :func:`~experiments.train.loop.fit` reads, and the
optimizer and loss a run names (:mod:`experiments.train.build`).

Each study's config composes these with its own settings (``class CifarConfig(TrainSettings,
OptimizerSettings, DataSettings)``); every setting has one default and one check, here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..common.settings import (Settings, SettingsError, boolean, choice, number, optional,
                               setting, text, whole, whole_list)

__all__ = ["TrainSettings", "OptimizerSettings", "EnsembleSettings", "device_name"]


def device_name(value, name: str) -> str:
    """The check of ``--device``: ``auto`` or a torch device string (``cpu``, ``cuda:1``).
    Whether this machine has it is asked when the run starts
    (:func:`experiments.train.device.resolve_device`), since a run may resume elsewhere."""
    if value == "auto":
        return value
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise SettingsError(f"--device: expected auto, cpu, cuda, cuda:N or mps, got {value!r}") from None
    return value


@dataclass(frozen=True)
class TrainSettings(Settings):
    """What the training loop reads: epochs, batches, the run key, precision and evaluation."""

    name: str = setting("", text, "run folder name under --out")
    seed: int = setting(0, whole(0), "seed of the run key: init, split, shuffling, augmentation, dropout")
    epochs: int = setting(10, whole(1), "training epochs")
    batch_size: int = setting(128, whole(1), "images per step")
    eval_batch_size: int = setting(1000, whole(1), "images per evaluation batch")
    device: str = setting("auto", device_name, "auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    bf16: bool = setting(False, boolean, "bfloat16 autocast")
    channels_last: bool = setting(False, boolean, "channels-last memory format")
    compile: bool = setting(False, boolean, "torch.compile the step")
    retain_freed_memory: bool = setting(True, boolean, "keep freed memory in the process (glibc)")
    tta_flip: bool = setting(False, boolean, "average logits with the mirror image")
    tta_shift: int = setting(0, whole(0, " of pixels"),
                             "also average over the image moved by (s, s) and (-s, -s) pixels (0: off)")
    tta_shift_weight: float | None = setting(None, optional(number(0, 1)),
                                             "the shifted views' share of the average (none: every view the same)")
    telemetry: int = setting(0, whole(0), "per-layer statistics every N steps (0: off)")


@dataclass(frozen=True)
class EnsembleSettings(Settings):
    """K members trained as one vmapped ensemble: member k has seed ``seeds[k]``
    (:mod:`experiments.train.members`); ``seeds`` None trains one model of ``seed``."""

    seeds: tuple | None = setting(None, optional(whole_list(0)), "one seed per ensemble member")
    member_data_order: bool = setting(False, boolean, "each member its own data order")

    def check(self):
        super().check()
        if self.seeds is not None and getattr(self, "telemetry", 0):
            raise SettingsError("--telemetry: expected one model, got an ensemble "
                                f"of {len(self.seeds)} members")


@dataclass(frozen=True)
class OptimizerSettings(Settings):
    """The optimizer, its learning-rate schedule and the loss (docs/training.md)."""

    optimizer: str = setting("sgd", choice("sgd", "adam"), "sgd (torch.optim.SGD) or adam")
    lr: float = setting(0.1, number(0, math.inf, low_open=True), "(peak) learning rate")
    momentum: float = setting(0.0, number(0), "SGD momentum")
    nesterov: bool = setting(False, boolean, "Nesterov momentum")
    weight_decay: float = setting(0.0, number(0), "L2 weight decay (coupled, as torch.optim)")
    decay_mask: bool = setting(False, boolean, "no weight decay on biases and norm parameters")
    schedule: str = setting("constant", choice("constant", "onecycle"), "learning-rate schedule")
    pct_start: float = setting(0.25, number(0, 1, low_open=True, high_open=True),
                               "one-cycle: fraction of the steps spent warming up")
    div_factor: float = setting(10.0, number(0, math.inf, low_open=True),
                                "one-cycle: the peak rate over the starting rate")
    final_div_factor: float = setting(100.0, number(0, math.inf, low_open=True),
                                      "one-cycle: the starting rate over the final rate")
    label_smoothing: float = setting(0.0, number(0, 1), "label smoothing of the training loss")

    def check(self):
        super().check()
        if self.optimizer == "adam" and self.decay_mask and self.weight_decay:
            raise SettingsError("--decay-mask: expected none with adam (optim.adam has no mask), "
                                "got decay_mask true and weight_decay > 0")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise SettingsError("--nesterov: expected --momentum > 0 (Nesterov needs momentum), got 0")

    def schedule_spans_run(self) -> bool:
        """Whether the learning rate of a step depends on the run's planned length (so more
        epochs would change steps already taken)."""
        return self.schedule != "constant"
