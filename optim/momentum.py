"""Heavy-ball and Nesterov momentum, as torch.optim.SGD computes it.

    b_1 = g_1                                   (first step: no dampening, as torch)
    b_t = mu * b_{t-1} + (1 - dampening) * g_t
    d_t = g_t + mu * b_t   if nesterov   else   b_t

Shapes: every leaf of the buffer has its parameter's shape and dtype.

With the state donated (``step(..., donate=True)``) b_t is written into b_{t-1}'s storage with
torch's in-place ops (``_foreach_mul_``, ``_foreach_add_``; ``_foreach_copy_`` on the first step
where torch clones), and the Nesterov direction into the incoming updates when they are
temporaries of the step (torch writes it into its weight-decayed gradient copy).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils import _pytree as pytree

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

    def leaves(updates, state):
        g, spec = tensor_leaves("trace.update", "updates", updates)
        bufs_old, _ = tensor_leaves("trace.update", "state.momentum_buffer", state.momentum_buffer)
        if len(bufs_old) != len(g):
            raise ValueError(f"trace.update: expected a momentum buffer per update leaf ({len(g)}), "
                             f"got {len(bufs_old)}: was the state made by init on these params?")
        return g, spec, bufs_old, int(state.count)

    def update(updates, state, params=None):
        g, spec, bufs_old, t = leaves(updates, state)
        if not g:
            return updates, TraceState(count_tensor(t + 1), state.momentum_buffer)
        if t == 0:
            bufs = [x.clone() for x in g]
        else:
            bufs = torch._foreach_mul(bufs_old, momentum)
            torch._foreach_add_(bufs, g, alpha=1 - dampening)
        direction = torch._foreach_add(g, bufs, alpha=momentum) if nesterov else bufs
        return (pytree.tree_unflatten(direction, spec),
                TraceState(count_tensor(t + 1), pytree.tree_unflatten(bufs, spec)))

    def donated_update(updates, state, params, updates_owned):
        g, spec, bufs, t = leaves(updates, state)
        new_state = TraceState(count_tensor(t + 1), state.momentum_buffer)
        if not g:
            return updates, new_state, updates_owned
        if t == 0:
            torch._foreach_copy_(bufs, g)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, g, alpha=1 - dampening)
        if not nesterov:
            return pytree.tree_unflatten(bufs, spec), new_state, False   # the state itself
        if updates_owned:
            torch._foreach_add_(g, bufs, alpha=momentum)
            return updates, new_state, True
        return pytree.tree_unflatten(torch._foreach_add(g, bufs, alpha=momentum), spec), new_state, True
    return GradientTransformation(init, update, donated_update=donated_update)
