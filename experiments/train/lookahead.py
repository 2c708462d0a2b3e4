"""airbench's lookahead: every ``k`` steps the weights are pulled to an exponential moving average
of themselves (Zhang et al. 2019's lookahead with airbench's decay schedule).

With ``c`` the number of updates done and ``T`` the run's total:

    every k-th update (c mod k = 0):   d_c  = d_max (c / T)^3                decay, 0 -> d_max
                                       slow <- d_c slow + (1 - d_c) fast     (lerp(slow, fast, 1 - d_c))
                                       fast <- slow
    after the last update (c = T):     fast <- slow

applied to every floating tensor of the net: the parameters and the batch-norm running statistics
(``num_batches_tracked``, an integer, is left alone), as airbench lerps its ``state_dict``.
airbench uses ``k = 5`` and ``d_max = 0.95^5``: early on ``d_c ~ 0`` and the slow copy just follows
the weights; in the last steps ``d_c -> 0.77`` and the weights average over the recent past.

The slow copy lives in the optimizer state (:class:`LookaheadState`, so it is checkpointed with
it and a resumed run is bit-identical); :func:`lookahead` wraps an optimizer to carry it, and
:func:`lookahead_step` wraps the trainer's step (``FitHooks.wrap_step``) to do the pulling, since
it touches the net's state as well as its parameters.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

import optim
from layers import random as jr
from optim.base import count_tensor, run, transformation

from .hooks import FitHooks

__all__ = ["LookaheadState", "lookahead", "lookahead_step", "lookahead_decay", "sync",
           "with_lookahead"]


class LookaheadState(NamedTuple):
    """``inner``: the wrapped optimizer's state; ``slow_params``, ``slow_state``: the slow copy
    of the parameters and of the floating entries of the net's state; ``count``: updates done."""

    inner: Any
    slow_params: dict
    slow_state: dict
    count: torch.Tensor


def _floating(state: dict) -> dict:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def lookahead(inner: optim.GradientTransformation, net_state: dict) -> optim.GradientTransformation:
    """``inner`` with a slow copy of the weights in its state: ``init(params)`` copies ``params``
    and the floating entries of ``net_state`` (the net's initial state, in the parameters' dtype
    and device), ``update`` is ``inner``'s
    (the copy is only read and written by :func:`sync`) and counts the updates."""
    slow_state0 = {k: v.detach().clone() for k, v in _floating(net_state).items()}

    def init(params):
        like = next(iter(params.values()))   # the state's copy in the parameters' dtype and device
        return LookaheadState(inner.init(params), {k: v.detach().clone() for k, v in params.items()},
                              {k: v.to(dtype=like.dtype, device=like.device, copy=True)
                               for k, v in slow_state0.items()}, count_tensor(0))

    def kernel(updates, state, params, mode):
        out, inner_state, owned = run(inner, updates, state.inner, params, mode)
        return out, state._replace(inner=inner_state, count=state.count + 1), owned
    return transformation(init, kernel, fused=True)


def lookahead_decay(count: int, total_steps: int, max_decay: float = 0.95 ** 5) -> float:
    """``d_c = max_decay (count / total_steps)^3``: the slow copy's weight at update ``count``."""
    return max_decay * (count / total_steps) ** 3


def sync(params: dict, state: dict, la: LookaheadState, decay: float):
    """One pull: ``slow <- lerp(slow, fast, 1 - decay)``, ``fast <- slow`` for the parameters and
    the floating state. Returns ``(params, state, la)``; nothing passed in is modified (the new
    weights are copies of the new slow tensors, not the same storage)."""
    slow_p = {k: torch.lerp(v, params[k], 1 - decay) for k, v in la.slow_params.items()}
    slow_s = {k: torch.lerp(v, state[k], 1 - decay) for k, v in la.slow_state.items()}
    new_params = {k: v.clone() for k, v in slow_p.items()}
    new_state = {**state, **{k: v.clone() for k, v in slow_s.items()}}
    return new_params, new_state, la._replace(slow_params=slow_p, slow_state=slow_s)


def lookahead_step(total_steps: int, every: int = 5, max_decay: float = 0.95 ** 5) -> Callable:
    """``wrap_step(step) -> step`` for :class:`~experiments.train.hooks.FitHooks`: after each
    update ``c`` (the count in the :class:`LookaheadState` the step returns), :func:`sync` with
    ``lookahead_decay(c)`` when ``c mod every = 0``, and with decay 1 (the weights become the slow
    copy) when ``c = total_steps``."""
    def wrap(step):
        def wrapped(params, state, opt_state, batch, key):
            params, state, opt_state, metrics = step(params, state, opt_state, batch, key)
            c = int(opt_state.count)
            if c % every == 0:
                params, state, opt_state = sync(params, state, opt_state,
                                                lookahead_decay(c, total_steps, max_decay))
            if c == total_steps:
                params, state, opt_state = sync(params, state, opt_state, 1.0)
            return params, state, opt_state, metrics
        return wrapped
    return wrap


def with_lookahead(net, opt: optim.GradientTransformation, total_steps: int, *, every: int = 5,
                   max_decay: float = 0.95 ** 5, hooks: FitHooks | None = None):
    """``(opt, hooks)`` that train ``net`` with lookahead over a run of ``total_steps`` updates:
    ``opt`` wrapped by :func:`lookahead` (its slow copy of the net's state starts from
    ``net.init``'s running statistics, which involve no draw) and ``hooks`` (a
    :class:`FitHooks`, default empty) with :func:`lookahead_step` as its ``wrap_step``, around
    any wrapper it already had."""
    hooks = FitHooks() if hooks is None else hooks
    _, state0 = net.init(jr.key(0))
    pull, inner = lookahead_step(total_steps, every, max_decay), hooks.wrap_step

    def wrap(step):
        return pull(step if inner is None else inner(step))
    return lookahead(opt, state0), hooks._replace(wrap_step=wrap)
