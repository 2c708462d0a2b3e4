"""Combinators: ``chain``, ``masked``, ``multi_transform`` and ``freeze``.

    chain(t1, ..., tn):         u = tn(...t2(t1(g)))       state (s1, ..., sn)
    masked(inner, mask):        u_i = inner(g)_i where mask_i, else g_i (passes through)
    multi_transform(ts, labels): u_i = ts[labels_i](g)_i; each label's transformation sees only
                                 its leaves and keeps state only for them
    freeze(inner, frozen):      u_i = 0 and no state where frozen_i, inner elsewhere; like torch
                                 skipping a parameter whose grad is None (zeroing its grad is not
                                 the same: Adam would still move it through momentum and decay)

Inner transformations of ``masked`` / ``multi_transform`` get flat dicts keyed by leaf path
(see :mod:`optim.masks`). Those dicts hold the caller's very tensors, so a donated step's
in-place writes land in the donated trees.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

from torch.utils import _pytree as pytree

from trees import show

from .base import GradientTransformation, Tree, flatten_like, fused_or_applied, update_donated
from .masks import keyed_leaves, resolve_labels, select
from .scale import set_to_zero


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Run transformations one after the other; state is the tuple of their states.

    The fused step runs all but the last ``update`` and then the last one's ``fused_step``;
    donated, it runs their ``donated_update`` instead, handing on which updates are temporaries.
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain: expected GradientTransformations, got {type(t).__name__} "
                            f"at position {i}")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def check(state):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(f"chain.update: expected a state tuple of {len(transforms)} entries, "
                             f"got {type(state).__name__} of length {len(state) if isinstance(state, tuple) else '?'}")

    def update(updates, state, params=None):
        check(state)
        if params is not None:
            flatten_like("update", "grads", updates, "params", params)
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    def donated_update(updates, state, params, updates_owned):
        check(state)
        new_state = []
        for t, s in zip(transforms, state):
            updates, s, updates_owned = update_donated(t, updates, s, params, updates_owned)
            new_state.append(s)
        return updates, tuple(new_state), updates_owned

    def fused_step(updates, state, params, donate=False):
        check(state)
        if not transforms:
            return params, state
        new_state, owned = [], False   # the caller's grads come in: never written
        for t, s in zip(transforms[:-1], state[:-1]):
            if donate:
                updates, s, owned = update_donated(t, updates, s, params, owned)
            else:
                updates, s = t.update(updates, s, params)
            new_state.append(s)
        params, s = fused_or_applied(transforms[-1], updates, state[-1], params, donate, owned)
        return params, tuple(new_state) + (s,)
    return GradientTransformation(init, update, fused_step, donated_update)


class MultiTransformState(NamedTuple):
    """inner_states: ``{label: state of that label's transformation}``."""
    inner_states: dict


def multi_transform(transforms: Mapping[str, GradientTransformation], labels) -> GradientTransformation:
    """Apply ``transforms[label]`` to the leaves carrying ``label``.

    labels: a tree of strings with params' structure, or a callable params -> such a tree.
    """
    transforms = dict(transforms)
    for name, t in transforms.items():
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"multi_transform: expected a GradientTransformation for label "
                            f"{name!r}, got {type(t).__name__}")

    def split(fn, tree, params):
        paths, leaves, spec = keyed_leaves(tree)
        lab = resolve_labels(fn, labels, params, kind="labels")
        for path, label in zip(paths, lab):
            if label not in transforms:
                raise ValueError(f"{fn}: expected a label in {sorted(transforms)} at {show(path)}, "
                                 f"got {label!r}")
        parts = {name: select(paths, leaves, [label == name for label in lab]) for name in transforms}
        return paths, leaves, spec, lab, parts

    def merge(paths, spec, lab, new_parts):
        return pytree.tree_unflatten([new_parts[label][p] for p, label in zip(paths, lab)], spec)

    def init(params):
        _, _, _, _, parts = split("multi_transform.init", params, params)
        return MultiTransformState({name: t.init(parts[name]) for name, t in transforms.items()})

    def update(updates, state, params=None):
        ref = updates if params is None else params
        paths, _, spec, lab, u_parts = split("multi_transform.update", updates, ref)
        p_parts = split("multi_transform.update", params, params)[4] if params is not None else None
        new_parts, new_states = {}, {}
        for name, t in transforms.items():
            new_parts[name], new_states[name] = t.update(
                u_parts[name], state.inner_states[name], None if p_parts is None else p_parts[name])
        return merge(paths, spec, lab, new_parts), MultiTransformState(new_states)

    def donated_update(updates, state, params, updates_owned):
        ref = updates if params is None else params
        paths, _, spec, lab, u_parts = split("multi_transform.update", updates, ref)
        p_parts = split("multi_transform.update", params, params)[4] if params is not None else None
        new_parts, new_states, owned = {}, {}, True
        for name, t in transforms.items():
            new_parts[name], new_states[name], part_owned = update_donated(
                t, u_parts[name], state.inner_states[name],
                None if p_parts is None else p_parts[name], updates_owned)
            owned = owned and (part_owned or not u_parts[name])
        return merge(paths, spec, lab, new_parts), MultiTransformState(new_states), owned

    def fused_step(updates, state, params, donate=False):
        flatten_like("multi_transform.step", "updates", updates, "params", params)
        paths, _, spec, lab, u_parts = split("multi_transform.step", updates, params)
        p_parts = split("multi_transform.step", params, params)[4]
        new_parts, new_states = {}, {}
        for name, t in transforms.items():
            new_parts[name], new_states[name] = fused_or_applied(
                t, u_parts[name], state.inner_states[name], p_parts[name], donate)
        return merge(paths, spec, lab, new_parts), MultiTransformState(new_states)
    return GradientTransformation(init, update, fused_step, donated_update)


