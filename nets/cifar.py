"""Models B and C: lean VGG-like nets for 32x32 CIFAR images, built by one block builder.

A *block* is ``[conv 3x3 (stride 1, padding 1) - batch norm - ReLU] x k``, a 2x2 max-pool and a
dropout; the head is a global average pool to 1x1, flatten, dropout and one linear layer:

=========  =================================  ====================  ==========================
net        blocks (conv widths)               multiply-adds / image  parameters (10 classes)
=========  =================================  ====================  ==========================
Model B    (64, 64) (128, 128) (256, 256)     ~153 M                 ~1.15 M
Model C    (64, 64) (128, 128, 128)           ~228 M (1.49 x B)      ~1.89 M
           (256, 256, 256)
=========  =================================  ====================  ==========================

(exact numbers: ``nets.summary(nets.model_b(), (1, 3, 32, 32))``; docs/nets.md.)

Choices and reasons:

* Widths stop at 256 and the head is a single linear layer after global pooling, so that Model
  B trains in under an hour on a 2-core CPU (it was sized for 90% on CIFAR-10; measured: 88.78%
  in 55 min, docs/results.md); Model C adds one 3x3 conv to blocks 2 and 3 ("Model B with more
  layers", as the report says) at ~1.5x the cost.
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

from .compose import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d,
                      Net, ReLU, as_net, serial)

MODEL_B_BLOCKS = ((64, 64), (128, 128), (256, 256))
MODEL_C_BLOCKS = ((64, 64), (128, 128, 128), (256, 256, 256))


def _probability(p, where, what):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{where}: expected {what} (a drop probability) in [0, 1), got {p!r}")
    return float(p)


def vgg_like(blocks: Sequence[Sequence[int]], *, num_classes: int = 10, dropout: float = 0.1,
             head_dropout: float = 0.2, in_channels: int = 3, name: str = "vgg_like") -> Net:
    """A VGG-like net: one conv-BN-ReLU per width in each block, then 2x2 max-pool and dropout.

    Args:
      blocks: conv widths per block, e.g. ``((64, 64), (128, 128), (256, 256))``; each block
        halves the spatial size, so the input side must be divisible by ``2 ** len(blocks)``.
      num_classes: outputs of the final linear layer.
      dropout: drop probability after every pooled block.
      head_dropout: drop probability before the final linear layer.
      in_channels: channels of the input image.

    Shapes: ``(N, in_channels, H, W) -> (N, num_classes)``.
    """
    where = name
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{where}: expected num_classes to be a positive int, got {num_classes!r}")
    dropout = _probability(dropout, where, "dropout")
    head_dropout = _probability(head_dropout, where, "head_dropout")
    if not blocks or any(len(b) == 0 for b in blocks):
        raise ValueError(f"{where}: expected at least one block of at least one width, got {blocks!r}")
    features = []
    channels = in_channels
    for widths in blocks:
        for width in widths:
            features += [Conv2d(channels, width, 3, padding=1, bias=False, init="xavier_uniform"),
                         BatchNorm2d(width), ReLU()]
            channels = width
        features += [MaxPool2d(2), Dropout(dropout)]
    classifier = serial(AdaptiveAvgPool2d(1), Flatten(), Dropout(head_dropout),
                        Linear(channels, num_classes, init="xavier_uniform"))
    return as_net(serial(features=serial(*features), classifier=classifier), name=name)


def model_b(num_classes: int = 10, *, dropout: float = 0.1, head_dropout: float = 0.2,
            in_channels: int = 3) -> Net:
    """Model B: blocks of widths (64, 64), (128, 128), (256, 256); see the module docstring.

    ``(N, 3, 32, 32) -> (N, num_classes)``. Training with ``dropout > 0`` or
    ``head_dropout > 0`` needs ``apply(..., key=...)``.
    """
    return vgg_like(MODEL_B_BLOCKS, num_classes=num_classes, dropout=dropout,
                    head_dropout=head_dropout, in_channels=in_channels, name="model_b")


def model_c(num_classes: int = 10, *, dropout: float = 0.1, head_dropout: float = 0.2,
            in_channels: int = 3) -> Net:
    """Model C: Model B with a third conv in blocks 2 and 3 (~1.5x B's multiply-adds).

    ``(N, 3, 32, 32) -> (N, num_classes)``.
    """
    return vgg_like(MODEL_C_BLOCKS, num_classes=num_classes, dropout=dropout,
                    head_dropout=head_dropout, in_channels=in_channels, name="model_c")
