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

from layers._checks import check_probability

from ..data.augment import augment_batch, normalize
from ..data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, find_data_dir, load_cifar10, validation_split
from ..train import run_keys
from ..train.build import check_training_config
from ..train.checks import whole_number
from ..train.runs import MODELS as REGISTRY
from ..train.runs import build_model

__all__ = ["RECIPES", "MODELS", "COMMON", "check_config", "build_net", "augmenter", "prepare",
           "load_data", "split_train", "parse_val_split"]

MODELS = ("cifar_model_a", "cifar_model_b", "cifar_model_c")

# Settings every recipe shares unless it says otherwise.
COMMON = dict(seed=0, device="auto", val_split="5000", limit_per_class=None, eval_batch_size=1000,
               bf16=True, channels_last=True, compile=False, crop=4, flip=True,
               retain_freed_memory=True, tta_shift=0, cutout=0, telemetry=0)

# "report": the report's conditions as far as its text states them; the rest is our default.
# Its data section names two dataloader transforms, "normalization of pixel values, random
# flipping of images": so normalise + random horizontal flip, and no crop (not named).
_REPORT = dict(optimizer="adam", lr=1e-3, momentum=0.0, nesterov=False, weight_decay=0.0,
               decay_mask=False, schedule="constant", label_smoothing=0.0, crop=0, flip=True,
               tta_flip=False, epochs=20)

# "fast": SGD + Nesterov, one-cycle, label smoothing, crop + flip, decay mask, flip TTA. It trains
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
        "fast": {**COMMON, **_FAST, "lr": 0.4, "epochs": 50, "dropout": 0.1, "head_dropout": 0.2},
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


def build_net(cfg: dict, num_classes: int = 10):
    """The config's net: ``nets.model_a/b/c(num_classes, ...)`` (the registry of
    :mod:`experiments.train.runs`)."""
    return build_model(cfg["model"], num_classes, cfg)


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


