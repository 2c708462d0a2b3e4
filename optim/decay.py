"""L2 weight decay added to the gradient (torch.optim.SGD / Adam ``weight_decay``).

    u = g + lambda * p          on the leaves the mask selects (all by default)
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from . import buffers
from .base import EmptyState, GradientTransformation, flatten_like


def add_decayed_weights(weight_decay: float, mask=None) -> GradientTransformation:
    """``u = g + weight_decay * p`` (one ``buffers.add(g, p, alpha=weight_decay)``).

    mask: None (decay every leaf), a tree of bools like params, or a callable params -> such a
    tree; leaves marked False pass through unchanged (torch: a param group with weight_decay=0).
    """
    if mask is not None:
        from .combine import masked
        return masked(add_decayed_weights(weight_decay), mask)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights.update: expected params (weight decay needs "
                             "them), got None")
        g, p, spec = flatten_like("add_decayed_weights.update", "updates", updates, "params", params)
        if weight_decay == 0 or not g:
            return updates, state
        return pytree.tree_unflatten(buffers.add(g, p, alpha=weight_decay), spec), state
    return GradientTransformation(init, update)
