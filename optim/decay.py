"""L2 weight decay added to the gradient (torch.optim.SGD / Adam ``weight_decay``).

    u = g + lambda * p          on the leaves the mask selects (all by default)
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from .base import EmptyState, GradientTransformation, flatten_like


def add_decayed_weights(weight_decay: float, mask=None) -> GradientTransformation:
    """``u = g + weight_decay * p`` (one ``torch._foreach_add(g, p, alpha=weight_decay)``; in place
    into the incoming updates when they are temporaries of a donated step, as torch does for a
    negated gradient).

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
        return pytree.tree_unflatten(torch._foreach_add(g, p, alpha=weight_decay), spec), state

    def donated_update(updates, state, params, updates_owned):
        if weight_decay == 0 or not updates_owned:
            # (with weight_decay == 0 the updates pass through: as owned as they came)
            new, state = update(updates, state, params)
            return new, state, updates_owned or weight_decay != 0
        if params is None:
            update(updates, state, params)   # raises its error
        g, p, _ = flatten_like("add_decayed_weights.update", "updates", updates, "params", params)
        if g:
            torch._foreach_add_(g, p, alpha=weight_decay)
        return updates, state, True
    return GradientTransformation(init, update, donated_update=donated_update)
