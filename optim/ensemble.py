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

__all__ = ["VmappedState", "vmapped", "member_lrs", "FLAT"]


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

    The largest and the smallest of each member's elements are finite exactly when every element
    is (a NaN propagates through the min and max, +inf reaches the largest and -inf the
    smallest). No value is summed, so nothing can overflow. The leaves of each dtype are laid
    side by side per member, ``(K, sum of leaf sizes)`` (no copy where they already are: the
    flat optimizer's buffers), and reduced once each way: two reductions instead of two per
    leaf, whose fixed cost per operation is what a small net's step spends
    (docs/performance.md, "Ensembles")."""
    by_dtype: dict = {}
    for x in pytree.tree_leaves(tree):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            by_dtype.setdefault(x.dtype, []).append(x.reshape(members, -1))
    ok = torch.ones(members, dtype=torch.bool)
    for cols in by_dtype.values():
        side_by_side = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
        # (amax and amin, not aminmax: on the CPU aminmax of rows runs 14x slower than both)
        lo, hi = side_by_side.amin(1), side_by_side.amax(1)
        ok = ok.to(lo.device) & torch.isfinite(lo) & torch.isfinite(hi)
    return ok


#: The one key of a flat buffer's dict (:func:`vmapped` with ``flat=True``).
FLAT = "flat buffer"


def _each_child(fn, tree):
    """``fn`` of each child of a namedtuple, tuple, list or dict, in a container of the same
    type; any other node is returned as it is."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(fn(c) for c in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(fn(c) for c in tree)
    if isinstance(tree, dict):
        return {k: fn(v) for k, v in tree.items()}
    return tree


class _Flat:
    """Every subtree shaped like ``params`` (same structure: the parameters, the updates, a
    momentum buffer, Adam's moments) as one dict ``{FLAT: (K, P)}``: member k's leaves laid end
    to end (``P`` elements in all), and back."""

    def __init__(self, params, members: int):
        leaves, self.spec = pytree.tree_flatten(params)
        self.root_type = type(params)
        self.root_len = len(params) if isinstance(params, (dict, list, tuple)) else -1
        self.shapes = [tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else () for x in leaves]
        self.sizes = [x[0].numel() if isinstance(x, torch.Tensor) and x.dim() else 1 for x in leaves]
        self.members = members
        # one buffer per member needs one dtype, and leaves that all carry the member dimension
        self.usable = (bool(leaves) and all(isinstance(x, torch.Tensor) and x.dim() >= 1
                                            and x.shape[0] == members for x in leaves)
                       and len({x.dtype for x in leaves}) == 1 and leaves[0].is_floating_point())

    def _is_like(self, node) -> bool:
        # the cheap tests first: most nodes of a state differ from params at the root already
        if type(node) is not self.root_type or len(node) != self.root_len:
            return False
        if isinstance(node, (dict, list, tuple)):
            leaves, spec = pytree.tree_flatten(node)
            return spec == self.spec and all(isinstance(x, torch.Tensor) for x in leaves)
        return False

    def _buffer_of(self, leaves):
        """The ``(K, P)`` buffer the leaves are views of, in order, as :meth:`unpack` returns
        them (the last step's parameters and state), else None."""
        base, total = leaves[0]._base, sum(self.sizes)
        if base is None or base.numel() != self.members * total or not base.is_contiguous():
            return None
        offset = base.storage_offset()
        for x, size in zip(leaves, self.sizes):
            if (x._base is not base or x.storage_offset() != offset or not x[0].is_contiguous()
                    or (self.members > 1 and x.stride(0) != total)):
                return None
            offset += size
        return base.view(self.members, total)

    def pack(self, tree):
        if self._is_like(tree):
            leaves = pytree.tree_leaves(tree)
            base = self._buffer_of(leaves)
            if base is not None:   # already laid out: no copy
                return {FLAT: base}
            cols = [x.reshape(self.members, -1) for x in leaves]
            return {FLAT: torch.cat(cols, 1) if len(cols) > 1 else cols[0]}
        return _each_child(self.pack, tree)

    def unpack(self, tree):
        if isinstance(tree, dict) and set(tree) == {FLAT}:
            parts = tree[FLAT].split(self.sizes, 1)
            return pytree.tree_unflatten([x.view((x.shape[0],) + s) for x, s in zip(parts, self.shapes)],
                                         self.spec)
        return _each_child(self.unpack, tree)


def vmapped(make: Callable[..., GradientTransformation], *, flat: bool = False,
            **hyperparams: torch.Tensor) -> GradientTransformation:
    """K members' optimizers as one (module docstring). Every hyperparameter is a ``(K,)``
    floating tensor (float64 keeps a Python float's value exactly).

    ``flat``: run each member's step on one buffer instead of leaf by leaf. Every subtree of the
    updates, the parameters and the state that is shaped like the parameters becomes
    ``{FLAT: (K, P)}`` for the step and is split back into views of one buffer after it, so
    the state keeps its structure (checkpoints are unchanged); the next step finds its
    parameters and state already laid out (no copy) and copies only the gradients (one ``cat``).
    A step then runs each of its operations once instead of once per leaf, and the divergence
    test reduces one buffer: what a small net's step spends most on under ``vmap``
    (docs/performance.md, "Ensembles"). Only for stages that act element by element (``sgd``,
    ``adam``, ``adamw``, weight decay without a mask): a stage that reads leaf paths
    (``masked``, a mask of ``weight_decay_mask``) or reduces over leaves (global-norm clipping)
    would see one leaf. Every element gets the operations it gets leaf by leaf, and the results
    are bit-identical for ``sgd`` (momentum, Nesterov, weight decay) and ``adam`` with weight
    decay, float32 and float64 (tests/test_train_ensemble_flat.py)."""
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
        g, inner, p = updates, state.inner, params
        layout = _Flat(params, members) if flat else None
        if layout is not None and layout.usable:
            g, inner, p = layout.pack((g, inner, p))
        if members == 1:   # vmap over one member is the member itself (trees.members)
            new_p, new_inner = as_members(member_step(*first_member((g, inner, p, h))))
        else:
            new_p, new_inner = torch.func.vmap(member_step)(g, inner, p, h)
        ok = _member_finite(g, members) & _member_finite(new_p, members)
        ok = ok & ~state.diverged.to(ok.device)
        # One host read a step: while every member is finite (the usual case) the new values
        # are taken as they are, and the freezing pass over every leaf is skipped. Compiled, the
        # freeze always runs (no host read in the graph; where every member is finite it
        # returns the new values).
        if torch.compiler.is_compiling() or not bool(ok.all()):
            new_p, new_inner = freeze(new_p, p, ok), freeze(new_inner, inner, ok)
        if layout is not None and layout.usable:
            new_p, new_inner = layout.unpack((new_p, new_inner))
        new_state = VmappedState(new_inner, state.hyperparams, state.diverged | ~ok.to(state.diverged.device))
        if mode.new_params:
            return new_p, new_state, False
        return pytree.tree_map(torch.sub, new_p, params), new_state, True
    return transformation(init, kernel, fused=True)
