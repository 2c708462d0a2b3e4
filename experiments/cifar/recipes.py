"""What turns a CIFAR-10 run's config into its parts: the net, the data, CIFAR-10's
normalisation (:func:`prepare`) and training augmentation (:func:`augmenter`), which the trainer
receives as functions. The recipes themselves are typed configs in :mod:`experiments.cifar.config`.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial
from typing import Protocol

import torch

from nets.whitening import whitened_init, whitening_filters

from ..data.augment import augment_batch, normalize
from ..data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, find_data_dir, load_cifar10, validation_split
from ..data.settings import DataSettings, parse_val_split
from ..train import run_keys
from ..train.registry import build_net as registry_net
from .config import CifarConfig

__all__ = ["build_net", "augmenter", "prepare", "load_data", "resolve_data_dir", "split_train",
           "whitening_images", "FIRST_CONV"]


class _Augmented(Protocol):
    crop: int
    flip: bool
    cutout: int


#: The first convolution's weight in Models A, B and C: what ``whiten_init`` initialises.
FIRST_CONV = "features.0.weight"


def build_net(cfg: CifarConfig, num_classes: int = 10, train_images: torch.Tensor | None = None):
    """The config's net: ``nets.model_a/b/c(num_classes, **cfg.net_options())`` (the registry,
    :mod:`experiments.train.registry`).

    With ``whiten_init`` and ``train_images`` (uint8 ``(N, 3, 32, 32)``, the training split), the
    first convolution starts from the whitening filters of 3x3 patches of
    :func:`whitening_images` (``nets.whitening.whitened_init``: 2 x 27 of its 64 filters, rescaled
    to the initialiser's norm, then trained). ``train_images`` None: the plain init (a run whose
    parameters come from its checkpoint).
    """
    net = registry_net(cfg.model, num_classes, cfg.net_options())
    if cfg.whiten_init and train_images is not None:
        filters = whitening_filters(whitening_images(train_images, cfg.whiten_images), 3,
                                    eps=cfg.whiten_eps)
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


def augmenter(cfg: _Augmented):
    """``(key, uint8 batch) -> normalised float batch``: the config's crop, flip and cutout, then
    CIFAR-10's normalisation (:func:`experiments.data.augment.augment_batch`)."""
    return partial(augment_batch, crop=cfg.crop, flip=cfg.flip, cutout=cfg.cutout,
                   mean=CIFAR10_MEAN, std=CIFAR10_STD)


def prepare(x):
    """A uint8 CIFAR-10 batch as the net's input: ``(x / 255 - mean) / std`` per channel."""
    return normalize(x, CIFAR10_MEAN, CIFAR10_STD)


def split_train(full, cfg: DataSettings):
    """``(train, val)`` of the train split ``full`` as the run ``cfg`` carves it (val None: no split).

    The split depends only on ``cfg.val_split``, ``cfg.seed`` and ``full``'s labels, so
    ``experiments.evaluate --split val`` rebuilds a run's validation images exactly.
    """
    val_size = parse_val_split(cfg.val_split)
    if not val_size:
        return full, None
    tr_idx, va_idx = validation_split(full.labels, val_size, run_keys(cfg.seed).split,
                                      num_classes=len(full.classes))
    return full.subset(tr_idx), full.subset(va_idx)


def resolve_data_dir(cfg: DataSettings) -> DataSettings:
    """``cfg`` with ``data_dir`` the absolute CIFAR-10 folder it reads (``--data-dir``, else
    ``$CIFAR10_DIR``, else ``./data``): what the run records. DataNotFoundError (one line) when
    there is none."""
    return replace(cfg, data_dir=str(find_data_dir(cfg.data_dir).resolve()))


def load_data(cfg: DataSettings, *, progress: bool = True, say: bool = True):
    """``(train, val, test)`` datasets for ``cfg`` (val / test may be None); ``say`` prints the
    data line (rank 0 of a torchrun job only)."""
    root = find_data_dir(cfg.data_dir)
    full = load_cifar10(root, "train", limit_per_class=cfg.limit_per_class, progress=progress)
    train, val = split_train(full, cfg)
    test = (load_cifar10(root, "test", limit_per_class=cfg.limit_per_class, progress=progress)
            if cfg.test else None)
    if say:
        print(f"data: {root.resolve()} train {len(train.labels)}, val {len(val.labels) if val else 0}, "
              f"test {len(test.labels) if test else 0}", file=sys.stderr)
    return train, val, test
