"""The optimizer contract: ``GradientTransformation(init, update)``, ``apply_updates`` and ``step``.

An optimizer is a pair of pure functions over pytrees (nested dicts / tuples / NamedTuples whose
leaves are tensors, walked with ``torch.utils._pytree`` like ``torch.func`` does):

    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = apply_updates(params, updates)          # params + updates, leaf by leaf

No argument is ever mutated and ``update`` is a function of its arguments only, so calling it
twice on the same arguments gives the same result. Returned trees may share storage with each
other (e.g. SGD's updates and its momentum buffer), so treat every tree as immutable.

``step(opt, grads, state, params) -> (params, state)`` is the same computation as
``update`` followed by ``apply_updates`` but lets the last transformation write the new
parameters in the very foreach call that applies the learning rate (``fused_step``), the way
``torch.optim``'s foreach path updates parameters in place: one pass over memory less, and the
same floating-point operations as torch.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch.utils import _pytree as pytree

from . import buffers

Tree = Any
InitFn = Callable[[Tree], Tree]
UpdateFn = Callable[..., "tuple[Tree, Tree]"]
FusedStepFn = Callable[[Tree, Tree, Tree], "tuple[Tree, Tree]"]


class GradientTransformation(NamedTuple):
    """An optimizer or one stage of one, as pure functions.

    init(params) -> state
    update(updates, state, params=None) -> (new_updates, new_state)
    fused_step(updates, state, params) -> (new_params, new_state), or None when the stage has no
        fused form; ``optim.step`` then runs ``update`` and ``apply_updates``.
    """

    init: InitFn
    update: UpdateFn
    fused_step: FusedStepFn | None = None


class EmptyState(NamedTuple):
    """State of a stateless transformation (no leaves)."""


def path_str(path: tuple) -> str:
    """``(MappingKey('features'), SequenceKey(0), MappingKey('bias'))`` -> ``'features.0.bias'``."""
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts) if parts else "<root>"


def leaf_paths(tree: Tree) -> list[str]:
    """Path strings of ``tree``'s leaves, in flatten order."""
    with_path, _ = pytree.tree_flatten_with_path(tree)
    return [path_str(p) for p, _ in with_path]


def _first_difference(a_name: str, a: Tree, b_name: str, b: Tree) -> str:
    a_paths, b_paths = leaf_paths(a), leaf_paths(b)
    a_set, b_set = set(a_paths), set(b_paths)
    for p in b_paths:
        if p not in a_set:
            if any(q.startswith(p + ".") for q in a_paths):
                return f"'{p}': a leaf in {b_name} but a subtree in {a_name}"
            return f"'{p}': missing in {a_name}"
    for p in a_paths:
        if p not in b_set:
            return f"'{p}': unexpected in {a_name} (not in {b_name})"
    # Same leaf paths, different containers (e.g. a list against a tuple) or key order.
    _, a_spec = pytree.tree_flatten(a)
    _, b_spec = pytree.tree_flatten(b)
    return f"<root>: containers differ ({a_name} {a_spec}, {b_name} {b_spec})"


def flatten_like(fn: str, a_name: str, a: Tree, b_name: str, b: Tree):
    """Flatten ``a`` and ``b`` once, checking they have the same structure, shapes and dtypes.

    Returns ``(a_leaves, b_leaves, spec)``. Raises ValueError naming the first differing path,
    e.g. ``update: grads and params differ at 'features.0.bias': missing in grads``.
    """
    a_leaves, a_spec = pytree.tree_flatten(a)
    b_leaves, b_spec = pytree.tree_flatten(b)
    if a_spec != b_spec:
        raise ValueError(
            f"{fn}: {a_name} and {b_name} differ at {_first_difference(a_name, a, b_name, b)}")
    for i, (x, y) in enumerate(zip(a_leaves, b_leaves)):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            bad, name = (x, a_name) if not isinstance(x, torch.Tensor) else (y, b_name)
            raise TypeError(f"{fn}: expected tensor leaves, got {type(bad).__name__} in {name} "
                            f"at '{leaf_paths(a)[i]}'")
        if x.shape != y.shape or x.dtype != y.dtype:
            raise ValueError(
                f"{fn}: {a_name} and {b_name} differ at '{leaf_paths(a)[i]}': expected "
                f"{tuple(y.shape)} {y.dtype} as in {b_name}, got {tuple(x.shape)} {x.dtype}")
    return a_leaves, b_leaves, a_spec


def tensor_leaves(fn: str, name: str, tree: Tree):
    """Flatten ``tree``, checking every leaf is a tensor. Returns ``(leaves, spec)``."""
    leaves, spec = pytree.tree_flatten(tree)
    for i, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: expected tensor leaves, got {type(x).__name__} in {name} "
                            f"at '{leaf_paths(tree)[i]}'")
    return leaves, spec


def count_tensor(n: int = 0) -> torch.Tensor:
    """A step counter as a 0-d int64 tensor (saveable like any other state leaf)."""
    return torch.tensor(n, dtype=torch.int64)


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """New parameters ``params + updates``, leaf by leaf (``torch._foreach_add``; on CPU into
    recycled storage, see :mod:`optim.buffers`).

    params, updates: trees of the same structure, shapes and dtypes. Returns a new tree.
    """
    u, p, spec = flatten_like("apply_updates", "updates", updates, "params", params)
    return pytree.tree_unflatten(buffers.add(p, u), spec)


def step(opt: GradientTransformation, grads: Tree, state: Tree, params: Tree):
    """One optimizer step: ``(new_params, new_state)``.

    Equal to ``update`` then ``apply_updates``; when ``opt.fused_step`` exists it is used so that
    the new parameters come out of the same foreach call that applies the learning rate.
    """
    if not isinstance(opt, GradientTransformation):
        raise TypeError(f"step: expected a GradientTransformation, got {type(opt).__name__}")
    flatten_like("step", "grads", grads, "params", params)
    if opt.fused_step is not None:
        return opt.fused_step(grads, state, params)
    updates, state = opt.update(grads, state, params)
    return apply_updates(params, updates), state


def _find_field(tree: Tree, field: str):
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        if field in tree._fields:
            return getattr(tree, field)
        children = list(tree)
    elif isinstance(tree, (tuple, list)):
        children = list(tree)
    elif isinstance(tree, dict):
        children = list(tree.values())
    else:
        return None
    for child in children:
        found = _find_field(child, field)
        if found is not None:
            return found
    return None


def current_lr(state: Tree) -> float:
    """The learning rate the next update will use (the first ``lr`` field found in ``state``)."""
    lr = _find_field(state, "lr")
    if lr is None:
        raise ValueError("current_lr: expected an optimizer state holding an 'lr' field "
                         f"(from sgd/adam/adamw/scale_by_learning_rate), got {type(state).__name__}")
    return float(lr)


def current_step(state: Tree) -> int:
    """How many updates produced ``state`` (the first ``count`` field found in it)."""
    count = _find_field(state, "count")
    if count is None:
        raise ValueError("current_step: expected an optimizer state holding a 'count' field, "
                         f"got {type(state).__name__}")
    return int(count)
