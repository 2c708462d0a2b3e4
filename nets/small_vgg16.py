"""small_vgg16: VGG16's five blocks (2, 2, 3, 3, 3 convolutions) at a quarter of its widths, with
batch norm, for 32x32 images: the net of the CIFAR-10 transfer study (docs/transfer.md).

    (N, 3, 32, 32) -> features (5 blocks, each ending in a 2x2 max-pool) -> (N, 128, 1, 1)
                   -> classifier -> (N, num_classes)
"""
from __future__ import annotations

from typing import Sequence

from .compose import Net
from .vgg_like import vgg_like

__all__ = ["SMALL_VGG16_WIDTHS", "VGG16_CONVS_PER_BLOCK", "small_vgg16"]

#: Widths of small_vgg16's five blocks: a quarter of VGG16's (64, 128, 256, 512, 512).
SMALL_VGG16_WIDTHS = (16, 32, 64, 128, 128)
#: VGG16's convolutions per block (configuration D).
VGG16_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


def small_vgg16(num_classes: int = 5, widths: Sequence[int] = SMALL_VGG16_WIDTHS) -> Net:
    """VGG16's five blocks at ``widths``, batch norm, dropout 0.1 after each block and 0.2 in the
    head; see :func:`nets.vgg_like` for the layers. ``(N, 3, 32, 32) -> (N, num_classes)``."""
    if len(widths) != 5:
        raise ValueError(f"small_vgg16: expected 5 block widths, got {tuple(widths)}")
    blocks = tuple((w,) * c for w, c in zip(widths, VGG16_CONVS_PER_BLOCK))
    return vgg_like(blocks, num_classes=num_classes, dropout=0.1, head_dropout=0.2,
                    name="small_vgg16")
