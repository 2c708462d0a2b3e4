"""The Adam / AdamW step as torch.optim.Adam's foreach path computes it.

With t = updates done + 1, lr_t from the schedule, g the incoming (already negated / L2-decayed)
gradient, all leaves of shape and dtype of their parameter:

    p     <- p * (1 - lr_t * lambda)                 decoupled decay (AdamW), masked leaves only
    m_t    = lerp(m_{t-1}, g, 1 - beta1)              = beta1 m + (1 - beta1) g
    v_t    = beta2 v_{t-1} + (1 - beta2) g * g
    vmax_t = max(vmax_{t-1}, v_t)                     amsgrad only; used instead of v_t below
    denom  = sqrt(v_t) / sqrt(1 - beta2^t) + eps
    p     <- p + (-(lr_t / (1 - beta1^t))) * m_t / denom

The learning rate lives here (not in a separate scale stage) because torch folds it into
``step_size = lr / (1 - beta1^t)`` and into the decoupled decay factor; keeping it lets the fused
step reproduce torch's floating-point operations one for one. ``update`` returns
``new_p - p`` computed as ``(-lr_t lambda) p + step_size * m / denom``.

With the state donated, m, v and vmax are written into their old storage (``_foreach_lerp_``,
``_foreach_mul_`` + ``_foreach_addcmul_``, ``_foreach_maximum_``) and, in the donated fused step,
p too (``_foreach_mul_``, ``_foreach_addcdiv_``): torch.optim.Adam's foreach step op for op. The
one temporary is ``denom`` (torch allocates it too).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils import _pytree as pytree

from .base import GradientTransformation, Tree, count_tensor, flatten_like, tensor_leaves
from .masks import resolve_labels
from .schedules import as_schedule


class ScaleByAdamState(NamedTuple):
    """count: 0-d int64 updates done; lr: 0-d float64 rate of the next update; mu, nu: first and
    raw second moments (trees like params); nu_max: running max of nu (amsgrad), else ()."""
    count: torch.Tensor
    lr: torch.Tensor
    mu: Tree
    nu: Tree
    nu_max: Tree


def scale_by_adam(lr=1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  amsgrad: bool = False, weight_decay: float = 0.0,
                  weight_decay_mask=None) -> GradientTransformation:
    """Adam's moment estimates, bias correction, learning rate and decoupled weight decay.

    weight_decay here is AdamW's decoupled decay; Adam's L2 decay is ``add_decayed_weights``
    chained before this stage. weight_decay_mask: tree of bools / callable, False = no decay.
    """
    schedule = as_schedule("scale_by_adam", lr)

    def init(params):
        leaves, spec = tensor_leaves("scale_by_adam.init", "params", params)
        zeros = lambda: pytree.tree_unflatten([torch.zeros_like(x) for x in leaves], spec)
        return ScaleByAdamState(count_tensor(0), torch.tensor(float(schedule(0)), dtype=torch.float64),
                                zeros(), zeros(), zeros() if amsgrad else ())

    def moments(fn, updates, state, params, donate):
        """New state (written into ``state``'s moments when ``donate``) and the pieces of the
        parameter step; returns (g, p, spec, rate, step_sizes, mu, denom, decay_leaves, new_state)."""
        g, p, spec = flatten_like(fn, "updates", updates, "params", params)
        mu_old, _ = tensor_leaves(fn, "state.mu", state.mu)
        nu_old, _ = tensor_leaves(fn, "state.nu", state.nu)
        if len(mu_old) != len(g) or len(nu_old) != len(g):
            raise ValueError(f"{fn}: expected moments for {len(g)} leaves, got {len(mu_old)}: was "
                             "the state made by init on these params?")
        count = int(state.count)
        rate, t = float(schedule(count)), count + 1
        decay = [False] * len(p)
        if weight_decay != 0:
            decay = (resolve_labels(fn, weight_decay_mask, params) if weight_decay_mask is not None
                     else [True] * len(p))
        if not g:
            return g, p, spec, rate, [], [], [], decay, state._replace(
                count=count_tensor(t), lr=torch.tensor(float(schedule(t)), dtype=torch.float64))
        if donate:
            mu, nu = mu_old, nu_old
            torch._foreach_lerp_(mu, g, 1 - b1)
            torch._foreach_mul_(nu, b2)
        else:
            mu = torch._foreach_lerp(mu_old, g, 1 - b1)
            nu = torch._foreach_mul(nu_old, b2)
        torch._foreach_addcmul_(nu, g, g, 1 - b2)
        bias_correction1 = [1 - b1 ** t for _ in g]
        bias_correction2 = [1 - b2 ** t for _ in g]
        step_sizes = [(rate / bc) * -1 for bc in bias_correction1]
        bias_correction2_sqrt = [bc ** 0.5 for bc in bias_correction2]
        if amsgrad:
            nu_max_old, _ = tensor_leaves(fn, "state.nu_max", state.nu_max)
            if donate:
                nu_max = nu_max_old
                torch._foreach_maximum_(nu_max, nu)
            else:
                nu_max = torch._foreach_maximum(nu_max_old, nu)
            denom = torch._foreach_sqrt(nu_max)
            nu_max_tree = pytree.tree_unflatten(nu_max, spec)
        else:
            denom = torch._foreach_sqrt(nu)
            nu_max_tree = ()
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        new_state = ScaleByAdamState(count_tensor(t), torch.tensor(float(schedule(t)), dtype=torch.float64),
                                     pytree.tree_unflatten(mu, spec), pytree.tree_unflatten(nu, spec),
                                     nu_max_tree)
        return g, p, spec, rate, step_sizes, mu, denom, decay, new_state

    def updates_from(fn, updates, state, params, donate):
        if params is None:
            raise ValueError(f"{fn}: expected params, got None")
        g, p, spec, rate, step_sizes, mu, denom, decay, new_state = moments(
            fn, updates, state, params, donate)
        if not g:
            return updates, new_state
        # (step_size * m) / denom is the term addcdiv adds, so p + u equals torch's addcdiv.
        out = torch._foreach_mul(mu, step_sizes)
        torch._foreach_div_(out, denom)
        idx = [i for i, d in enumerate(decay) if d]
        if idx:
            decayed = torch._foreach_mul([p[i] for i in idx], -rate * weight_decay)
            torch._foreach_add_([out[i] for i in idx], decayed)
        return pytree.tree_unflatten(out, spec), new_state

    def update(updates, state, params=None):
        return updates_from("scale_by_adam.update", updates, state, params, False)

    def donated_update(updates, state, params, updates_owned):
        return *updates_from("scale_by_adam.update", updates, state, params, True), True

    def fused_step(updates, state, params, donate=False):
        g, p, spec, rate, step_sizes, mu, denom, decay, new_state = moments(
            "scale_by_adam.step", updates, state, params, donate)
        if not g:
            return params, new_state
        decayed = [i for i, d in enumerate(decay) if d]
        pick = lambda xs, idx: [xs[i] for i in idx]
        if donate:
            # torch: p *= 1 - lr * lambda (decayed leaves), then p += step_size * m / denom.
            if decayed:
                torch._foreach_mul_(pick(p, decayed), 1 - rate * weight_decay)
            torch._foreach_addcdiv_(p, mu, denom, step_sizes)
            return params, new_state
        new_p = list(p)
        if decayed:
            # The same two operations, the first out of place (a fresh decayed copy).
            for i, x in zip(decayed, torch._foreach_mul(pick(p, decayed), 1 - rate * weight_decay)):
                new_p[i] = x
            torch._foreach_addcdiv_(pick(new_p, decayed), pick(mu, decayed), pick(denom, decayed),
                                    pick(step_sizes, decayed))
        kept = [i for i, d in enumerate(decay) if not d]
        if kept:
            for i, x in zip(kept, torch._foreach_addcdiv(pick(p, kept), pick(mu, kept),
                                                         pick(denom, kept), pick(step_sizes, kept))):
                new_p[i] = x
        return pytree.tree_unflatten(new_p, spec), new_state
    return GradientTransformation(init, update, fused_step, donated_update)
