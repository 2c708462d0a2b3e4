"""The model registry: the one table from the ``model`` a run's config names to its net.

    net = build_net("cifar_model_b", 10, cfg.net_options())

``options`` are the keyword arguments of the net's builder that the config sets (each study's
config says which: ``CifarConfig.net_options``); an option a builder does not take is refused in
one line. Layer 0's whitening filters of the airbench net are not rebuilt here: a run's
checkpoint holds them.
"""
from __future__ import annotations

import inspect
from typing import Callable, Mapping

import nets

__all__ = ["NET_BUILDERS", "build_net", "num_classes_of"]

#: ``model name -> builder(num_classes, **options) -> Net``.
NET_BUILDERS: dict[str, Callable[..., "nets.Net"]] = {
    "cifar_model_a": nets.model_a,
    "cifar_model_b": nets.model_b,
    "cifar_model_c": nets.model_c,
    "cifar_transfer": nets.small_vgg16,
    "tutorial": nets.tutorial_net,
    "vgg16": nets.vgg16,
    "airbench94": nets.airbench,
}


def build_net(model: str, num_classes: int, options: Mapping | None = None) -> "nets.Net":
    """``NET_BUILDERS[model](num_classes, **options)``; ValueError (one line) for an unknown model
    or an option its builder does not take."""
    if model not in NET_BUILDERS:
        raise ValueError(f"model: expected one of {', '.join(sorted(NET_BUILDERS))}, got {model!r}")
    builder = NET_BUILDERS[model]
    options = dict(options or {})
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"model {model}: expected options among {', '.join(sorted(accepted))}, "
                         f"got {', '.join(unknown)}")
    return builder(num_classes, **options)


def num_classes_of(params: dict) -> int:
    """The number of outputs of a net's last linear layer (its last 2-D ``weight``)."""
    last = [v for k, v in params.items() if k.endswith("weight") and v.dim() == 2]
    if not last:
        raise ValueError("num_classes_of: expected a net with a linear layer, got parameters "
                         f"without a 2-D weight ({sorted(params)[:5]}...)")
    return int(last[-1].shape[0])
