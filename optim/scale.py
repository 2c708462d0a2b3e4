"""Sign flips, the learning rate, and zero updates.

    negate:                  u = -g                       (torch ``maximize=True``)
    scale_by_learning_rate:  u = -lr_t * d,  lr_t = schedule(t), t = updates done so far
    set_to_zero:             u = 0                        (frozen parameters)

Each stage's math is written once, in its kernel; ``update``, ``donated_update`` and
``fused_step`` are the thin wrappers of :func:`optim.base.transformation`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils import _pytree as pytree

from .base import (GradientTransformation, count_tensor, flatten_like, foreach, no_state, rate_tensor,
                   step_count, tensor_leaves, transformation, unflatten)
from .schedules import as_schedule


def negate() -> GradientTransformation:
    """``u = -g`` (one ``torch._foreach_neg``; ``_foreach_neg_`` on updates that are temporaries
    of a donated step); stateless."""
    def kernel(updates, state, params, mode):
        leaves, spec = tensor_leaves(mode.name("negate"), "updates", updates)
        out = foreach("neg", leaves, in_place=mode.updates_owned)
        return unflatten(out, spec, updates, mode.updates_owned), state, True
    return transformation(no_state, kernel)


class LearningRateState(NamedTuple):
    """count: 0-d int64, updates done; lr: 0-d float64, the rate the next update uses."""
    count: torch.Tensor
    lr: torch.Tensor


def scale_by_learning_rate(lr) -> GradientTransformation:
    """``u = -lr_t * d`` with ``lr_t = lr`` or ``lr(t)`` for a schedule, t = updates done so far.

    ``lr`` may be a 0-d tensor (a member's rate under ``vmap``, as optax's inject_hyperparams);
    under a torch.func transform the count stays a tensor and a schedule is evaluated on it
    (:mod:`optim.schedules` accepts tensor steps). Nothing is read on the host then.

    The fused step writes ``p + (-lr_t) * d`` in one ``torch._foreach_add(p, d, alpha=-lr_t)``
    (``_foreach_add_`` into donated params), the last operation of torch.optim.SGD's foreach step.
    """
    schedule = as_schedule("scale_by_learning_rate", lr)

    def init(params):
        return LearningRateState(count_tensor(0), rate_tensor(schedule(0)))

    def kernel(updates, state, params, mode):
        fn = mode.name("scale_by_learning_rate")
        if mode.new_params:
            d, p, spec = flatten_like(fn, "updates", updates, "params", params)
        else:
            d, spec = tensor_leaves(fn, "updates", updates)
        t = step_count(state.count, lr, device=d[0].device if d else None)
        rate = schedule(t)
        rate = rate if isinstance(rate, torch.Tensor) else float(rate)
        new_state = LearningRateState(count_tensor(state.count + 1), rate_tensor(schedule(t + 1)))
        if mode.new_params:   # p + (-lr_t) d
            return unflatten(foreach("add", p, d, alpha=-rate, in_place=mode.donate), spec, params,
                             mode.donate), new_state, True
        out = foreach("mul", d, -rate, in_place=mode.updates_owned)   # -lr_t d
        return unflatten(out, spec, updates, mode.updates_owned), new_state, True
    return transformation(init, kernel, fused=True)


def set_to_zero() -> GradientTransformation:
    """``u = 0``; stateless. Its fused step returns the parameters unchanged (the same tensors)."""
    def kernel(updates, state, params, mode):
        fn = mode.name("set_to_zero")
        if mode.new_params:
            flatten_like(fn, "updates", updates, "params", params)
            return params, state, False
        leaves, spec = tensor_leaves(fn, "updates", updates)
        return pytree.tree_unflatten([torch.zeros_like(x) for x in leaves], spec), state, True
    return transformation(no_state, kernel, fused=True)
