"""Gradient clipping by global norm (torch.nn.utils.clip_grad_norm_, foreach path).

    n_k   = ||g_k||_2 per leaf, grouped by (device, dtype) like torch
    total = ||(n_1, ..., n_K)||_2
    u_k   = g_k * min(max_norm / (total + 1e-6), 1)
"""
from __future__ import annotations

from numbers import Real

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .base import (GradientTransformation, is_traced, no_state, tensor_leaves, transformation,
                   unflatten)


def _groups(leaves):
    """``[((device, dtype), indices)]`` in torch's own grouping order, so sums run as torch's."""
    grouped = _group_tensors_by_device_and_dtype([leaves], with_indices=True)
    return [(key, idx) for key, (_, idx) in grouped.items()]


def global_norm(leaves: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all leaves together, summed in torch's order (per-leaf norms grouped by
    device and dtype as torch groups them, then the norm of the stacked norms)."""
    norms = []
    if any(is_traced(x) for x in leaves):   # foreach ops have no vmap rule: leaf by leaf
        norms = [torch.linalg.vector_norm(x, 2.0) for x in leaves]
    for _, idx in ([] if norms else _groups(leaves)):
        norms.extend(torch._foreach_norm([leaves[i] for i in idx], 2.0))
    first_device = leaves[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), 2.0)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates by ``min(max_norm / (global_norm + 1e-6), 1)``; stateless. One kernel
    (the wrappers of :func:`optim.base.transformation`); in place on updates that are temporaries
    of a donated step.

    Departure from torch: torch accepts a negative max_norm (and flips the gradients); here it is
    a ValueError.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, Real):
        raise TypeError(f"clip_by_global_norm: expected max_norm to be a real number, got "
                        f"{type(max_norm).__name__}")
    if not max_norm >= 0:
        raise ValueError(f"clip_by_global_norm: expected max_norm >= 0, got {max_norm}")
    max_norm = float(max_norm)

    def kernel(updates, state, params, mode):
        leaves, spec = tensor_leaves(mode.name("clip_by_global_norm"), "updates", updates)
        if not leaves:
            return updates, state, mode.updates_owned
        clip_coef = max_norm / (global_norm(leaves) + 1e-6)
        clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
        out = list(leaves)
        for (device, _), idx in _groups(leaves):
            # torch multiplies in place by the float64 factor; the result's rounding depends on
            # the leaf (0-d float32 leaves are computed in float64), so copy (unless the updates
            # are temporaries of a donated step) and do exactly that.
            group = [leaves[i] if mode.updates_owned else leaves[i].clone() for i in idx]
            if any(is_traced(x) for x in group):   # under vmap: leaf by leaf, the same product
                group = [x.mul_(clip_coef_clamped.to(device)) for x in group]
            else:
                torch._foreach_mul_(group, clip_coef_clamped.to(device))
            for i, y in zip(idx, group):
                out[i] = y
        return unflatten(out, spec, updates, mode.updates_owned), state, True
    return transformation(no_state, kernel)
