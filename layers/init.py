"""Initialisers: parameter dicts for the parametrised layers, drawn from explicit keys.

Weight schemes, for a weight of shape ``(out, in, *kernel)`` with
``fan_in = in * prod(kernel)`` and ``fan_out = out * prod(kernel)`` (torch's convention, see
``fan_in_and_fan_out``):

==================  =============================================================================
``torch_default``   what ``nn.Linear`` / ``nn.Conv2d`` do: kaiming uniform with ``a = sqrt(5)``,
                    i.e. ``W ~ U(-b, b)``, ``b = sqrt(6 / ((1 + a**2) fan_in)) = 1 / sqrt(fan_in)``,
                    and bias ``~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
``xavier_uniform``  ``W ~ U(-b, b)``, ``b = gain * sqrt(6 / (fan_in + fan_out))`` (Glorot & Bengio).
``xavier_normal``   ``W ~ N(0, s**2)``, ``s = gain * sqrt(2 / (fan_in + fan_out))``.
``kaiming_uniform``  ``W ~ U(-b, b)``, ``b = gain * sqrt(3 / fan)``, ``gain = calculate_gain(...)``.
``kaiming_normal``  ``W ~ N(0, s**2)``, ``s = gain / sqrt(fan)`` (He et al.); ``fan`` by ``mode``.
``normal``          ``W ~ N(0, std**2)`` (torchvision's VGG classifier uses ``std = 0.01``).
==================  =============================================================================

Every scheme but ``torch_default`` sets the bias to zero, as the papers (and torchvision's VGG) do.
Batch norm starts at ``weight = 1``, ``bias = 0``, ``running_mean = 0``, ``running_var = 1``.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Union

import torch

from . import random as jr

Params = Dict[str, torch.Tensor]
Device = Union[str, torch.device, None]

SCHEMES = ("torch_default", "xavier_uniform", "xavier_normal", "kaiming_uniform",
           "kaiming_normal", "normal")


def calculate_gain(nonlinearity: str = "leaky_relu", param: float | None = None) -> float:
    """The recommended gain for a nonlinearity, as ``torch.nn.init.calculate_gain``."""
    return torch.nn.init.calculate_gain(nonlinearity, param)


def fan_in_and_fan_out(shape: Sequence[int]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of shape ``(out, in, *kernel)`` (at least 2-d)."""
    if len(shape) < 2:
        raise ValueError(f"init.fan_in_and_fan_out: expected a weight of at least 2 dims, "
                         f"got shape {tuple(shape)}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _fan(shape: Sequence[int], mode: str) -> int:
    fan_in, fan_out = fan_in_and_fan_out(shape)
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    raise ValueError(f"init: expected mode 'fan_in' or 'fan_out', got {mode!r}")


def xavier_uniform(key, shape, *, gain: float = 1.0, dtype=torch.float32, device: Device = None):
    """``U(-b, b)`` with ``b = gain * sqrt(6 / (fan_in + fan_out))``."""
    fan_in, fan_out = fan_in_and_fan_out(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return jr.uniform(key, shape, dtype=dtype, low=-bound, high=bound, device=device)


def xavier_normal(key, shape, *, gain: float = 1.0, dtype=torch.float32, device: Device = None):
    """``N(0, s**2)`` with ``s = gain * sqrt(2 / (fan_in + fan_out))``."""
    fan_in, fan_out = fan_in_and_fan_out(shape)
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    return jr.normal(key, shape, dtype=dtype, std=std, device=device)


def kaiming_uniform(key, shape, *, a: float = 0.0, mode: str = "fan_in",
                    nonlinearity: str = "leaky_relu", dtype=torch.float32, device: Device = None):
    """``U(-b, b)`` with ``b = gain * sqrt(3 / fan)``, ``gain = calculate_gain(nonlinearity, a)``."""
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / _fan(shape, mode))
    return jr.uniform(key, shape, dtype=dtype, low=-bound, high=bound, device=device)


def kaiming_normal(key, shape, *, a: float = 0.0, mode: str = "fan_in",
                   nonlinearity: str = "leaky_relu", dtype=torch.float32, device: Device = None):
    """``N(0, s**2)`` with ``s = gain / sqrt(fan)``, ``gain = calculate_gain(nonlinearity, a)``."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(shape, mode))
    return jr.normal(key, shape, dtype=dtype, std=std, device=device)


def torch_default_weight(key, shape, *, dtype=torch.float32, device: Device = None):
    """``nn.Linear`` / ``nn.Conv2d``'s default: kaiming uniform with ``a = sqrt(5)``."""
    return kaiming_uniform(key, shape, a=math.sqrt(5), dtype=dtype, device=device)


def torch_default_bias(key, fan_in: int, size: int, *, dtype=torch.float32, device: Device = None):
    """``nn.Linear`` / ``nn.Conv2d``'s default bias: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return jr.uniform(key, (size,), dtype=dtype, low=-bound, high=bound, device=device)


#: The options each weight scheme takes (``linear_params`` / ``conv2d_params`` pass them on).
SCHEME_OPTIONS = {"torch_default": (), "xavier_uniform": ("gain",), "xavier_normal": ("gain",),
                  "kaiming_uniform": ("a", "mode", "nonlinearity"),
                  "kaiming_normal": ("a", "mode", "nonlinearity"), "normal": ("mean", "std")}


def _weight(key, shape, scheme: str, dtype, device, options) -> torch.Tensor:
    unknown = sorted(set(options) - set(SCHEME_OPTIONS.get(scheme, options)))
    if unknown:   # refused, not ignored: a gain given to torch_default would be silently lost
        raise TypeError(f"init: scheme {scheme!r} takes options {list(SCHEME_OPTIONS[scheme])}, "
                        f"got {unknown}")
    if scheme == "torch_default":
        return torch_default_weight(key, shape, dtype=dtype, device=device, **options)
    if scheme == "xavier_uniform":
        return xavier_uniform(key, shape, dtype=dtype, device=device, **options)
    if scheme == "xavier_normal":
        return xavier_normal(key, shape, dtype=dtype, device=device, **options)
    if scheme == "kaiming_uniform":
        return kaiming_uniform(key, shape, dtype=dtype, device=device, **options)
    if scheme == "kaiming_normal":
        return kaiming_normal(key, shape, dtype=dtype, device=device, **options)
    if scheme == "normal":
        return jr.normal(key, shape, dtype=dtype, device=device, **options)
    raise ValueError(f"init: expected scheme in {SCHEMES}, got {scheme!r}")


def _weight_and_bias(key, shape, bias: bool, scheme: str, dtype, device, options) -> Params:
    jr.check_key(key, "init")
    k_weight, k_bias = jr.split(key)
    params = {"weight": _weight(k_weight, shape, scheme, dtype, device, options)}
    if bias:
        if scheme == "torch_default":
            fan_in, _ = fan_in_and_fan_out(shape)
            params["bias"] = torch_default_bias(k_bias, fan_in, shape[0], dtype=dtype, device=device)
        else:
            params["bias"] = torch.zeros(shape[0], dtype=dtype, device=device)
    return params


def linear_params(key, in_features: int, out_features: int, *, bias: bool = True,
                  scheme: str = "torch_default", dtype=torch.float32, device: Device = None,
                  **options) -> Params:
    """``{"weight": (out_features, in_features), "bias": (out_features,)}`` for ``layers.linear``.

    ``options`` go to the weight scheme (``gain``, ``a``, ``mode``, ``nonlinearity``, ``std``).
    """
    if in_features < 1 or out_features < 1:
        raise ValueError(f"init.linear_params: expected positive sizes, got in_features="
                         f"{in_features}, out_features={out_features}")
    return _weight_and_bias(key, (out_features, in_features), bias, scheme, dtype, device, options)


def conv2d_params(key, in_channels: int, out_channels: int, kernel_size, *, groups: int = 1,
                  bias: bool = True, scheme: str = "torch_default", dtype=torch.float32,
                  device: Device = None, **options) -> Params:
    """``{"weight": (out, in / groups, kh, kw), "bias": (out,)}`` (OIHW) for ``layers.conv2d``."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"init.conv2d_params: groups={groups} must divide in_channels="
                         f"{in_channels} and out_channels={out_channels}")
    shape = (out_channels, in_channels // groups, kh, kw)
    return _weight_and_bias(key, shape, bias, scheme, dtype, device, options)


def batch_norm_params(num_features: int, *, affine: bool = True, dtype=torch.float32,
                      device: Device = None) -> Params:
    """``{"weight": ones(C), "bias": zeros(C)}``, or ``{}`` without affine."""
    if not affine:
        return {}
    return {"weight": torch.ones(num_features, dtype=dtype, device=device),
            "bias": torch.zeros(num_features, dtype=dtype, device=device)}


def batch_norm_state(num_features: int, *, track_running_stats: bool = True,
                     dtype=torch.float32, device: Device = None) -> Params:
    """``{"running_mean": zeros(C), "running_var": ones(C), "num_batches_tracked": 0}``, or ``{}``."""
    if not track_running_stats:
        return {}
    return {"running_mean": torch.zeros(num_features, dtype=dtype, device=device),
            "running_var": torch.ones(num_features, dtype=dtype, device=device),
            "num_batches_tracked": torch.zeros((), dtype=torch.int64, device=device)}
