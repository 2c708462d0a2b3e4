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
step reproduce torch's floating-point operations one for one.

One kernel computes all of it; ``update``, ``donated_update`` and ``fused_step`` are the wrappers
of :func:`optim.base.transformation`. The kernel's first half, :class:`AdamMoments`, is common to
all three; its second half either returns the updates ``new_p - p``, computed as
``(-lr_t lambda) p + step_size * m / denom`` (``update``, ``donated_update``), or writes the new
parameters with torch's two operations, ``p * (1 - lr_t lambda)`` then ``addcdiv`` (the fused step
training runs).

With the state donated, m, v and vmax are written into their old storage (``_foreach_lerp_``,
``_foreach_mul_`` + ``_foreach_addcmul_``, ``_foreach_maximum_``) and, in the donated fused step,
p too (``_foreach_mul_``, ``_foreach_addcdiv_``): torch.optim.Adam's foreach step op for op. The
one temporary is ``denom`` (torch allocates it too).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils import _pytree as pytree

from .base import (GradientTransformation, Tree, count_tensor, flatten_like, foreach, is_tensor_hyper,
                   rate_tensor, step_count, tensor_leaves, transformation, unflatten)
from .masks import resolve_labels
from .schedules import as_schedule


def _as64(x) -> torch.Tensor:
    """A beta as a float64 tensor (a Python float or a member's tensor under ``vmap``), so that
    ``beta ** t`` with a tensor count keeps double precision as the host path does."""
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)


def _tensors(scalars: list) -> bool:
    """Whether a per-leaf scalar list holds tensors (the tensor path), not Python floats."""
    return any(isinstance(x, torch.Tensor) for x in scalars)


class ScaleByAdamState(NamedTuple):
    """count: 0-d int64 updates done; lr: 0-d float64 rate of the next update; mu, nu: first and
    raw second moments (trees like params); nu_max: running max of nu (amsgrad), else ()."""
    count: torch.Tensor
    lr: torch.Tensor
    mu: Tree
    nu: Tree
    nu_max: Tree


class AdamMoments(NamedTuple):
    """The first half of an Adam step, before the parameters are touched; lists align with the
    leaves. mu: m_t; denom: ``sqrt(v_t or vmax_t) / sqrt(1 - beta2^t) + eps``; step_sizes:
    ``-(lr_t / (1 - beta1^t))`` per leaf (torch's scalar list); state: the new state."""
    mu: list
    denom: list
    step_sizes: list
    state: ScaleByAdamState


