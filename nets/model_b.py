"""Model B: a lean VGG-like net for 32x32 CIFAR images (the family is in ``nets/vgg_like.py``).

Three blocks of ``[conv 3x3 - BN - ReLU] x 2``, 2x2 max-pool and dropout, widths 64, 128, 256,
then global average pooling, flatten, dropout and one linear layer 256 -> ``num_classes``:
~153 M multiply-adds per image, ~1.15 M parameters for 10 classes (exact numbers:
``nets.summary(nets.model_b(), (1, 3, 32, 32))``; docs/nets.md).

Widths stop at 256 and the head is a single linear layer after global pooling, so that Model B
trains in under an hour on a 2-core CPU (it was sized for 90% on CIFAR-10; measured: 88.78% in
55 min, docs/results.md).
"""
from .compose import Net
from .vgg_like import vgg_like

MODEL_B_BLOCKS = ((64, 64), (128, 128), (256, 256))


def model_b(num_classes: int = 10, *, dropout: float = 0.1, head_dropout: float = 0.2,
            in_channels: int = 3, batch_norm: bool = True, init: str = "xavier_uniform",
            bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> Net:
    """Model B: blocks of widths (64, 64), (128, 128), (256, 256); see the module docstring.

    ``(N, 3, 32, 32) -> (N, num_classes)``. Training with ``dropout > 0`` or
    ``head_dropout > 0`` needs ``apply(..., key=...)``.
    """
    return vgg_like(MODEL_B_BLOCKS, num_classes=num_classes, dropout=dropout,
                    head_dropout=head_dropout, in_channels=in_channels, batch_norm=batch_norm,
                    init=init, bn_momentum=bn_momentum, bn_eps=bn_eps, name="model_b")
