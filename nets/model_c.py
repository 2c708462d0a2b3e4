"""Model C: "Model B with more layers" (the report), in the family of ``nets/vgg_like.py``.

Model B's blocks with a third conv-BN-ReLU in the 128 and 256 blocks: widths (64, 64),
(128, 128, 128), (256, 256, 256), same head. ~228 M multiply-adds per image (1.49 x B),
~1.89 M parameters for 10 classes (``nets.summary(nets.model_c(), (1, 3, 32, 32))``). The depth
goes where it is cheapest (16x16 and 8x8) rather than into an extra 512-wide block.
"""
from .compose import Net
from .vgg_like import vgg_like

MODEL_C_BLOCKS = ((64, 64), (128, 128, 128), (256, 256, 256))


def model_c(num_classes: int = 10, *, dropout: float = 0.1, head_dropout: float = 0.2,
            in_channels: int = 3, batch_norm: bool = True, init: str = "xavier_uniform",
            bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> Net:
    """Model C: Model B with a third conv in blocks 2 and 3 (~1.5x B's multiply-adds).

    ``(N, 3, 32, 32) -> (N, num_classes)``.
    """
    return vgg_like(MODEL_C_BLOCKS, num_classes=num_classes, dropout=dropout,
                    head_dropout=head_dropout, in_channels=in_channels, batch_norm=batch_norm,
                    init=init, bn_momentum=bn_momentum, bn_eps=bn_eps, name="model_c")
