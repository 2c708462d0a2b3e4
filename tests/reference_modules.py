"""torch.nn twins of the nets, written independently of ``nets`` as plain ``nn.Sequential``s.

Each twin's ``state_dict()`` keys equal the keys of the net's ``{**params, **state}``, so
``torch.func.functional_call(twin, {**params, **state}, x)`` is the reference for
``net.apply(params, state, x, ...)``. functional_call writes new batch-norm statistics into the
buffers it is given: pass clones (:func:`reference_call` does).
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision


def _seq(**children):
    return nn.Sequential(OrderedDict(children))


def model_a_module(num_classes=10):
    """Model A: conv64-BN-ReLU, conv64-ReLU, pool; conv128-BN-ReLU, conv128-ReLU, pool; MLP."""
    features = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    )
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 8 * 8, 256), nn.ReLU(),
                               nn.Linear(256, num_classes))
    return _seq(features=features, classifier=classifier)


def _vgg_like_module(blocks, num_classes, dropout, head_dropout):
    layers, channels = [], 3
    for widths in blocks:
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(head_dropout),
                               nn.Linear(channels, num_classes))
    return _seq(features=nn.Sequential(*layers), classifier=classifier)


def model_b_module(num_classes=10, dropout=0.0, head_dropout=0.0):
    """Model B: [conv-BN-ReLU] x2, pool, dropout for widths 64, 128, 256; GAP, dropout, linear."""
    return _vgg_like_module(((64, 64), (128, 128), (256, 256)), num_classes, dropout, head_dropout)


def model_c_module(num_classes=10, dropout=0.0, head_dropout=0.0):
    """Model C: Model B with three convs in the 128 and 256 blocks."""
    return _vgg_like_module(((64, 64), (128, 128, 128), (256, 256, 256)), num_classes, dropout,
                            head_dropout)


def vgg16_module(num_classes=1000, batch_norm=False, truncate_after_block=None, dropout=0.5):
    """torchvision's ``vgg16`` / ``vgg16_bn`` (random weights), or its features up to the max-pool
    closing block ``truncate_after_block``, wrapped so the keys stay ``features.<i>.*``."""
    build = torchvision.models.vgg16_bn if batch_norm else torchvision.models.vgg16
    model = build(weights=None, num_classes=num_classes, dropout=dropout)
    if truncate_after_block is None:
        return model
    pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    return _seq(features=model.features[:pools[truncate_after_block - 1] + 1])


def reference_call(module, params, state, x, *, train):
    """``(output, new_state)`` of ``module`` run with ``params`` and clones of ``state``."""
    module.train(train)
    buffers = {k: v.clone() for k, v in state.items()}
    out = torch.func.functional_call(module, {**params, **buffers}, (x,))
    return out, buffers
