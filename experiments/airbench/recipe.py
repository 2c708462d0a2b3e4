"""The airbench94 recipe (Jordan 2024, arXiv 2404.00498) as a config, and its parts built from it.

:data:`RECIPE` holds airbench94's values; each part can be switched off for an ablation
(docs/speedrun.md lists the flags). The hyperparameters are airbench's *decoupled* ones:

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
from nets.airbench import ACTIVATIONS, whiten_width
from nets.whitening import whitening_filters

from ..cifar.recipes import parse_val_split, whitening_images
from ..data.augment import flip_mask, normalize, random_crop, random_flip
from ..data.cifar10 import CIFAR10_MEAN, CIFAR10_STD
from ..train import run_keys
from ..train.checks import number_in, whole_number
from ..train.loop import check_loop_config

__all__ = ["RECIPE", "MODEL", "check_config", "derived_rates", "param_labels", "build_optimizer",
           "build_net", "whitening_images", "augmenter", "alternating_flip", "ALT_FLIP",
           "fit_config"]

MODEL = "airbench94"

#: airbench94's values (hyp of airbench94.py), ours where the trainer differs: whole epochs (10
#: instead of 9.9) and bfloat16 autocast with channels-last on the CPU (airbench: fp16 on a GPU).
RECIPE = dict(
    model=MODEL, seed=0, device="auto", val_split="0", limit_per_class=None, eval_batch_size=1000,
    bf16=True, channels_last=True, compile=False, retain_freed_memory=True,
    epochs=10, batch_size=1024, lr=11.5, momentum=0.85, nesterov=True, weight_decay=0.0153,
    bias_scaler=64.0, label_smoothing=0.2, schedule="triangular", peak_fraction=0.23,
    start_factor=0.2, end_factor=0.07,
    widths=[64, 256, 256], activation="gelu", bn_momentum=0.4, bn_eps=1e-12, bn_scale=False,
    scale=1 / 9, whiten=True, whiten_eps=5e-4, whiten_images=5000, whiten_bias_epochs=3,
    flip=True, alt_flip=True, translate=2, lookahead=True, lookahead_every=5,
    lookahead_decay=0.95 ** 5, tta=True, tta_shift_weight=0.5,
)

SCHEDULES = ("triangular", "constant")
#: Purpose folded into the run's train key for the alternating flip's per-image choice (a key
#: of its own: the epoch keys of :mod:`experiments.train.keys` fold in epoch numbers).
ALT_FLIP = 1 << 20


def check_config(cfg: dict) -> None:
    """Refuse (ValueError, one line naming the flag) any value the run could not use."""
    whole_number(cfg.get("epochs"), "epochs")
    whole_number(cfg.get("batch_size"), "batch_size")
    whole_number(cfg.get("seed"), "seed", 0)
    if cfg.get("limit_per_class") is not None:
        whole_number(cfg["limit_per_class"], "limit_per_class")
    number_in(cfg.get("lr"), "lr", low=0, low_open=True)
    number_in(cfg.get("momentum"), "momentum", low=0, high=1, high_open=True)
    number_in(cfg.get("weight_decay"), "weight_decay", low=0)
    number_in(cfg.get("bias_scaler"), "bias_scaler", low=0, low_open=True)
    number_in(cfg.get("label_smoothing"), "label_smoothing", low=0, high=1)
    if cfg.get("schedule") not in SCHEDULES:
        raise ValueError(f"--schedule: expected one of {SCHEDULES}, got {cfg.get('schedule')!r}")
    number_in(cfg.get("peak_fraction"), "peak_fraction", low=0, high=1, high_open=True)
    if cfg.get("nesterov") and cfg["momentum"] == 0:
        raise ValueError("--nesterov: expected --momentum > 0 (Nesterov needs momentum), got 0")
    if cfg.get("activation") not in ACTIVATIONS:
        raise ValueError(f"--activation: expected one of {sorted(ACTIVATIONS)}, "
                         f"got {cfg.get('activation')!r}")
    widths = cfg.get("widths")
    if not isinstance(widths, (list, tuple)) or len(widths) != 3 or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ValueError(f"--widths: expected three whole numbers >= 1 (e.g. 64,256,256), got {widths!r}")
    whole_number(cfg.get("translate"), "translate", 0, unit=" of pixels")
    if cfg["translate"] >= 16:
        raise ValueError(f"--translate: expected fewer than 16 pixels (reflection padding of a "
                         f"32x32 image), got {cfg['translate']}")
    whole_number(cfg.get("whiten_bias_epochs"), "whiten_bias_epochs", 0)
    whole_number(cfg.get("whiten_images"), "whiten_images")
    number_in(cfg.get("whiten_eps"), "whiten_eps", low=0, low_open=True)
    whole_number(cfg.get("lookahead_every"), "lookahead_every")
    number_in(cfg.get("lookahead_decay"), "lookahead_decay", low=0, high=1)
    parse_val_split(cfg.get("val_split"))
    check_loop_config(fit_config(cfg))


def fit_config(cfg: dict) -> dict:
    """The config handed to :func:`~experiments.train.fit`: the recipe's, with its TTA as the
    trainer's ``tta_flip`` / ``tta_shift`` (mirror, and translations by one pixel); the recipe's
    ``tta_shift_weight`` 1/2 is airbench's weighting (the unshifted pair 1/4 each, the four
    shifted views 1/8 each; a run saved before it existed has none: every view 1/6)."""
    return {**cfg, "tta_flip": bool(cfg["tta"]), "tta_shift": 1 if cfg["tta"] else 0}


def derived_rates(cfg: dict) -> dict:
    """``{group: (lr_mean, wd_mean)}`` for ``other`` and ``norm_bias``: airbench's decoupled
    ``lr``, ``weight_decay`` as the rates of SGD on the mean loss (module docstring)."""
    s = 1024 * (1 + 1 / (1 - cfg["momentum"]))
    out = {}
    for group, lr_group in (("other", cfg["lr"]), ("norm_bias", cfg["lr"] * cfg["bias_scaler"])):
        out[group] = (cfg["batch_size"] * lr_group / s, cfg["weight_decay"] / lr_group)
    return out


def param_labels(cfg: dict):
    """``params -> {name: label}``: ``frozen``, ``norm_bias``, ``whiten_bias`` or ``other``."""
    def labels(params):
        out = {}
        for name in params:
            if name == "0.weight":
                out[name] = "frozen" if cfg["whiten"] else "other"
            elif name == "0.bias":
                out[name] = "whiten_bias"
            elif ".norm" in name:
                trained = name.endswith(".bias") or cfg["bn_scale"]
                out[name] = ("norm_bias" if name.endswith(".bias") else "other") if trained else "frozen"
            else:
                out[name] = "other"
        return out
    return labels


def build_optimizer(cfg: dict, steps_per_epoch: int) -> optim.GradientTransformation:
    """Nesterov SGD with :func:`derived_rates` per parameter group, the triangular schedule
    (``optim.triangular_schedule``; ``schedule="constant"``: the peak rate throughout) over
    ``epochs * steps_per_epoch`` updates; the whitening bias's rate drops to 0 after
    ``whiten_bias_epochs`` epochs (airbench turns its ``requires_grad`` off)."""
    total = cfg["epochs"] * steps_per_epoch

    def rate(peak):
        if cfg["schedule"] == "constant":
            return peak
        return optim.triangular_schedule(peak, total, cfg["peak_fraction"], cfg["start_factor"],
                                         cfg["end_factor"])

    def sgd(lr, wd):
        return optim.sgd(lr, momentum=cfg["momentum"], nesterov=bool(cfg["nesterov"]), weight_decay=wd)

    rates = derived_rates(cfg)
    cut = cfg["whiten_bias_epochs"] * steps_per_epoch
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


def build_net(cfg: dict, train_images: torch.Tensor | None, num_classes: int = 10) -> nets.Net:
    """The airbench net of ``cfg``; with ``whiten``, layer 0's filters are
    ``nets.whitening.whitening_filters`` of :func:`whitening_images` (``train_images`` None: zero
    filters of the right shape, for a net whose parameters come from a checkpoint)."""
    filters = None
    if cfg["whiten"]:
        if train_images is None:
            filters = torch.zeros(whiten_width(), 3, 2, 2)
        else:
            filters = whitening_filters(
                whitening_images(train_images, cfg["whiten_images"]), 2, eps=cfg["whiten_eps"])
    return nets.airbench(num_classes, widths=cfg["widths"], whiten=filters,
                         activation=cfg["activation"], bn_momentum=cfg["bn_momentum"],
                         bn_eps=cfg["bn_eps"], scale=cfg["scale"])


def augmenter(cfg: dict):
    """``(key, uint8 batch) -> normalised float batch``: translate by up to ``translate`` pixels
    (reflection padding, ``random_crop(mode="reflect")``, key ``fold_in(key, 0)``) and, when the
    flip is on but not alternating, a random mirror per image (``fold_in(key, 1)``)."""
    translate, per_batch_flip = int(cfg["translate"]), bool(cfg["flip"]) and not cfg["alt_flip"]

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
