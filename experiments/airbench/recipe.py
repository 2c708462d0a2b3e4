"""The parts of a speedrun built from its config (:class:`~experiments.airbench.config.SpeedrunConfig`,
airbench94's values in :data:`~experiments.airbench.config.RECIPE`; docs/speedrun.md lists the
flags that switch each part off). The hyperparameters are airbench's *decoupled* ones:

    lr = 11.5     learning rate per 1024 examples
    wd = 0.0153   weight decay per 1024 examples, decoupled from the learning rate
    momentum 0.85 (Nesterov), bias_scaler 64 (batch-norm biases only)

airbench feeds torch's SGD the *sum* of the per-example losses with ``lr_sum = lr / s`` and
``wd_sum = wd B / s / lr_group`` (``s = 1024 (1 + 1 / (1 - momentum))``, ``B`` the batch). Our
trainer takes the *mean* loss; since ``grad(sum) = B grad(mean)``, the same trajectory comes from

    lr_mean = B lr_group / s,     wd_mean = wd / lr_group        (lr_group = lr, or lr * bias_scaler)

(coupled decay as torch: ``g + wd_mean p``; the decay per step ``lr_mean wd_mean = wd B / s`` is the
same for every group). Parameter groups (:func:`param_labels`): ``frozen`` (the whitening weight
and every batch norm's scale, which airbench does not train), ``norm_bias`` (lr x bias_scaler),
``whiten_bias`` (trained for the first ``whiten_bias_epochs`` epochs only) and ``other``.
"""
from __future__ import annotations

import torch

import nets
import optim
from layers import random as jr
from nets.airbench import whiten_width
from nets.whitening import whitening_filters

from ..cifar.recipes import whitening_images
from ..data.augment import flip_mask, normalize, random_crop, random_flip
from ..data.cifar10 import CIFAR10_MEAN, CIFAR10_STD
from ..train import run_keys
from .config import MODEL, RECIPE, SpeedrunConfig

__all__ = ["RECIPE", "MODEL", "derived_rates", "param_labels", "build_optimizer", "build_net",
           "whitening_images", "augmenter", "alternating_flip", "ALT_FLIP"]

#: Purpose folded into the run's train key for the alternating flip's per-image choice (a key
#: of its own: the epoch keys of :mod:`experiments.train.keys` fold in epoch numbers).
ALT_FLIP = 1 << 20


def derived_rates(cfg: SpeedrunConfig) -> dict:
    """``{group: (lr_mean, wd_mean)}`` for ``other`` and ``norm_bias``: airbench's decoupled
    ``lr``, ``weight_decay`` as the rates of SGD on the mean loss (module docstring)."""
    s = 1024 * (1 + 1 / (1 - cfg.momentum))
    out = {}
    for group, lr_group in (("other", cfg.lr), ("norm_bias", cfg.lr * cfg.bias_scaler)):
        out[group] = (cfg.batch_size * lr_group / s, cfg.weight_decay / lr_group)
    return out


def param_labels(cfg: SpeedrunConfig):
    """``params -> {name: label}``: ``frozen``, ``norm_bias``, ``whiten_bias`` or ``other``."""
    def labels(params):
        out = {}
        for name in params:
            if name == "0.weight":
                out[name] = "frozen" if cfg.whiten else "other"
            elif name == "0.bias":
                out[name] = "whiten_bias"
            elif ".norm" in name:
                trained = name.endswith(".bias") or cfg.bn_scale
                out[name] = ("norm_bias" if name.endswith(".bias") else "other") if trained else "frozen"
            else:
                out[name] = "other"
        return out
    return labels


def build_optimizer(cfg: SpeedrunConfig, steps_per_epoch: int) -> optim.GradientTransformation:
    """Nesterov SGD with :func:`derived_rates` per parameter group, the triangular schedule
    (``optim.triangular_schedule``; ``schedule="constant"``: the peak rate throughout) over
    ``epochs * steps_per_epoch`` updates; the whitening bias's rate drops to 0 after
    ``whiten_bias_epochs`` epochs (airbench turns its ``requires_grad`` off)."""
    total = cfg.epochs * steps_per_epoch

    def rate(peak):
        if cfg.schedule == "constant":
            return peak
        return optim.triangular_schedule(peak, total, cfg.peak_fraction, cfg.start_factor,
                                         cfg.end_factor)

    def sgd(lr, wd):
        return optim.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)

    rates = derived_rates(cfg)
    cut = cfg.whiten_bias_epochs * steps_per_epoch
    whiten_lr = rate(rates["other"][0])
    if cut < total:
        whiten_lr = optim.join_schedules([whiten_lr if callable(whiten_lr) else optim.constant_schedule(whiten_lr),
                                          optim.constant_schedule(0.0)], [cut])
    # "other" first: the trainer's lr column shows the first learning rate in the state.
    return optim.multi_transform({
        "other": sgd(rate(rates["other"][0]), rates["other"][1]),
        "norm_bias": sgd(rate(rates["norm_bias"][0]), rates["norm_bias"][1]),
        "whiten_bias": sgd(whiten_lr, rates["other"][1]),
        "frozen": optim.set_to_zero(),
    }, param_labels(cfg))


def build_net(cfg: SpeedrunConfig, train_images: torch.Tensor | None, num_classes: int = 10) -> nets.Net:
    """The airbench net of ``cfg``; with ``whiten``, layer 0's filters are
    ``nets.whitening.whitening_filters`` of :func:`whitening_images` (``train_images`` None: zero
    filters of the right shape, for a net whose parameters come from a checkpoint)."""
    filters = None
    if cfg.whiten:
        if train_images is None:
            filters = torch.zeros(whiten_width(), 3, 2, 2)
        else:
            filters = whitening_filters(
                whitening_images(train_images, cfg.whiten_images), 2, eps=cfg.whiten_eps)
    return nets.airbench(num_classes, whiten=filters, **cfg.net_options())


def augmenter(cfg: SpeedrunConfig):
    """``(key, uint8 batch) -> normalised float batch``: translate by up to ``translate`` pixels
    (reflection padding, ``random_crop(mode="reflect")``, key ``fold_in(key, 0)``) and, when the
    flip is on but not alternating, a random mirror per image (``fold_in(key, 1)``)."""
    translate, per_batch_flip = cfg.translate, cfg.flip and not cfg.alt_flip

    def augment(key, x):
        if translate:
            x = random_crop(jr.fold_in(key, 0), x, translate, mode="reflect")
        if per_batch_flip:
            x = random_flip(jr.fold_in(key, 1), x)
        return normalize(x, CIFAR10_MEAN, CIFAR10_STD)
    return augment


def alternating_flip(seed: int):
    """``epoch_images(epoch, images)`` for :class:`~experiments.train.hooks.FitHooks`: image ``i``
    is mirrored in epoch ``e`` exactly when ``m_i XOR (e mod 2)``, with ``m_i`` one fair coin per
    image drawn once for the run (``flip_mask(fold_in(train key, ALT_FLIP), N)``). So every image
    is seen mirrored in every other epoch, starting at random (airbench's alternating flip:
    "more diverse than a fresh coin per epoch")."""
    key = jr.fold_in(run_keys(seed).train, ALT_FLIP)
    cache = {}

    def epoch_images(epoch: int, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if n not in cache:
            cache[n] = flip_mask(key, n)
        mirror = cache[n].to(images.device) ^ bool(epoch % 2)
        return torch.where(mirror[:, None, None, None], images.flip(-1), images)
    return epoch_images
