"""Model A of the report: two VGG-style blocks of 64 and 128 channels and a small classifier.

The report (section 3.1.1) gives the feature extractor: conv 64, batch norm, conv 64, 2x2
max-pool; conv 128, batch norm, conv 128, 2x2 max-pool; 3x3 kernels, stride 1, ReLU after every
convolution, no Xavier initialisation. What it leaves open we choose:

* padding 1 on every convolution, so a 32x32 CIFAR image is 16x16 after block 1 and 8x8 after
  block 2 (the report stresses padding for Model B; without it the classifier input would be
  128x5x5);
* batch norm sits between the first convolution of a block and its ReLU (conv-BN-ReLU): the
  report's reason for batch norm is to keep "the inputs to the activation function" normalised;
* the classifier is the one of the PyTorch CIFAR-10 tutorial the report started from, widened
  to the new feature size: flatten 128*8*8 -> linear 256 -> ReLU -> linear ``num_classes``;
* torch's default initialisation everywhere (``init.torch_default``: kaiming uniform with
  ``a = sqrt(5)``, uniform biases), because the report's table marks Xavier as unused for A.

``features``: 0 conv 3->64, 1 BN, 2 ReLU, 3 conv 64->64, 4 ReLU, 5 pool,
6 conv 64->128, 7 BN, 8 ReLU, 9 conv 128->128, 10 ReLU, 11 pool;
``classifier``: 0 flatten, 1 linear 8192->256, 2 ReLU, 3 linear 256->``num_classes``.

Input ``(N, 3, 32, 32)`` -> logits ``(N, num_classes)``; no dropout, so training needs no key.
"""
from layers import _checks as C

from .compose import BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, Net, ReLU, as_net, serial


def model_a(num_classes: int = 10, *, in_channels: int = 3, image_size: int = 32,
            batch_norm: bool = True, init: str = "torch_default", dropout: float = 0.0,
            head_dropout: float = 0.0, bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> Net:
    """Model A as a :class:`~nets.compose.Net` (see the module docstring for the layers).

    ``image_size`` (divisible by 4) sets the classifier's input, ``128 * (image_size / 4)**2``.
    The defaults are the report's Model A; the other settings exist for the ablation of its
    Table 1 (layer indices shift when a layer is added or left out): ``batch_norm=False`` leaves
    out both batch norms; ``init="xavier_uniform"`` draws every conv and linear weight as Models
    B and C do; ``dropout > 0`` adds a dropout after each pool and ``head_dropout > 0`` one
    before the last linear layer; ``bn_momentum`` and ``bn_eps`` set both batch norms' (torch's
    defaults).
    """
    C.check_positive_int(num_classes, "model_a", "num_classes")
    C.check_bool(batch_norm, "model_a", "batch_norm")
    for name, p in (("dropout", dropout), ("head_dropout", head_dropout)):
        C.check_probability(p, "model_a", f"{name} (a drop probability)", below_one=True)
    if not isinstance(image_size, int) or image_size < 4 or image_size % 4:
        raise ValueError(f"model_a: expected image_size to be a positive multiple of 4 (two 2x2 "
                         f"pools), got {image_size!r}")
    side = image_size // 4
    bn = (lambda c: [BatchNorm2d(c, momentum=bn_momentum, eps=bn_eps)]) if batch_norm else (lambda c: [])   # noqa: E731
    drop = [Dropout(dropout)] if dropout else []
    features = serial(
        Conv2d(in_channels, 64, 3, padding=1, init=init), *bn(64), ReLU(),
        Conv2d(64, 64, 3, padding=1, init=init), ReLU(),
        MaxPool2d(2), *drop,
        Conv2d(64, 128, 3, padding=1, init=init), *bn(128), ReLU(),
        Conv2d(128, 128, 3, padding=1, init=init), ReLU(),
        MaxPool2d(2), *drop,
    )
    classifier = serial(
        Flatten(), Linear(128 * side * side, 256, init=init), ReLU(),
        *([Dropout(head_dropout)] if head_dropout else []), Linear(256, num_classes, init=init),
    )
    return as_net(serial(features=features, classifier=classifier), name="model_a")
