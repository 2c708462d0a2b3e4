"""Combinators: ``chain``, ``masked``, ``multi_transform`` and ``freeze``.

    chain(t1, ..., tn):         u = tn(...t2(t1(g)))       state (s1, ..., sn)
    masked(inner, mask):        u_i = inner(g)_i where mask_i, else g_i (passes through)
    multi_transform(ts, labels): u_i = ts[labels_i](g)_i; each label's transformation sees only
                                 its leaves and keeps state only for them
    freeze(inner, frozen):      u_i = 0 and no state where frozen_i, inner elsewhere; like torch
                                 skipping a parameter whose grad is None (zeroing its grad is not
                                 the same: Adam would still move it through momentum and decay)

Each combinator is one kernel (see :func:`optim.base.transformation`) that runs its inner stages
in the same :class:`optim.base.Mode` through :func:`optim.base.run`. Inner transformations of
``masked`` / ``multi_transform`` get flat dicts keyed by leaf path (see :mod:`optim.masks`).
Those dicts hold the caller's very tensors, so a donated step's in-place writes land in the
donated trees.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

from torch.utils import _pytree as pytree

from trees import show

from .base import GradientTransformation, Tree, flatten_like, run, transformation
from .masks import resolve_labels, split
from .scale import set_to_zero


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Run transformations one after the other; state is the tuple of their states.

    The fused step (what ``optim.step`` runs) runs all but the last stage's ``update`` (donated:
    ``donated_update``, handing on which updates are temporaries) and then the last one's
    ``fused_step``.
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain: expected GradientTransformations, got {type(t).__name__} "
                            f"at position {i}")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def kernel(updates, state, params, mode):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(f"chain.update: expected a state tuple of {len(transforms)} entries, "
                             f"got {type(state).__name__} of length {len(state) if isinstance(state, tuple) else '?'}")
        if params is not None and not mode.new_params:   # (a fused step's caller has checked)
            flatten_like("update", "grads", updates, "params", params)
        if mode.new_params and not transforms:
            return params, state, False
        out, owned, new_state = updates, mode.updates_owned, []
        for i, (t, s) in enumerate(zip(transforms, state)):
            last = i == len(transforms) - 1
            out, s, owned = run(t, out, s, params, mode._replace(updates_owned=owned,
                                                                 new_params=mode.new_params and last))
            new_state.append(s)
        return out, tuple(new_state), owned
    return transformation(init, kernel, fused=True)


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

    def labelled(fn, tree, params):
        cut = split(fn, tree, labels, params, kind="labels")
        for path, label in zip(cut.paths, cut.labels):
            if label not in transforms:
                raise ValueError(f"{fn}: expected a label in {sorted(transforms)} at {show(path)}, "
                                 f"got {label!r}")
        return cut

    def init(params):
        cut = labelled("multi_transform.init", params, params)
        return MultiTransformState({name: t.init(cut.part(name)) for name, t in transforms.items()})

    def kernel(updates, state, params, mode):
        fn = mode.name("multi_transform")
        if mode.new_params:
            flatten_like(fn, "updates", updates, "params", params)
        cut = labelled(fn, updates, updates if params is None else params)
        p_cut = None if params is None else labelled(fn, params, params)
        new_parts, new_states, owned = {}, {}, True
        for name, t in transforms.items():
            part = cut.part(name)
            new_parts[name], new_states[name], part_owned = run(
                t, part, state.inner_states[name], None if p_cut is None else p_cut.part(name), mode)
            owned = owned and (part_owned or not part)
        return cut.merge(new_parts), MultiTransformState(new_states), owned
    return transformation(init, kernel, fused=True)


class MaskedState(NamedTuple):
    """inner_state: the inner transformation's state over the selected leaves only."""
    inner_state: Tree


def masked(inner: GradientTransformation, mask) -> GradientTransformation:
    """``inner`` on the leaves where mask is True; the others' updates pass through unchanged
    and get no state. mask: tree of bools like params, or a callable params -> mask."""
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"masked: expected a GradientTransformation, got {type(inner).__name__}")

    def init(params):
        return MaskedState(inner.init(split("masked.init", params, mask, params).part(True)))

    def kernel(updates, state, params, mode):
        fn = mode.name("masked")
        cut = split(fn, updates, mask, updates if params is None else params)
        p_sel = None if params is None else split(fn, params, mask, params).part(True)
        new_sel, inner_state, inner_owned = run(inner, cut.part(True), state.inner_state, p_sel, mode)
        # Owned when the inner outputs are (or there are none) and the passed-through leaves are.
        owned = ((inner_owned or not any(cut.labels))
                 and (mode.updates_owned or all(cut.labels)))
        return cut.merge({True: new_sel}), MaskedState(inner_state), owned
    return transformation(init, kernel)


def freeze(inner: GradientTransformation, frozen) -> GradientTransformation:
    """``inner`` on the trainable leaves; frozen leaves (``frozen`` True) get no update, no
    weight decay and no optimizer state. frozen: tree of bools like params, or a callable."""
    def labels(params):
        f = resolve_labels("freeze", frozen, params)
        _, spec = pytree.tree_flatten(params)
        return pytree.tree_unflatten(["frozen" if x else "trainable" for x in f], spec)
    return multi_transform({"trainable": inner, "frozen": set_to_zero()}, labels)
