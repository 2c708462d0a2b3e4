"""The VGG-like family of Models B and C: blocks of conv-BN-ReLU, each closed by a 2x2 max-pool
and dropout, then a global-average-pool head. :func:`vgg_like` builds any member from its widths;
``nets/model_b.py`` and ``nets/model_c.py`` fix the widths of the two named models.

A *block* is ``[conv 3x3 (stride 1, padding 1) - batch norm - ReLU] x k``, a 2x2 max-pool and a
dropout; the head is a global average pool to 1x1, flatten, dropout and one linear layer.

Choices shared by every member, and their reasons:

* Convolutions have no bias (``bias=False``): the batch norm right after subtracts the channel
  mean, which would cancel any bias, and its own ``bias`` plays that role.
* Xavier (Glorot) uniform for every conv and linear weight (``W ~ U(-b, b)``,
  ``b = sqrt(6 / (fan_in + fan_out))``), zero linear bias, batch norm weight 1 and bias 0: the
  report's table marks Xavier as used for B (and C uses all of B's methods).
* Dropout layers are always present (``p = 0`` makes them the identity) so the parameter names
  do not depend on the dropout rates.

Names follow ``torch.nn.Sequential``: ``features.<i>`` numbers conv, BN, ReLU, ..., pool,
dropout of every block in order; ``classifier`` is ``0`` pool, ``1`` flatten, ``2`` dropout,
``3`` linear.
"""
from typing import Sequence

from layers import _checks as C

from .compose import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d,
                      Net, ReLU, as_net, serial)


def vgg_like(blocks: Sequence[Sequence[int]], *, num_classes: int = 10, dropout: float = 0.1,
             head_dropout: float = 0.2, in_channels: int = 3, name: str = "vgg_like",
             batch_norm: bool = True, init: str = "xavier_uniform", bn_momentum: float = 0.1,
             bn_eps: float = 1e-5) -> Net:
    """A VGG-like net: one conv-BN-ReLU per width in each block, then 2x2 max-pool and dropout.

    Args:
      blocks: conv widths per block, e.g. ``((64, 64), (128, 128), (256, 256))``; each block
        halves the spatial size, so the input side must be divisible by ``2 ** len(blocks)``.
      num_classes: outputs of the final linear layer.
      dropout: drop probability after every pooled block.
      head_dropout: drop probability before the final linear layer.
      in_channels: channels of the input image.
      batch_norm: conv-BN-ReLU (the report's B and C); False gives conv-ReLU with a conv bias
        (nothing cancels it then), for the ablation of Table 1. The layer indices shift.
      init: the ``layers.init`` scheme of every conv and linear weight: ``"xavier_uniform"`` (the
        report's) or ``"torch_default"`` (torch's kaiming uniform, for the ablation).
      bn_momentum, bn_eps: every batch norm's running-statistics momentum and epsilon (torch's
        defaults 0.1 and 1e-5; the speedrun's net uses 0.4 and 1e-12).

    Shapes: ``(N, in_channels, H, W) -> (N, num_classes)``.
    """
    where = name
    C.check_positive_int(num_classes, where, "num_classes")
    dropout = C.check_probability(dropout, where, "dropout (a drop probability)", below_one=True)
    head_dropout = C.check_probability(head_dropout, where, "head_dropout (a drop probability)",
                                       below_one=True)
    if not blocks or any(len(b) == 0 for b in blocks):
        raise ValueError(f"{where}: expected at least one block of at least one width, got {blocks!r}")
    C.check_bool(batch_norm, where, "batch_norm")
    features = []
    channels = in_channels
    for widths in blocks:
        for width in widths:
            features += [Conv2d(channels, width, 3, padding=1, bias=not batch_norm, init=init)]
            features += ([BatchNorm2d(width, momentum=bn_momentum, eps=bn_eps), ReLU()]
                         if batch_norm else [ReLU()])
            channels = width
        features += [MaxPool2d(2), Dropout(dropout)]
    classifier = serial(AdaptiveAvgPool2d(1), Flatten(), Dropout(head_dropout),
                        Linear(channels, num_classes, init=init))
    return as_net(serial(features=serial(*features), classifier=classifier), name=name)
