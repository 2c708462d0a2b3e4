"""The CIFAR-10 recipes of Models A, B and C, and what turns a recipe into a run's parts.

A *recipe* is a dict of hyperparameters (docs/training.md gives every value and its reason);
command-line flags override single entries (:mod:`experiments.cifar.cli`). The resolved dict is
the run's config: it is written to ``runs/<name>/config.json`` and into every checkpoint, so
``--resume`` and ``experiments.evaluate`` rebuild exactly the same net and optimizer from it.

The data set's part lives here too: CIFAR-10's normalisation (:func:`prepare`) and its training
augmentation (:func:`augmenter`), which the trainer receives as functions.
"""
from __future__ import annotations

import sys
from functools import partial

import torch

from layers._checks import check_probability
from nets.whitening import whitened_init, whitening_filters

from ..data.augment import augment_batch, normalize
from ..data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, find_data_dir, load_cifar10, validation_split
from ..train import run_keys
from ..train.build import check_training_config
from ..train.checks import number_in, whole_number
from ..train.runs import MODELS as REGISTRY
from ..train.runs import build_model

__all__ = ["RECIPES", "MODELS", "COMMON", "check_config", "build_net", "augmenter", "prepare",
           "load_data", "split_train", "parse_val_split", "whitening_images", "FIRST_CONV"]

MODELS = ("cifar_model_a", "cifar_model_b", "cifar_model_c")

# Settings every recipe shares unless it says otherwise.
COMMON = dict(seed=0, device="auto", val_split="5000", limit_per_class=None, eval_batch_size=1000,
               bf16=True, channels_last=True, compile=False, crop=4, flip=True,
               retain_freed_memory=True, tta_shift=0, cutout=0, telemetry=0,
               bn_momentum=0.1, bn_eps=1e-5, lookahead=False, lookahead_every=5,
               lookahead_decay=0.95 ** 5, whiten_init=False, whiten_images=5000, whiten_eps=5e-4)

# "report": the report's conditions as far as its text states them; the rest is our default.
# Its data section names two dataloader transforms, "normalization of pixel values, random
# flipping of images": so normalise + random horizontal flip, and no crop (not named).
_REPORT = dict(optimizer="adam", lr=1e-3, momentum=0.0, nesterov=False, weight_decay=0.0,
               decay_mask=False, schedule="constant", label_smoothing=0.0, crop=0, flip=True,
               tta_flip=False, epochs=20)

# "fast": SGD + Nesterov, one-cycle, label smoothing, crop + flip, decay mask, flip TTA (C: with
# the views moved by one pixel too, chosen on its validation split, docs/results.md). It trains
# on all 50,000 train images: its choices were made on 45,000 / 5,000 runs (``--val-split 5000``,
# docs/results.md), and the final recipe gets the held-out images back.
_FAST = dict(val_split="0", optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4, decay_mask=True,
             schedule="onecycle", pct_start=0.25, div_factor=10.0, final_div_factor=100.0,
             label_smoothing=0.1, tta_flip=True, batch_size=512)

RECIPES: dict[str, dict[str, dict]] = {
    "cifar_model_a": {
        "report": {**COMMON, **_REPORT, "batch_size": 32},
        "fast": {**COMMON, **_FAST, "lr": 0.2, "epochs": 30},
    },
    "cifar_model_b": {
        "report": {**COMMON, **_REPORT, "batch_size": 125, "dropout": 0.1, "head_dropout": 0.2},
        "fast": {**COMMON, **_FAST, "lr": 0.4, "epochs": 45, "dropout": 0.1, "head_dropout": 0.2},
    },
    "cifar_model_c": {
        "report": {**COMMON, **_REPORT, "batch_size": 125, "dropout": 0.1, "head_dropout": 0.2},
        "fast": {**COMMON, **_FAST, "lr": 0.4, "epochs": 50, "dropout": 0.1, "head_dropout": 0.2,
                 "tta_shift": 1},
    },
}


def parse_val_split(text: str | float | int | None) -> float | int:
    """``"0.1"`` -> 0.1 (a fraction), ``"5000"`` -> 5000 (a count), None/``"0"`` -> 0 (no split)."""
    if text is None:
        return 0
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--val-split: expected a fraction in [0, 1) or a whole count, got {text!r}") from None
    if value >= 1 or value == 0:
        if value != int(value):
            raise ValueError(f"--val-split: expected a fraction in [0, 1) or a whole count, got {text!r}")
        return int(value)
    if value < 0:
        raise ValueError(f"--val-split: expected a fraction in [0, 1) or a whole count, got {text!r}")
    return value