class MaskedState(NamedTuple):
    """inner_state: the inner transformation's state over the selected leaves only."""
    inner_state: Tree


def masked(inner: GradientTransformation, mask) -> GradientTransformation:
    """``inner`` on the leaves where mask is True; the others' updates pass through unchanged
    and get no state. mask: tree of bools like params, or a callable params -> mask."""
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"masked: expected a GradientTransformation, got {type(inner).__name__}")

    def parts(fn, tree, ref):
        paths, leaves, spec = keyed_leaves(tree)
        keep = resolve_labels(fn, mask, ref)
        return paths, leaves, spec, keep, select(paths, leaves, keep)

    def init(params):
        return MaskedState(inner.init(parts("masked.init", params, params)[4]))

    def run(updates, state, params, updates_owned, donate):
        ref = updates if params is None else params
        paths, leaves, spec, keep, u_sel = parts("masked.update", updates, ref)
        p_sel = None if params is None else parts("masked.update", params, params)[4]
        if donate:
            new_sel, inner_state, inner_owned = update_donated(
                inner, u_sel, state.inner_state, p_sel, updates_owned)
        else:
            new_sel, inner_state = inner.update(u_sel, state.inner_state, p_sel)
            inner_owned = False
        out = [new_sel[p] if k else x for p, x, k in zip(paths, leaves, keep)]
        # Owned when the inner outputs are (or there are none) and the passed-through leaves are.
        owned = (inner_owned or not any(keep)) and (updates_owned or all(keep))
        return pytree.tree_unflatten(out, spec), MaskedState(inner_state), owned

    def update(updates, state, params=None):
        return run(updates, state, params, False, False)[:2]

    def donated_update(updates, state, params, updates_owned):
        return run(updates, state, params, updates_owned, True)
    return GradientTransformation(init, update, donated_update=donated_update)


def freeze(inner: GradientTransformation, frozen) -> GradientTransformation:
    """``inner`` on the trainable leaves; frozen leaves (``frozen`` True) get no update, no
    weight decay and no optimizer state. frozen: tree of bools like params, or a callable."""
    def labels(params):
        f = resolve_labels("freeze", frozen, params)
        _, spec = pytree.tree_flatten(params)
        return pytree.tree_unflatten(["frozen" if x else "trainable" for x in f], spec)
    return multi_transform({"trainable": inner, "frozen": set_to_zero()}, labels)
