"""Sign flips, the learning rate, and zero updates.

    negate:                  u = -g                       (torch ``maximize=True``)
    scale_by_learning_rate:  u = -lr_t * d,  lr_t = schedule(t), t = updates done so far
    set_to_zero:             u = 0                        (frozen parameters)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils import _pytree as pytree

from .base import EmptyState, GradientTransformation, count_tensor, flatten_like, tensor_leaves
from .schedules import as_schedule


def negate() -> GradientTransformation:
    """``u = -g`` (one ``torch._foreach_neg``); stateless."""
    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        leaves, spec = tensor_leaves("negate.update", "updates", updates)
        return pytree.tree_unflatten(torch._foreach_neg(leaves) if leaves else [], spec), state

    def donated_update(updates, state, params, updates_owned):
        leaves, _ = tensor_leaves("negate.update", "updates", updates)
        if not updates_owned:
            return *update(updates, state, params), True
        if leaves:
            torch._foreach_neg_(leaves)
        return updates, state, True
    return GradientTransformation(init, update, donated_update=donated_update)


class LearningRateState(NamedTuple):
    """count: 0-d int64, updates done; lr: 0-d float64, the rate the next update uses."""
    count: torch.Tensor
    lr: torch.Tensor


def scale_by_learning_rate(lr) -> GradientTransformation:
    """``u = -lr_t * d`` with ``lr_t = lr`` or ``lr(t)`` for a schedule, t = updates done so far.

    The fused step writes ``p + (-lr_t) * d`` in one ``torch._foreach_add(p, d, alpha=-lr_t)``
    (``_foreach_add_`` into donated params), the last operation of torch.optim.SGD's foreach step.
    """
    schedule = as_schedule("scale_by_learning_rate", lr)

    def init(params):
        return LearningRateState(count_tensor(0), torch.tensor(float(schedule(0)), dtype=torch.float64))

    def advance(state):
        t = int(state.count)
        rate = float(schedule(t))
        return rate, LearningRateState(count_tensor(t + 1),
                                       torch.tensor(float(schedule(t + 1)), dtype=torch.float64))

    def update(updates, state, params=None):
        leaves, spec = tensor_leaves("scale_by_learning_rate.update", "updates", updates)
        rate, state = advance(state)
        return pytree.tree_unflatten(torch._foreach_mul(leaves, -rate) if leaves else [], spec), state

    def donated_update(updates, state, params, updates_owned):
        if not updates_owned:
            return *update(updates, state, params), True
        leaves, _ = tensor_leaves("scale_by_learning_rate.update", "updates", updates)
        rate, state = advance(state)
        if leaves:
            torch._foreach_mul_(leaves, -rate)
        return updates, state, True

    def fused_step(updates, state, params, donate=False):
        d, p, spec = flatten_like("scale_by_learning_rate.step", "updates", updates, "params", params)
        rate, state = advance(state)
        if not p:
            return params, state
        if donate:
            torch._foreach_add_(p, d, alpha=-rate)
            return params, state
        return pytree.tree_unflatten(torch._foreach_add(p, d, alpha=-rate), spec), state
    return GradientTransformation(init, update, fused_step, donated_update)


def set_to_zero() -> GradientTransformation:
    """``u = 0``; stateless. Its fused step returns the parameters unchanged (the same tensors)."""
    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        leaves, spec = tensor_leaves("set_to_zero.update", "updates", updates)
        return pytree.tree_unflatten([torch.zeros_like(x) for x in leaves], spec), state

    def fused_step(updates, state, params, donate=False):
        flatten_like("set_to_zero.step", "updates", updates, "params", params)
        return params, state

    def donated_update(updates, state, params, updates_owned):
        return *update(updates, state, params), True
    return GradientTransformation(init, update, fused_step, donated_update)
