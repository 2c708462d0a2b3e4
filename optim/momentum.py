"""Heavy-ball and Nesterov momentum, as torch.optim.SGD computes it.

    b_1 = g_1                                   (first step: no dampening, as torch)
    b_t = mu * b_{t-1} + (1 - dampening) * g_t
    d_t = g_t + mu * b_t   if nesterov   else   b_t

Shapes: every leaf of the buffer has its parameter's shape and dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils import _pytree as pytree

from . import buffers
from .base import GradientTransformation, Tree, count_tensor, tensor_leaves


class TraceState(NamedTuple):
    """count: 0-d int64 updates done; momentum_buffer: b_t, a tree like params."""
    count: torch.Tensor
    momentum_buffer: Tree


def trace(momentum: float, dampening: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Momentum buffer update with torch.optim.SGD's order of operations (foreach path)."""
    def init(params):
        leaves, spec = tensor_leaves("trace.init", "params", params)
        return TraceState(count_tensor(0), pytree.tree_unflatten([torch.zeros_like(x) for x in leaves], spec))

    def update(updates, state, params=None):
        g, spec = tensor_leaves("trace.update", "updates", updates)
        bufs_old, _ = tensor_leaves("trace.update", "state.momentum_buffer", state.momentum_buffer)
        if len(bufs_old) != len(g):
            raise ValueError(f"trace.update: expected a momentum buffer per update leaf ({len(g)}), "
                             f"got {len(bufs_old)}: was the state made by init on these params?")
        t = int(state.count)
        if not g:
            return updates, TraceState(count_tensor(t + 1), state.momentum_buffer)
        if t == 0:
            bufs = buffers.clone(g)
        else:
            bufs = buffers.mul(bufs_old, momentum)
            torch._foreach_add_(bufs, g, alpha=1 - dampening)
        direction = buffers.add(g, bufs, alpha=momentum) if nesterov else bufs
        return (pytree.tree_unflatten(direction, spec),
                TraceState(count_tensor(t + 1), pytree.tree_unflatten(bufs, spec)))
    return GradientTransformation(init, update)
