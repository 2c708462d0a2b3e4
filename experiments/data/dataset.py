"""A labelled split held in memory: what the trainer, the evaluation and the studies pass around."""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Dataset"]


class Dataset(NamedTuple):
    """One split: ``images (N, ...)`` (uint8 images, or features: any tensor with N rows),
    ``labels (N,) int64`` in ``0 .. len(classes) - 1``, and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def subset(self, index: torch.Tensor) -> "Dataset":
        """The rows ``index`` (a 1-D int64 tensor) of this split, same classes."""
        return Dataset(self.images[index], self.labels[index], self.classes)
