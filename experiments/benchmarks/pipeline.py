"""Data-pipeline throughput: our whole-batch tensor pipeline against a torchvision DataLoader.

* ours: the training loop's path in :func:`experiments.train.loop.fit` - a shuffle permutation from
  a key, then per batch ``augment_batch(key, images[idx])`` (index gather, random crop with
  4 pixels of zero padding, horizontal flip, normalise) on the uint8 cache tensor, on the device;
* torchvision: ``DataLoader(batch_size, shuffle=True, num_workers=w)`` over an in-memory dataset
  of the same images (HWC uint8 arrays made into PIL images, as ``torchvision.datasets.CIFAR10``
  does) with ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``,
  ``Normalize(mean, std)`` per image; batches are moved to the device.

Each measures images/s over one epoch (last partial batch dropped), after one warm-up epoch
(which also starts the DataLoader's persistent workers), the pipelines interleaved epoch by epoch.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from layers import random as jr

from ..data.augment import augment_batch
from ..data.cifar10 import CIFAR10_MEAN, CIFAR10_STD
from .timing import interleaved, median

__all__ = ["InMemoryImages", "random_images", "ours_epoch", "torchvision_loader", "bench_pipeline"]


class InMemoryImages(torch.utils.data.Dataset):
    """``(N, H, W, C)`` uint8 images and labels held in memory; ``[i]`` is ``(transform(PIL), label)``."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def random_images(n: int, seed: int = 0, side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 3, side, side)`` uint8 images and ``(n,)`` labels in 0..9 (pipeline cost does not
    depend on the pixel values)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=g))


def ours_epoch(images: torch.Tensor, labels: torch.Tensor, batch: int, key: torch.Tensor) -> int:
    """One epoch of our pipeline over ``images`` (on their device); returns the images produced."""
    n = len(labels)
    order = jr.permutation(jr.fold_in(key, 0), n).to(images.device)
    step_root = jr.fold_in(key, 1)
    done = 0
    for s in range(n // batch):
        idx = order[s * batch:(s + 1) * batch]
        x = augment_batch(jr.fold_in(step_root, s).to(images.device), images[idx])
        y = labels[idx]
        done += min(x.shape[0], y.shape[0])
    return done


def torchvision_loader(images: torch.Tensor, labels: torch.Tensor, batch: int, workers: int):
    """The usual per-image torchvision pipeline over the same images, as a DataLoader."""
    import torchvision.transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    data = InMemoryImages(images.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy(), transform)
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(0))


def _loader_epoch(loader, device: torch.device):
    def run():
        for x, y in loader:
            x.to(device), y.to(device)
    return run


def bench_pipeline(n: int, batch: int, rounds: int, device: torch.device | str = "cpu",
                   workers: tuple[int, ...] = (0, 2)) -> dict[str, float]:
    """Images/s of each pipeline, median over ``rounds`` interleaved epochs of ``n`` images.

    Keys: ``"ours (whole-batch tensors)"`` and ``"torchvision DataLoader, num_workers=w"``.
    """
    device = torch.device(device)
    if n < batch:
        raise ValueError(f"bench_pipeline: expected at least one batch of {batch} images, got n={n}")
    images, labels = random_images(n)
    per_epoch = (n // batch) * batch
    dev_images, dev_labels = images.to(device), labels.to(device)
    key = jr.key(0)
    fns = {"ours (whole-batch tensors)": lambda: ours_epoch(dev_images, dev_labels, batch, key)}
    loaders = {w: torchvision_loader(images, labels, batch, w) for w in workers}
    for w, loader in loaders.items():
        fns[f"torchvision DataLoader, num_workers={w}"] = _loader_epoch(loader, device)
    try:
        for fn in fns.values():  # warm-up epoch; starts the persistent workers
            fn()
        times = interleaved(fns, rounds, device)
    finally:
        for loader in loaders.values():
            it = getattr(loader, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
    return {name: per_epoch / median(ts) for name, ts in times.items()}
