"""Gradient clipping by global norm (torch.nn.utils.clip_grad_norm_, foreach path).

    n_k   = ||g_k||_2 per leaf, grouped by (device, dtype) like torch
    total = ||(n_1, ..., n_K)||_2
    u_k   = g_k * min(max_norm / (total + 1e-6), 1)
"""
from __future__ import annotations

from numbers import Real

import torch
from torch.utils import _pytree as pytree
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .base import EmptyState, GradientTransformation, tensor_leaves


def _groups(leaves):
    """``[((device, dtype), indices)]`` in torch's own grouping order, so sums run as torch's."""
    grouped = _group_tensors_by_device_and_dtype([leaves], with_indices=True)
    return [(key, idx) for key, (_, idx) in grouped.items()]


def global_norm(leaves: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all leaves together, summed in torch's order (per-leaf norms grouped by
    device and dtype as torch groups them, then the norm of the stacked norms)."""
    norms = []
    for _, idx in _groups(leaves):
        norms.extend(torch._foreach_norm([leaves[i] for i in idx], 2.0))
    first_device = leaves[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), 2.0)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates by ``min(max_norm / (global_norm + 1e-6), 1)``; stateless.

    Departure from torch: torch accepts a negative max_norm (and flips the gradients); here it is
    a ValueError.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, Real):
        raise TypeError(f"clip_by_global_norm: expected max_norm to be a real number, got "
                        f"{type(max_norm).__name__}")
    if not max_norm >= 0:
        raise ValueError(f"clip_by_global_norm: expected max_norm >= 0, got {max_norm}")
    max_norm = float(max_norm)

    def init(params):
        return EmptyState()

    def clipped(updates, state, in_place):
        leaves, spec = tensor_leaves("clip_by_global_norm.update", "updates", updates)
        if not leaves:
            return updates, state
        clip_coef = max_norm / (global_norm(leaves) + 1e-6)
        clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
        out = list(leaves) if in_place else [None] * len(leaves)
        for (device, _), idx in _groups(leaves):
            # torch multiplies in place by the float64 factor; the result's rounding depends on
            # the leaf (0-d float32 leaves are computed in float64), so copy and do exactly that.
            group = [leaves[i] if in_place else leaves[i].clone() for i in idx]
            torch._foreach_mul_(group, clip_coef_clamped.to(device))
            for i, y in zip(idx, group):
                out[i] = y
        return pytree.tree_unflatten(out, spec), state

    def update(updates, state, params=None):
        return clipped(updates, state, False)

    def donated_update(updates, state, params, updates_owned):
        return *clipped(updates, state, updates_owned), True
    return GradientTransformation(init, update, donated_update=donated_update)