def scale_by_adam(lr=1e-3, b1=0.9, b2=0.999, eps: float = 1e-8,
                  amsgrad: bool = False, weight_decay=0.0,
                  weight_decay_mask=None) -> GradientTransformation:
    """Adam's moment estimates, bias correction, learning rate and decoupled weight decay.

    ``lr``, ``b1``, ``b2`` and ``weight_decay`` may be 0-d tensors (a member's values under
    ``vmap``): the count then stays a tensor and the bias corrections are computed on the device
    in float64 (the tensor path; with float betas it gives the scalar path's bits, the tensor step
    size folded into ``addcdiv(p, step_size * m, denom)`` in torch's own order of operations).

    weight_decay here is AdamW's decoupled decay; Adam's L2 decay is ``add_decayed_weights``
    chained before this stage. weight_decay_mask: tree of bools / callable, False = no decay.
    """
    schedule = as_schedule("scale_by_adam", lr)

    def init(params):
        leaves, spec = tensor_leaves("scale_by_adam.init", "params", params)
        zeros = lambda: pytree.tree_unflatten([torch.zeros_like(x) for x in leaves], spec)
        return ScaleByAdamState(count_tensor(0), rate_tensor(schedule(0)),
                                zeros(), zeros(), zeros() if amsgrad else ())

    def moments(g, spec, state, mu_old, nu_old, nu_max_old, t, rate, donate) -> AdamMoments:
        """m_t, v_t (vmax_t), denom and the step sizes of step ``t``; written into the storage
        of ``state``'s moments (``mu_old``, ... are its leaves) when ``donate``."""
        mu = foreach("lerp", mu_old, g, 1 - b1, in_place=donate)
        nu = foreach("mul", nu_old, b2, in_place=donate)
        nu = foreach("addcmul", nu, g, g, value=1 - b2, in_place=True)
        if isinstance(t, torch.Tensor):   # the tensor path: bias corrections on the device, in float64
            bias_correction1 = [1 - _as64(b1) ** t for _ in g]
            bias_correction2 = [1 - _as64(b2) ** t for _ in g]
        else:
            bias_correction1 = [1 - b1 ** t for _ in g]
            bias_correction2 = [1 - b2 ** t for _ in g]
        # (a Python number over a tensor is reciprocal-then-multiply in torch, a rounding away
        # from the host path's division: divide a float64 tensor instead)
        step_sizes = [(_as64(rate) / bc if isinstance(bc, torch.Tensor) else rate / bc) * -1
                      for bc in bias_correction1]
        # torch.optim takes the host's pow(x, 0.5), which is not always sqrt(x) (a last bit apart),
        # and ``tensor ** 0.5`` is sqrt: a tensor exponent gives pow's bits
        bias_correction2_sqrt = [torch.pow(bc, _as64(0.5)) if isinstance(bc, torch.Tensor) else bc ** 0.5
                                 for bc in bias_correction2]
        if amsgrad:
            nu_max = foreach("maximum", nu_max_old, nu, in_place=donate)
            denom = foreach("sqrt", nu_max, in_place=False)
            nu_max_tree = unflatten(nu_max, spec, state.nu_max, donate)
        else:
            denom = foreach("sqrt", nu, in_place=False)
            nu_max_tree = ()
        denom = foreach("div", denom, bias_correction2_sqrt, in_place=True,
                        leafwise=_tensors(bias_correction2_sqrt))
        denom = foreach("add", denom, eps, in_place=True)
        new_state = ScaleByAdamState(count_tensor(state.count + 1), rate_tensor(schedule(t)),
                                     unflatten(mu, spec, state.mu, donate),
                                     unflatten(nu, spec, state.nu, donate), nu_max_tree)
        return AdamMoments(mu=mu, denom=denom, step_sizes=step_sizes, state=new_state)

    def updates_from(p, m: AdamMoments, rate, decayed):
        """``(-lr_t lambda) p + step_size * m / denom`` (``step_size * m / denom`` is the term
        addcdiv adds, so ``p + u`` equals torch's addcdiv): always new tensors."""
        out = foreach("mul", m.mu, m.step_sizes, in_place=False, leafwise=_tensors(m.step_sizes))
        out = foreach("div", out, m.denom, in_place=True)
        if decayed:
            decay = foreach("mul", [p[i] for i in decayed], -rate * weight_decay, in_place=False)
            for i, x in zip(decayed, foreach("add", [out[i] for i in decayed], decay, in_place=True)):
                out[i] = x
        return out

    def params_from(p, m: AdamMoments, rate, decayed, donate):
        """torch: ``p *= 1 - lr_t lambda`` on the decayed leaves, then ``p += step_size * m /
        denom`` (addcdiv). Donated, both in place; pure, the product is a fresh tensor that the
        addcdiv then writes into, and the other leaves get a fresh addcdiv."""
        new_p, writable = list(p), [donate] * len(p)
        for i, x in zip(decayed, foreach("mul", [p[i] for i in decayed], 1 - rate * weight_decay,
                                         in_place=donate)):
            new_p[i], writable[i] = x, True
        for in_place in (True, False):
            idx = [i for i, w in enumerate(writable) if w == in_place]
            pick = lambda xs: [xs[i] for i in idx]
            for i, x in zip(idx, foreach("addcdiv", pick(new_p), pick(m.mu), pick(m.denom),
                                         pick(m.step_sizes), in_place=in_place,
                                         leafwise=_tensors(m.step_sizes))):
                new_p[i] = x
        return new_p

    def kernel(updates, state, params, mode):
        fn = mode.name("scale_by_adam")
        if params is None:
            raise ValueError(f"{fn}: expected params, got None")
        g, p, spec = flatten_like(fn, "updates", updates, "params", params)
        mu_old, _ = tensor_leaves(fn, "state.mu", state.mu)
        nu_old, _ = tensor_leaves(fn, "state.nu", state.nu)
        if len(mu_old) != len(g) or len(nu_old) != len(g):
            raise ValueError(f"{fn}: expected moments for {len(g)} leaves, got {len(mu_old)} in state.mu "
                             f"and {len(nu_old)} in state.nu: was the state made by init on these params?")
        count = step_count(state.count, lr, b1, b2, weight_decay, device=g[0].device if g else None)
        rate = schedule(count)
        rate = rate if isinstance(rate, torch.Tensor) else float(rate)
        decayed = []
        if is_tensor_hyper(weight_decay) or weight_decay != 0:
            decay = (resolve_labels(fn, weight_decay_mask, params) if weight_decay_mask is not None
                     else [True] * len(p))
            decayed = [i for i, d in enumerate(decay) if d]
        if not g:
            return (params if mode.new_params else updates), state._replace(
                count=count_tensor(state.count + 1), lr=rate_tensor(schedule(count + 1))), True
        nu_max_old = tensor_leaves(fn, "state.nu_max", state.nu_max)[0] if amsgrad else None
        m = moments(g, spec, state, mu_old, nu_old, nu_max_old, count + 1, rate, mode.donate)
        if mode.new_params:
            new_p = params_from(p, m, rate, decayed, mode.donate)
            return unflatten(new_p, spec, params, mode.donate), m.state, False
        return pytree.tree_unflatten(updates_from(p, m, rate, decayed), spec), m.state, True
    return transformation(init, kernel, fused=True)
