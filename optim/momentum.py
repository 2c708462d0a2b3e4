"""Heavy-ball and Nesterov momentum, as torch.optim.SGD computes it.

    b_1 = g_1                                   (first step: no dampening, as torch)
    b_t = mu * b_{t-1} + (1 - dampening) * g_t
    d_t = g_t + mu * b_t   if nesterov   else   b_t

Shapes: every leaf of the buffer has its parameter's shape and dtype.

The math is written once, in the kernel of :func:`trace`; its ``update`` and ``donated_update``
are the wrappers of :func:`optim.base.transformation`. With the state donated
(``step(..., donate=True)``) b_t is written into b_{t-1}'s storage with torch's in-place ops
(``_foreach_mul_``, ``_foreach_add_``; ``_foreach_copy_`` on the first step where torch clones),
and the Nesterov direction into the incoming updates when they are temporaries of the step (torch
writes it into its weight-decayed gradient copy).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils import _pytree as pytree

from .base import (GradientTransformation, Tree, count_tensor, foreach, step_count, tensor_leaves,
                   transformation, unflatten)


class TraceState(NamedTuple):
    """count: 0-d int64 updates done; momentum_buffer: b_t, a tree like params."""
    count: torch.Tensor
    momentum_buffer: Tree


def trace(momentum, dampening: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Momentum buffer update with torch.optim.SGD's order of operations (foreach path).

    ``momentum`` may be a 0-d tensor (a member's value under ``vmap``): the tensor path then
    selects ``b_1 = g`` with ``torch.where(count == 0, ...)`` instead of reading the count, and
    gives the same bits as the scalar path."""
    def init(params):
        leaves, spec = tensor_leaves("trace.init", "params", params)
        return TraceState(count_tensor(0), pytree.tree_unflatten([torch.zeros_like(x) for x in leaves], spec))

    def kernel(updates, state, params, mode):
        fn = mode.name("trace")
        g, spec = tensor_leaves(fn, "updates", updates)
        bufs_old, _ = tensor_leaves(fn, "state.momentum_buffer", state.momentum_buffer)
        if len(bufs_old) != len(g):
            raise ValueError(f"{fn}: expected a momentum buffer per update leaf ({len(g)}), "
                             f"got {len(bufs_old)}: was the state made by init on these params?")
        t = step_count(state.count, momentum, device=g[0].device if g else None)
        if not g:
            return updates, TraceState(count_tensor(state.count + 1), state.momentum_buffer), mode.updates_owned
        if isinstance(t, torch.Tensor):   # the tensor path: no host read of the count
            later = foreach("mul", bufs_old, momentum, in_place=False)
            later = foreach("add", later, g, alpha=1 - dampening, in_place=True)
            bufs = [torch.where(t == 0, gi, li) for gi, li in zip(g, later)]
            if mode.donate:
                bufs = foreach("copy", bufs_old, bufs, in_place=True)
        elif t == 0 and mode.donate:   # b_1 = g, copied into the donated buffer
            bufs = bufs_old
            torch._foreach_copy_(bufs, g)
        elif t == 0:                 # b_1 = g, a clone as torch's
            bufs = [x.clone() for x in g]
        else:                        # b_t = mu b_{t-1} + (1 - dampening) g
            bufs = foreach("mul", bufs_old, momentum, in_place=mode.donate)
            bufs = foreach("add", bufs, g, alpha=1 - dampening, in_place=True)
        new_state = TraceState(count_tensor(state.count + 1),
                               unflatten(bufs, spec, state.momentum_buffer, mode.donate))
        if not nesterov:
            return new_state.momentum_buffer, new_state, False   # the state itself
        direction = foreach("add", g, bufs, alpha=momentum, in_place=mode.updates_owned)   # g + mu b_t
        return unflatten(direction, spec, updates, mode.updates_owned), new_state, True
    return transformation(init, kernel)
