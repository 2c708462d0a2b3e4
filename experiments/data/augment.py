"""Batch augmentation on the training device: random crop with zero padding, horizontal flip,
normalisation, optional cutout. Every draw comes from an explicit key (``layers.random``); no loop
over images.

The usual CIFAR pipeline (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``,
``ToTensor()``, ``Normalize(mean, std)``) applied to a whole ``(N, C, H, W)`` batch at once, and
cutout (DeVries & Taylor, 2017: one square per image set to 0 after normalisation, i.e. to the
data set's mean colour).

Inside :func:`layers.parallel.batch_axis` a batch is this process's rows of the global batch,
and each row gets the draws the global batch gives it (the offsets of :mod:`layers.random`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from layers import parallel
from layers import random as jr

from .cifar10 import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["random_crop", "random_flip", "random_cutout", "normalize", "augment_batch", "crop_offsets",
           "flip_mask", "cutout_mask"]


def _check_batch(fn: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: expected a batch (N, C, H, W), got {got}")


def crop_offsets(key: torch.Tensor, n: int, padding: int) -> torch.Tensor:
    """``(n, 2)`` int64 crop corners ``(dy, dx)``, each uniform on ``{0, ..., 2 * padding}``."""
    return jr.randint(key, (n, 2), 0, 2 * padding + 1,
                      offset=parallel.row_offset((n, 2), "crop_offsets"))


def flip_mask(key: torch.Tensor, n: int) -> torch.Tensor:
    """``(n,)`` bool, each true with probability 1/2: which images get mirrored."""
    return jr.bernoulli(key, 0.5, (n,), offset=parallel.row_offset((n,), "flip_mask"))


def random_crop(key: torch.Tensor, x: torch.Tensor, padding: int = 4, *,
                mode: str = "constant") -> torch.Tensor:
    """Zero-pad each image by ``padding`` on every side, then cut an ``H x W`` window at a random corner.

    ``y[n, c, i, j] = pad(x)[n, c, dy_n + i, dx_n + j]`` with ``(dy_n, dx_n)`` from
    :func:`crop_offsets`; one gather over the padded batch. Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    ``mode="reflect"`` pads by reflection instead of zeros (``F.pad``'s modes): a random
    translation by up to ``padding`` pixels that invents no border value (airbench's translate).
    """
    _check_batch("random_crop", x)
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"random_crop: expected padding a non-negative int, got {padding!r}")
    if padding == 0:
        return x
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4, mode=mode)
    off = crop_offsets(key, n, padding).to(x.device)
    rows = off[:, 0, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = off[:, 1, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def random_flip(key: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2: ``torch.where(flip[n], x[..., ::-1], x)``."""
    _check_batch("random_flip", x)
    flip = flip_mask(key, x.shape[0]).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def cutout_mask(key: torch.Tensor, n: int, h: int, w: int, size: int,
                device: torch.device | str | None = None) -> torch.Tensor:
    """``(n, 1, h, w)`` bool: a ``size x size`` square per image, clipped at the border.

    The square covers rows ``cy - size // 2 <= i < cy - size // 2 + size`` (columns alike), with
    its centre ``(cy, cx)`` uniform on ``{0..h-1} x {0..w-1}``, so near the border only part of it
    lies in the image, as in the paper.
    """
    first = parallel.row_offset((n,), "cutout_mask")
    cy = jr.randint(jr.fold_in(key, 0), (n,), 0, h, device=device, offset=first)
    cx = jr.randint(jr.fold_in(key, 1), (n,), 0, w, device=device, offset=first)
    # (n, h) and (n, w): each pixel's offset into its image's square
    rows = torch.arange(h, device=cy.device)[None, :] - (cy - size // 2)[:, None]
    cols = torch.arange(w, device=cx.device)[None, :] - (cx - size // 2)[:, None]
    inside_r = (rows >= 0) & (rows < size)
    inside_c = (cols >= 0) & (cols < size)
    return (inside_r[:, :, None] & inside_c[:, None, :])[:, None]


def random_cutout(key: torch.Tensor, x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with the square :func:`cutout_mask` of each image set to 0 (every channel).

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``; ``size = 0`` returns ``x``.
    """
    _check_batch("random_cutout", x)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"random_cutout: expected size a non-negative int, got {size!r}")
    if size == 0:
        return x
    n, _, h, w = x.shape
    return x.masked_fill(cutout_mask(key, n, h, w, size, device=x.device), 0)


def normalize(x: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(x / 255 - mean[c]) / std[c]`` for a uint8 batch ``(N, C, H, W)``; a float batch is taken as in [0, 1]."""
    _check_batch("normalize", x)
    if x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalize: expected {len(mean)} channels (mean has {len(mean)}, std {len(std)}), "
                         f"got {tuple(x.shape)}")
    y = x.to(dtype) / 255.0 if x.dtype == torch.uint8 else x.to(dtype)
    m = torch.tensor(mean, dtype=dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=dtype, device=x.device)[:, None, None]
    return (y - m) / s


def augment_batch(key: torch.Tensor, x: torch.Tensor, *, crop: int = 4, flip: bool = True,
                  cutout: int = 0, mean: Sequence[float] = CIFAR10_MEAN,
                  std: Sequence[float] = CIFAR10_STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Crop (``crop`` pixels of zero padding, 0 for none), flip, :func:`normalize` a uint8 batch,
    then cut out a ``cutout``-pixel square (0 for none).

    The crop, flip and cutout keys are ``fold_in(key, 0)``, ``fold_in(key, 1)`` and
    ``fold_in(key, 2)``. Padding happens on the raw pixels, so padded pixels normalise to
    ``-mean / std`` exactly as in the torchvision pipeline; cutout happens after normalisation, so
    its pixels are 0, the mean colour.
    """
    if crop:
        x = random_crop(jr.fold_in(key, 0), x, crop)
    if flip:
        x = random_flip(jr.fold_in(key, 1), x)
    x = normalize(x, mean, std, dtype=dtype)
    return random_cutout(jr.fold_in(key, 2), x, cutout) if cutout else x
