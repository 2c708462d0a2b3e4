"""The typed config of a speedrun (``python -m experiments.speedrun``) and airbench94's recipe
as an instance of it (docs/speedrun.md gives each value's source).

    cfg = RECIPE.replace(epochs=12, whiten=False)        # checked as any config is
    net = build_net(cfg.model, 10, cfg.net_options())    # the registry's net (no whitening filters)

The hyperparameters are airbench's *decoupled* ones (``lr`` per 1024 examples, ``weight_decay``
per 1024 examples, decoupled from the rate); :func:`experiments.airbench.recipe.derived_rates`
turns them into the rates of SGD on the mean loss.

A setting's default here is what a ``config.json`` that lacks it means (a run saved before the
setting existed); :data:`RECIPE` is airbench94's values, the command's starting point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from nets.airbench import ACTIVATIONS

from ..common.settings import (SettingsError, boolean, choice, number, setting, whole,
                               whole_list)
from ..data.settings import DataSettings
from ..train.settings import TrainSettings

__all__ = ["SpeedrunConfig", "RECIPE", "CPU_RECIPE", "RECIPES", "MODEL", "SCHEDULES"]

MODEL = "airbench94"
SCHEDULES = ("triangular", "constant")


@dataclass(frozen=True)
class SpeedrunConfig(DataSettings, TrainSettings):
    """One speedrun: the trainer's settings, the data's, and airbench94's parts, each of which
    can be switched off for an ablation. The test-time views are the trainer's ``tta_flip``
    (mirror) and ``tta_shift`` (translations by one pixel, weighted ``tta_shift_weight``)."""

    model: str = setting(MODEL, choice(MODEL), "the net (the registry's airbench94)")
    # The optimizer, in airbench's decoupled form.
    lr: float = setting(11.5, number(0, low_open=True), "learning rate per 1024 examples")
    momentum: float = setting(0.85, number(0, 1, high_open=True), "SGD momentum")
    nesterov: bool = setting(True, boolean, "Nesterov momentum")
    weight_decay: float = setting(0.0153, number(0), "weight decay per 1024 examples, decoupled")
    bias_scaler: float = setting(64.0, number(0, low_open=True), "learning-rate multiplier of the batch-norm biases")
    label_smoothing: float = setting(0.2, number(0, 1), "label smoothing of the loss")
    schedule: str = setting("triangular", choice(*SCHEDULES), "learning-rate schedule")
    peak_fraction: float = setting(0.23, number(0, 1, high_open=True), "triangular: where the rate peaks")
    start_factor: float = setting(0.2, number(0), "triangular: the first rate over the peak")
    end_factor: float = setting(0.07, number(0), "triangular: the last rate over the peak")
    # The net.
    widths: tuple = setting((64, 256, 256), whole_list(1, length=3), "the three conv groups' widths")
    activation: str = setting("gelu", choice(*sorted(ACTIVATIONS)), "activation")
    bn_momentum: float = setting(0.4, number(0, 1), "batch norm's running-statistics momentum")
    bn_eps: float = setting(1e-12, number(0, low_open=True), "batch norm's epsilon")
    bn_scale: bool = setting(False, boolean, "train the batch norms' scale (off: fixed at 1)")
    scale: float = setting(1 / 9, number(0, low_open=True), "the logits' fixed multiplier")
    whiten: bool = setting(True, boolean, "first conv fixed to the data's whitening filters")
    whiten_eps: float = setting(5e-4, number(0, low_open=True), "whitening: added to the eigenvalues")
    whiten_images: int = setting(5000, whole(1), "training images the whitening filters are computed from")
    whiten_bias_epochs: int = setting(3, whole(0), "epochs the first conv's bias trains")
    # Training augmentation and the lookahead.
    flip: bool = setting(True, boolean, "mirror augmentation")
    alt_flip: bool = setting(True, boolean, "mirror each image on alternate epochs (off: a fresh coin per image and step)")
    translate: int = setting(2, whole(0, " of pixels"), "random translation, reflection padded (0: off)")
    lookahead: bool = setting(True, boolean, "pull the weights to their moving average every --lookahead-every steps")
    lookahead_every: int = setting(5, whole(1), "steps between lookahead pulls")
    lookahead_decay: float = setting(0.95 ** 5, number(0, 1), "the lookahead's largest decay")
    # When the held-out splits are evaluated.
    eval_every_epoch: bool = setting(True, boolean, "evaluate val / test after every epoch (off: "
                                                    "only after the last, as airbench does)")

    def check(self):
        super().check()
        if self.translate >= 16:
            raise SettingsError(f"--translate: expected fewer than 16 pixels (reflection padding of "
                                f"a 32x32 image), got {self.translate}")
        if self.nesterov and self.momentum == 0:
            raise SettingsError("--nesterov: expected --momentum > 0 (Nesterov needs momentum), got 0")

    def net_options(self) -> dict:
        """The keyword arguments of ``nets.airbench`` this config sets (layer 0's whitening
        filters are not among them: a run's checkpoint holds them)."""
        return dict(widths=list(self.widths), activation=self.activation,
                    bn_momentum=self.bn_momentum, bn_eps=self.bn_eps, scale=self.scale)

    def schedule_spans_run(self) -> bool:
        """The triangular schedule and the lookahead's decay both depend on the planned number of
        steps, so more epochs would change the steps already taken."""
        return self.schedule != "constant" or self.lookahead

    @classmethod
    def upgrade(cls, data: Mapping) -> dict:
        """A speedrun ``config.json`` (or checkpoint config) written before the typed config: the
        recipe dict with ``tta`` (on/off) beside the trainer's ``tta_flip`` / ``tta_shift`` that
        were derived from it (``tta_flip = tta``, ``tta_shift = 1 if tta else 0``). ``tta`` is
        dropped; the derived pair is kept, or derived again where it is absent."""
        data = dict(data)
        if "tta" in data:
            tta = data.pop("tta")
            data.setdefault("tta_flip", bool(tta))
            data.setdefault("tta_shift", 1 if tta else 0)
        return data


#: airbench94's values (hyp of airbench94.py), ours where the trainer differs: whole epochs (10
#: instead of 9.9) and bfloat16 autocast with channels-last (airbench: fp16 on a GPU); the test-time
#: views are the mirror and the 1-pixel translations, weighted as airbench weights them.
RECIPE = SpeedrunConfig(epochs=10, batch_size=1024, bf16=True, channels_last=True, tta_flip=True,
                        tta_shift=1, tta_shift_weight=0.5)

#: The CPU recipe (``--recipe cpu``, docs/speedrun.md "A CPU recipe"): airbench94's net and
#: per-example hyperparameters at batch 512 (twice the updates per epoch), with the statistics
#: that count steps rescaled to keep their horizon in examples (batch norm momentum
#: ``1 - 0.6^(B/1024)``, a lookahead pull every ``5 * 1024 / B`` steps), 7 epochs, and the
#: held-out splits evaluated once, after the last epoch.
CPU_RECIPE = RECIPE.replace(batch_size=512, epochs=7, bn_momentum=round(1 - 0.6 ** (512 / 1024), 4),
                            lookahead_every=10, eval_every_epoch=False)

#: ``--recipe``: the values a new run's flags are laid over.
RECIPES = {"airbench94": RECIPE, "cpu": CPU_RECIPE}
