"""L2 weight decay added to the gradient (torch.optim.SGD / Adam ``weight_decay``).

    u = g + lambda * p          on the leaves the mask selects (all by default)
"""
from __future__ import annotations

from .base import (GradientTransformation, flatten_like, foreach, is_tensor_hyper, no_state, transformation,
                   unflatten)


def add_decayed_weights(weight_decay, mask=None) -> GradientTransformation:
    """``u = g + weight_decay * p`` (one ``torch._foreach_add(g, p, alpha=weight_decay)``; in place
    into the incoming updates when they are temporaries of a donated step, as torch does for a
    negated gradient).

    mask: None (decay every leaf), a tree of bools like params, or a callable params -> such a
    tree; leaves marked False pass through unchanged (torch: a param group with weight_decay=0).
    ``weight_decay`` may be a 0-d tensor (per member under ``vmap``); ``add(g, p, alpha=tensor)``
    is then ``addcmul(g, p, weight_decay)``, the same single rounding.
    """
    if mask is not None:
        from .combine import masked
        return masked(add_decayed_weights(weight_decay), mask)

    def kernel(updates, state, params, mode):
        fn = mode.name("add_decayed_weights")
        if params is None:
            raise ValueError(f"{fn}: expected params (weight decay needs them), got None")
        g, p, spec = flatten_like(fn, "updates", updates, "params", params)
        if not g or (not is_tensor_hyper(weight_decay) and weight_decay == 0):
            return updates, state, mode.updates_owned   # passed through: as owned as they came
        out = foreach("add", g, p, alpha=weight_decay, in_place=mode.updates_owned)
        return unflatten(out, spec, updates, mode.updates_owned), state, True
    return transformation(no_state, kernel)