def check_config(cfg: dict) -> None:
    """Refuse (ValueError, one line naming the flag) a config that could not train: every
    hyperparameter is checked here, before the run folder is created."""
    if cfg.get("model") not in REGISTRY:
        raise ValueError(f"model: expected one of {sorted(REGISTRY)}, got {cfg.get('model')!r}")
    for name in ("crop", "cutout", "tta_shift"):
        whole_number(cfg.get(name), name, 0, unit=" of pixels")
    # The speedrun's tricks (docs/training.md); COMMON's values for configs saved before them.
    value = {k: cfg.get(k, COMMON[k]) for k in ("bn_momentum", "bn_eps", "lookahead_every",
                                                  "lookahead_decay", "whiten_images", "whiten_eps",
                                                  "lookahead", "whiten_init")}
    number_in(value["bn_momentum"], "bn_momentum", low=0, high=1)
    number_in(value["bn_eps"], "bn_eps", low=0, low_open=True)
    whole_number(value["lookahead_every"], "lookahead_every")
    number_in(value["lookahead_decay"], "lookahead_decay", low=0, high=1)
    whole_number(value["whiten_images"], "whiten_images")
    number_in(value["whiten_eps"], "whiten_eps", low=0, low_open=True)
    for name in ("lookahead", "whiten_init"):
        if not isinstance(value[name], bool):
            raise ValueError(f"{name}: expected true or false, got {cfg.get(name)!r}")
    check_training_config(cfg)
    whole_number(cfg.get("seed"), "seed", 0)
    if cfg.get("limit_per_class") is not None:
        whole_number(cfg["limit_per_class"], "limit_per_class")
    for name in ("dropout", "head_dropout"):
        try:
            check_probability(cfg.get(name, 0.0), name, "a drop probability", below_one=True)
        except TypeError as err:
            raise ValueError(str(err)) from None
    parse_val_split(cfg.get("val_split"))


#: The first convolution's weight in Models A, B and C: what ``whiten_init`` initialises.
FIRST_CONV = "features.0.weight"


def build_net(cfg: dict, num_classes: int = 10, train_images: torch.Tensor | None = None):
    """The config's net: ``nets.model_a/b/c(num_classes, ...)`` (the registry of
    :mod:`experiments.train.runs`).

    With ``whiten_init`` and ``train_images`` (uint8 ``(N, 3, 32, 32)``, the training split), the
    first convolution starts from the whitening filters of 3x3 patches of
    :func:`whitening_images` (``nets.whitening.whitened_init``: 2 x 27 of its 64 filters, rescaled
    to the initialiser's norm, then trained). ``train_images`` None: the plain init (a run whose
    parameters come from its checkpoint).
    """
    net = build_model(cfg["model"], num_classes, cfg)
    if cfg.get("whiten_init") and train_images is not None:
        count = cfg.get("whiten_images", COMMON["whiten_images"])
        filters = whitening_filters(whitening_images(train_images, count), 3,
                                    eps=cfg.get("whiten_eps", COMMON["whiten_eps"]))
        net = whitened_init(net, FIRST_CONV, filters)
    return net


def whitening_images(images: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` training images evenly spaced through ``images (N, 3, H, W) uint8`` (all of
    them when N <= count), normalised (:func:`prepare`): what whitening filters are computed
    from. Evenly spaced, so a class-ordered split gives every class its share (airbench: the
    first 5000 of its shuffled copy)."""
    n = images.shape[0]
    idx = torch.linspace(0, n - 1, min(count, n)).round().long() if n > count else torch.arange(n)
    return prepare(images[idx])


def augmenter(cfg: dict):
    """``(key, uint8 batch) -> normalised float batch``: the config's crop, flip and cutout, then
    CIFAR-10's normalisation (:func:`experiments.data.augment.augment_batch`)."""
    return partial(augment_batch, crop=int(cfg.get("crop", 4)), flip=bool(cfg.get("flip", True)),
                   cutout=int(cfg.get("cutout", 0)), mean=CIFAR10_MEAN, std=CIFAR10_STD)


def prepare(x):
    """A uint8 CIFAR-10 batch as the net's input: ``(x / 255 - mean) / std`` per channel."""
    return normalize(x, CIFAR10_MEAN, CIFAR10_STD)


def split_train(full, cfg: dict):
    """``(train, val)`` of the train split ``full`` as the run ``cfg`` carves it (val None: no split).

    The split depends only on ``cfg["val_split"]``, ``cfg["seed"]`` and ``full``'s labels, so
    ``experiments.evaluate --split val`` rebuilds a run's validation images exactly.
    """
    val_size = parse_val_split(cfg.get("val_split"))
    if not val_size:
        return full, None
    tr_idx, va_idx = validation_split(full.labels, val_size, run_keys(cfg["seed"]).split,
                                      num_classes=len(full.classes))
    return full.subset(tr_idx), full.subset(va_idx)


def load_data(cfg: dict, *, progress: bool = True):
    """``(train, val, test)`` datasets for ``cfg`` (val / test may be None); records the resolved
    data folder in ``cfg["data_dir"]`` (also when it came from ``$CIFAR10_DIR``)."""
    root = find_data_dir(cfg.get("data_dir"))
    cfg["data_dir"] = str(root.resolve())
    limit = cfg.get("limit_per_class")
    full = load_cifar10(root, "train", limit_per_class=limit, progress=progress)
    train, val = split_train(full, cfg)
    test = load_cifar10(root, "test", limit_per_class=limit, progress=progress) if cfg.get("test", True) else None
    print(f"data: {root.resolve()} train {len(train.labels)}, val {len(val.labels) if val else 0}, "
          f"test {len(test.labels) if test else 0}", file=sys.stderr)
    return train, val, test


