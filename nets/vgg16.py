"""VGG16 (configuration D of Simonyan & Zisserman), with torchvision's names, head and init.

Layers and names equal ``torchvision.models.vgg16`` / ``vgg16_bn``, so their state dicts load
unchanged (:func:`nets.load_torchvision_weights`):

* ``features``: thirteen 3x3 convolutions (padding 1) in five blocks of widths
  64, 64 | 128, 128 | 256, 256, 256 | 512, 512, 512 | 512, 512, 512, each block closed by a 2x2
  max-pool; every conv is followed by ReLU (``vgg16``) or by batch norm and ReLU (``vgg16_bn``),
  so ``features.<i>`` counts conv, [BN,] ReLU and pool layers in order;
* ``avgpool``: adaptive average pool to 7x7 (so any input of at least 32x32 is valid);
* ``flatten``, then ``classifier``: ``0`` linear 25088->4096, ``1`` ReLU, ``2`` dropout,
  ``3`` linear 4096->4096, ``4`` ReLU, ``5`` dropout, ``6`` linear 4096->``num_classes``.

Initialisation as torchvision's ``VGG.__init__``, drawn from our keys: conv weights
``N(0, 2 / fan_out)`` (kaiming normal, ``mode="fan_out"``, ReLU gain), linear weights
``N(0, 0.01**2)``, all biases 0, batch norm weight 1 and bias 0.

Truncation: ``truncate_after_block=k`` (1..5) keeps ``features`` up to and including the max-pool
that closes block ``k`` and returns that pooled feature map; ``avgpool`` and ``classifier`` are
gone. A 224x224 input gives 64x112x112 (k=1), 128x56x56, 256x28x28 (k=3, the report's
28x28x256), 512x14x14 (k=4, the report's 14x14x512) and 512x7x7 (k=5).
"""
from typing import Optional

import layers
from layers import _checks as C

from .compose import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d,
                      Net, ReLU, as_net, serial)

#: Configuration D: conv widths, "M" for a 2x2 max-pool closing a block.
CONFIG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _kaiming_fan_out(in_channels, out_channels):
    def init(key, *, dtype, device):
        return layers.init.conv2d_params(key, in_channels, out_channels, 3, scheme="kaiming_normal",
                                         mode="fan_out", nonlinearity="relu", dtype=dtype,
                                         device=device)
    return init


def _normal_001(in_features, out_features):
    def init(key, *, dtype, device):
        return layers.init.linear_params(key, in_features, out_features, scheme="normal",
                                         std=0.01, dtype=dtype, device=device)
    return init


def feature_layers(*, batch_norm: bool = False, blocks: int = 5, in_channels: int = 3):
    """The ``features`` layers of the first ``blocks`` blocks of configuration D, as a list."""
    out, channels, seen = [], in_channels, 0
    for item in CONFIG_D:
        if item == "M":
            out.append(MaxPool2d(2))
            seen += 1
            if seen == blocks:
                break
            continue
        out.append(Conv2d(channels, item, 3, padding=1, init=_kaiming_fan_out(channels, item)))
        if batch_norm:
            out.append(BatchNorm2d(item))
        out.append(ReLU())
        channels = item
    return out


def vgg16(num_classes: int = 1000, batch_norm: bool = False,
          truncate_after_block: Optional[int] = None, dropout: float = 0.5, *,
          in_channels: int = 3) -> Net:
    """VGG16 as a :class:`~nets.compose.Net`, names as torchvision (see the module docstring).

    Args:
      num_classes: outputs of ``classifier.6`` (1000 for ImageNet; replace the head by asking for
        another number and loading torchvision weights with ``num_classes=`` the same).
      batch_norm: the ``vgg16_bn`` variant (batch norm after every conv).
      truncate_after_block: ``None`` for the whole net, or ``k`` in 1..5 to stop after block
        ``k``'s max-pool and return its feature map ``(N, C_k, H / 2**k, W / 2**k)``.
      dropout: drop probability of ``classifier.2`` and ``classifier.5``.

    Shapes: ``(N, 3, H, W) -> (N, num_classes)``, or the feature map when truncated.
    """
    where = "vgg16"
    C.check_positive_int(num_classes, where, "num_classes")
    if not isinstance(batch_norm, bool):
        raise TypeError(f"{where}: expected batch_norm to be a bool, got {batch_norm!r}")
    if truncate_after_block is not None and (
            isinstance(truncate_after_block, bool) or truncate_after_block not in (1, 2, 3, 4, 5)):
        raise ValueError(f"{where}: expected truncate_after_block to be None or an int in 1..5, "
                         f"got {truncate_after_block!r}")
    dropout = C.check_probability(dropout, where, "dropout (a drop probability)", below_one=True)
    name = "vgg16_bn" if batch_norm else "vgg16"
    if truncate_after_block is not None:
        features = feature_layers(batch_norm=batch_norm, blocks=truncate_after_block,
                                  in_channels=in_channels)
        return as_net(serial(features=serial(*features)),
                      name=f"{name}[:block {truncate_after_block}]")
    features = feature_layers(batch_norm=batch_norm, in_channels=in_channels)
    classifier = serial(
        Linear(512 * 7 * 7, 4096, init=_normal_001(512 * 7 * 7, 4096)), ReLU(), Dropout(dropout),
        Linear(4096, 4096, init=_normal_001(4096, 4096)), ReLU(), Dropout(dropout),
        Linear(4096, num_classes, init=_normal_001(4096, num_classes)),
    )
    return as_net(serial(features=serial(*features), avgpool=AdaptiveAvgPool2d(7),
                         flatten=Flatten(), classifier=classifier), name=name)
