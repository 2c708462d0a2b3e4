"""Stateless layer functions over parameter dicts, as pure functions of their arguments.

Every layer has two formulations, ``impl="fast"`` (the fused torch primitive; the default) and
``impl="explicit"`` (the math written out, forward and backward: an ``autograd.Function`` per
layer whose backward is the derivation in its docstring); see :mod:`layers._impl` and
docs/layers.md.

    y = layers.conv2d({"weight": w, "bias": b}, x, stride=1, padding="same")
    y, state = layers.batch_norm(params, state, y, train=True)
    y = layers.dropout(layers.relu(y), p=0.5, train=True, key=k)
"""
from . import init, parallel, random
from ._impl import default_impl, get_default_impl, set_default_impl
from .activations import flatten, gelu, log_softmax, relu
from .batch_norm import batch_norm
from .conv import conv2d
from .dropout import dropout
from .linear import linear
from .loss import cross_entropy
from .pooling import adaptive_avg_pool2d, max_pool2d

__all__ = [
    "adaptive_avg_pool2d", "batch_norm", "conv2d", "cross_entropy", "default_impl", "dropout",
    "flatten", "gelu", "get_default_impl", "init", "linear", "log_softmax", "max_pool2d", "parallel",
    "random", "relu",
    "set_default_impl",
]
