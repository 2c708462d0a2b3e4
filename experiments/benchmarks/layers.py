"""Per-layer forward + backward time, ``impl="explicit"`` against ``impl="fast"``.

Each case is a layer call on the shape it sees inside Models A/B at the benchmark's batch size
(``batch``). One timed call is ``y = layer(inputs)`` then ``torch.autograd.grad(y, inputs, g)``
with a fixed random cotangent ``g``: the work one training step does for that layer. The two
formulations run interleaved, round by round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import layers
from layers import random as jr

from .timing import interleaved, median

__all__ = ["LayerCase", "layer_cases", "bench_layers"]


@dataclass(frozen=True)
class LayerCase:
    """One layer call: ``call(inputs, impl) -> y`` and the shapes of its differentiable inputs."""

    name: str
    shape: str
    call: Callable[[list, str], torch.Tensor]
    input_shapes: tuple
    labels: torch.Tensor | None = None


def layer_cases(batch: int) -> list[LayerCase]:
    """The benchmarked layer calls at batch ``batch`` (shapes as inside Models A and B)."""
    key = jr.key(7)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (batch,), generator=g)
    conv_x = (batch, 128, 16, 16)
    return [
        LayerCase("conv2d 3x3 128->128, pad 1", str(conv_x),
                  lambda t, impl: layers.conv2d({"weight": t[1]}, t[0], padding=1, impl=impl),
                  (conv_x, (128, 128, 3, 3))),
        LayerCase("batch_norm (train)", str(conv_x),
                  lambda t, impl: layers.batch_norm(
                      {"weight": t[1], "bias": t[2]},
                      {"running_mean": torch.zeros(128, device=t[0].device),
                       "running_var": torch.ones(128, device=t[0].device),
                       "num_batches_tracked": torch.tensor(0, device=t[0].device)},
                      t[0], train=True, impl=impl)[0],
                  (conv_x, (128,), (128,))),
        LayerCase("relu", str(conv_x), lambda t, impl: layers.relu(t[0], impl=impl), (conv_x,)),
        LayerCase("max_pool2d 2x2", str(conv_x),
                  lambda t, impl: layers.max_pool2d(t[0], 2, impl=impl), (conv_x,)),
        LayerCase("dropout p=0.1", str(conv_x),
                  lambda t, impl: layers.dropout(t[0], p=0.1, train=True, key=key.to(t[0].device),
                                               impl=impl),
                  (conv_x,)),
        LayerCase("adaptive_avg_pool2d -> 1x1", str((batch, 256, 8, 8)),
                  lambda t, impl: layers.adaptive_avg_pool2d(t[0], 1, impl=impl),
                  ((batch, 256, 8, 8),)),
        LayerCase("flatten", str((batch, 128, 8, 8)),
                  lambda t, impl: layers.flatten(t[0], impl=impl), ((batch, 128, 8, 8),)),
        LayerCase("linear 8192->256", str((batch, 8192)),
                  lambda t, impl: layers.linear({"weight": t[1], "bias": t[2]}, t[0], impl=impl),
                  ((batch, 8192), (256, 8192), (256,))),
        LayerCase("log_softmax", str((batch, 10)),
                  lambda t, impl: layers.log_softmax(t[0], impl=impl), ((batch, 10),)),
        LayerCase("cross_entropy, smoothing 0.1", str((batch, 10)),
                  lambda t, impl: layers.cross_entropy(t[0], labels.to(t[0].device), label_smoothing=0.1, impl=impl),
                  ((batch, 10),)),
    ]


def _runner(case: LayerCase, impl: str, inputs: list, cotangent: torch.Tensor):
    def run():
        y = case.call(inputs, impl)
        torch.autograd.grad(y, inputs, cotangent)
    return run


def bench_layers(batch: int, rounds: int, device: torch.device | str = "cpu",
                 cases: list[LayerCase] | None = None) -> list[dict]:
    """Median forward + backward milliseconds of each case, explicit and fast, interleaved.

    Returns one dict per case: ``name``, ``shape``, ``explicit_ms``, ``fast_ms``, ``ratio``
    (explicit / fast).
    """
    device = torch.device(device)
    rows = []
    for i, case in enumerate(layer_cases(batch) if cases is None else cases):
        g = torch.Generator().manual_seed(100 + i)
        inputs = [torch.randn(s, generator=g).to(device).requires_grad_() for s in case.input_shapes]
        with torch.no_grad():
            out_shape = case.call(inputs, "fast").shape
        cotangent = torch.randn(out_shape, generator=g).to(device)
        fns = {impl: _runner(case, impl, inputs, cotangent) for impl in ("explicit", "fast")}
        for fn in fns.values():  # warm-up: allocator, oneDNN primitive caches
            fn()
        times = interleaved(fns, rounds, device)
        explicit, fast = median(times["explicit"]), median(times["fast"])
        rows.append({"name": case.name, "shape": case.shape, "explicit_ms": 1e3 * explicit,
                     "fast_ms": 1e3 * fast, "ratio": explicit / fast})
    return rows
