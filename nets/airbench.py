"""The airbench94 net (Jordan 2024, arXiv 2404.00498; github.com/KellerJordan/cifar10-airbench)
as a pure ``Net``, its parameters named as the ``state_dict()`` of airbench's ``nn.Sequential``.

    0  Conv2d(3, 24, 2x2, no padding, bias)   whitening: fixed filters from the data (nets.whitening)
    1  GELU
    2  ConvGroup(24, 64)     conv1 3x3 - MaxPool 2 - norm1 - GELU - conv2 3x3 - norm2 - GELU
    3  ConvGroup(64, 256)
    4  ConvGroup(256, 256)
    5  MaxPool2d(3)
    6  Flatten
    7  Linear(256, 10, no bias)
    8  Mul(1/9)

Shapes for a 32x32 image: 32 -> 31 (the 2x2 whitening conv) -> 15 -> 7 -> 3 (each group's pool)
-> 1 (the 3x3 pool), so the head sees ``(N, 256)``. A group's 3x3 convolutions have no bias (the
batch norm after each one has its own) and padding 1 ("same"); its batch norms have
``eps = 1e-12`` and torch momentum ``0.4`` (airbench's "momentum 0.6" is the weight of the old
running statistics, ``1 - 0.4``).

Initialisation, as airbench's ``Conv.reset_parameters``: torch's default (kaiming uniform) for
every weight, conv biases zero, and the first ``in_channels`` filters of each convolution set to
the identity (``torch.nn.init.dirac_``: a 1 at the kernel centre of its own input channel), so
at initialisation part of every group passes its input through. With ``whiten`` given, layer 0's
weight is those filters instead.

Which parameters train is the recipe's choice (``experiments.speedrun``): airbench fixes the
whitening weight and every batch norm's ``weight`` (scale) at their initial values; the net still
holds them, as the torch module does, so ``functional_call`` on the reference module works.
"""
from __future__ import annotations

from typing import Sequence

import torch

import layers
from layers import _checks as C

from .compose import (GELU, BatchNorm2d, Conv2d, Flatten, Layer, Linear, MaxPool2d, Mul, Net, ReLU,
                      as_net, serial)

__all__ = ["airbench", "AIRBENCH94_WIDTHS", "ACTIVATIONS", "dirac_conv_init", "whiten_width"]

AIRBENCH94_WIDTHS = (64, 256, 256)
ACTIVATIONS = {"gelu": GELU, "relu": ReLU}


def whiten_width(in_channels: int = 3, kernel_size: int = 2) -> int:
    """Output channels of the whitening conv: ``2 C k k`` (each eigen-direction and its negative)."""
    return 2 * in_channels * kernel_size * kernel_size


def dirac_conv_init(in_channels: int, out_channels: int, kernel_size: int, *, bias: bool):
    """``f(key, *, dtype, device) -> {"weight"[, "bias"]}``: torch's default conv weight, bias 0,
    then filter ``i < min(in, out)`` replaced by the identity on input channel ``i``
    (``w[i, i, k // 2, k // 2] = 1``, zero elsewhere), as ``torch.nn.init.dirac_(w[:in])``."""
    def init(key, *, dtype=torch.float32, device=None):
        p = layers.init.conv2d_params(key, in_channels, out_channels, kernel_size, bias=bias,
                                      dtype=dtype, device=device)
        w = p["weight"].clone()
        n = min(in_channels, out_channels)
        w[:n] = 0
        idx = torch.arange(n, device=w.device)
        w[idx, idx, kernel_size // 2, kernel_size // 2] = 1
        out = {"weight": w}
        if bias:
            out["bias"] = torch.zeros_like(p["bias"])
        return out
    return init


def _whitening_init(filters: torch.Tensor):
    def init(key, *, dtype=torch.float32, device=None):
        return {"weight": filters.to(dtype=dtype, device=device).clone(),
                "bias": torch.zeros(filters.shape[0], dtype=dtype, device=device)}
    return init


def _conv_group(c_in: int, c_out: int, activation, momentum: float, eps: float) -> Layer:
    conv = lambda a, b: Conv2d(a, b, 3, padding=1, bias=False, init=dirac_conv_init(a, b, 3, bias=False))  # noqa: E731
    return serial(conv1=conv(c_in, c_out), pool=MaxPool2d(2),
                  norm1=BatchNorm2d(c_out, momentum=momentum, eps=eps), activ1=activation(),
                  conv2=conv(c_out, c_out), norm2=BatchNorm2d(c_out, momentum=momentum, eps=eps),
                  activ2=activation())


def airbench(num_classes: int = 10, *, widths: Sequence[int] = AIRBENCH94_WIDTHS,
             whiten: torch.Tensor | None = None, activation: str = "gelu",
             bn_momentum: float = 0.4, bn_eps: float = 1e-12, scale: float = 1 / 9,
             in_channels: int = 3, whiten_kernel: int = 2) -> Net:
    """The airbench94 net; see the module docstring.

    Args:
      widths: the three conv groups' widths (airbench94: 64, 256, 256).
      whiten: layer 0's fixed filters ``(2 C k k, C, k, k)`` (``nets.whitening.whitening_filters``),
        or None for the default (dirac) initialisation of an ordinary conv.
      activation: ``"gelu"`` (airbench) or ``"relu"``.
      bn_momentum, bn_eps: every batch norm's (torch convention: the new batch's weight).
      scale: the logits' fixed multiplier (airbench: 1/9).

    Shapes: ``(N, in_channels, 32, 32) -> (N, num_classes)``.
    """
    where = "airbench"
    C.check_positive_int(num_classes, where, "num_classes")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: expected activation in {sorted(ACTIVATIONS)}, got {activation!r}")
    widths = tuple(widths)
    if len(widths) != 3:
        raise ValueError(f"{where}: expected 3 group widths, got {widths}")
    for w in widths:
        C.check_positive_int(w, where, "each width")
    first = whiten_width(in_channels, whiten_kernel)
    if whiten is not None:
        expected = (first, in_channels, whiten_kernel, whiten_kernel)
        if not isinstance(whiten, torch.Tensor) or tuple(whiten.shape) != expected:
            got = tuple(whiten.shape) if isinstance(whiten, torch.Tensor) else type(whiten).__name__
            raise ValueError(f"{where}: expected whitening filters {expected}, got {got}")
        init0 = _whitening_init(whiten.detach())
    else:
        init0 = dirac_conv_init(in_channels, first, whiten_kernel, bias=True)
    act = ACTIVATIONS[activation]
    groups = []
    c = first
    for w in widths:
        groups.append(_conv_group(c, w, act, bn_momentum, bn_eps))
        c = w
    return as_net(serial(Conv2d(in_channels, first, whiten_kernel, bias=True, init=init0), act(),
                         *groups, MaxPool2d(3), Flatten(), Linear(c, num_classes, bias=False),
                         Mul(scale)), name=where)
