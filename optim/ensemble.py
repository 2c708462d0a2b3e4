"""An optimizer for K ensemble members at once: each member's own hyperparameters, one
``torch.func.vmap``-ed step, and a member that diverges is frozen instead of ending the run.

    opt = optim.vmapped(lambda lr, momentum: optim.sgd(lr, momentum=momentum, nesterov=True),
                        lr=torch.tensor([0.1, 0.01, 0.001]), momentum=torch.tensor([0.9, 0.9, 0.9]))
    state = opt.init(params)                  # params: stacked trees, leaves (K, ...)
    params, state = optim.step(opt, grads, state, params)

``make(**h)`` builds member k's optimizer from its hyperparameters ``h = {name: values[k]}``
(0-d tensors, the tensor hyperparameters of :mod:`optim.alias`); the step is
``vmap(lambda g, s, p, h: step(make(**h), g, s, p))``, so member k computes exactly what
``make`` with those numbers computes on member k's tree.

Divergence. A member whose gradients or new parameters hold a NaN or infinity is *diverged*:
its parameters and optimizer state keep their last finite values and ``state.diverged[k]``
turns True for good. The other members are untouched: no value of one member enters another's
arithmetic. The hyperparameters live in the state (as optax's ``inject_hyperparams`` keeps
them), so a checkpoint of the state says what every member was trained with.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.utils import _pytree as pytree

from trees import as_members, first_member

from .base import GradientTransformation, Tree, flatten_like, step, transformation

__all__ = ["VmappedState", "vmapped", "member_lrs"]


class VmappedState(NamedTuple):
    """inner: the members' optimizer states, stacked; hyperparams: ``{name: (K,) tensor}``;
    diverged: ``(K,)`` bool, True from a member's first non-finite step on."""
    inner: Tree
    hyperparams: dict
    diverged: torch.Tensor


def member_lrs(state: VmappedState) -> torch.Tensor | None:
    """``(K,)``: the rate each member's next update uses (None without an ``lr`` field)."""
    from .base import _find_field

    return _find_field(state.inner, "lr")


def _member_finite(tree, members: int) -> torch.Tensor:
    """``(K,)`` bool: member k's floating leaves hold no NaN and no infinity.

    Two reductions per leaf, the largest and the smallest of each member's elements: both are
    finite exactly when every element is (a NaN propagates through ``amax`` / ``amin``, +inf
    reaches the largest and -inf the smallest). No value is summed, so nothing can overflow, and
    neither reduction allocates a temporary of the leaf's size (``isfinite(x).all()`` does)."""
    ends = []
    for x in pytree.tree_leaves(tree):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            dims = tuple(range(1, x.dim()))
            ends += [torch.isfinite(x)] if not dims else [torch.isfinite(x.amax(dims)),
                                                          torch.isfinite(x.amin(dims))]
    if not ends:
        return torch.ones(members, dtype=torch.bool)
    return torch.stack(ends).all(0)


def vmapped(make: Callable[..., GradientTransformation], **hyperparams: torch.Tensor) -> GradientTransformation:
    """K members' optimizers as one (module docstring). Every hyperparameter is a ``(K,)``
    floating tensor (float64 keeps a Python float's value exactly)."""
    if not hyperparams:
        raise ValueError("vmapped: expected at least one hyperparameter (K,) tensor, got none")
    sizes = {name: tuple(v.shape) if isinstance(v, torch.Tensor) else None for name, v in hyperparams.items()}
    if any(s is None or len(s) != 1 for s in sizes.values()) or len({s[0] for s in sizes.values()}) != 1:
        raise ValueError(f"vmapped: expected (K,) tensors of one length K, got shapes {sizes}")
    members = next(iter(sizes.values()))[0]
    names = sorted(hyperparams)

    def member_opt(h):
        return make(**h)

    def init(params):
        inner = torch.func.vmap(lambda p, h: member_opt(h).init(p))(params, dict(hyperparams))
        return VmappedState(inner, dict(hyperparams), torch.zeros(members, dtype=torch.bool))

    def member_step(g, s, p, h):
        return step(member_opt(h), g, s, p)

    def freeze(new, old, ok):
        """Member k's ``new`` leaves where ``ok[k]``, else its ``old`` ones."""
        def keep(n, o):
            if not isinstance(n, torch.Tensor):
                return n
            return torch.where(ok.to(n.device).view((members,) + (1,) * (n.dim() - 1)), n, o)
        return pytree.tree_map(keep, new, old)

    def kernel(updates, state, params, mode):
        fn = mode.name("vmapped")
        if not isinstance(state, VmappedState):
            raise TypeError(f"{fn}: expected a VmappedState (from vmapped(...).init), got "
                            f"{type(state).__name__}")
        if params is None:
            raise ValueError(f"{fn}: expected params, got None")
        flatten_like(fn, "updates", updates, "params", params)
        h = {name: state.hyperparams[name] for name in names}
        if members == 1:   # vmap over one member is the member itself (trees.members)
            new_p, new_inner = as_members(member_step(*first_member((updates, state.inner, params, h))))
        else:
            new_p, new_inner = torch.func.vmap(member_step)(updates, state.inner, params, h)
        ok = _member_finite(updates, members) & _member_finite(new_p, members)
        ok = ok & ~state.diverged.to(ok.device)
        # One host read a step: while every member is finite (the usual case) the new values
        # are taken as they are, and the freezing pass over every leaf is skipped.
        if not bool(ok.all()):
            new_p, new_inner = freeze(new_p, params, ok), freeze(new_inner, state.inner, ok)
        new_state = VmappedState(new_inner, state.hyperparams, state.diverged | ~ok.to(state.diverged.device))
        if mode.new_params:
            return new_p, new_state, False
        return pytree.tree_map(torch.sub, new_p, params), new_state, True
    return transformation(init, kernel, fused=True)
