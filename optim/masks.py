"""Masks and labels over parameter trees, and the path-keyed sub-trees the combinators hand on.

A mask is a tree of bools with the structure of params, or a callable ``params -> mask``. A
combinator that runs an inner transformation on part of the tree gives it a *flat dict keyed by
leaf path* (:mod:`trees.paths`: keys joined by ``"/"``, so ``{"features": [w]}`` gives
``{'features/0': w}``) holding only the selected leaves, so the inner state has no entry at all for
the others. For the flat ``state_dict``-keyed dicts the nets use (``{'features.0.weight': w,
...}``), the keys are unchanged.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

from trees import SEP, key_name, leaf_paths, path_of, show

from .base import Tree


def resolve_labels(fn: str, labels, params: Tree, kind: str = "mask") -> list:
    """The mask / label tree (or the callable's result on ``params``) as a list aligned with
    params' leaves; checks it has params' structure."""
    tree = labels(params) if callable(labels) else labels
    leaves, spec = pytree.tree_flatten(tree)
    _, p_spec = pytree.tree_flatten(params)
    if spec != p_spec:
        # A mask written for the whole tree also serves the path-keyed sub-dicts that
        # masked / multi_transform / freeze hand to inner transformations: match by leaf path.
        p_paths, m_paths = leaf_paths(params), leaf_paths(tree)
        by_path = dict(zip(m_paths, leaves))
        missing = [p for p in p_paths if p not in by_path]
        if missing:
            raise ValueError(f"{fn}: {kind} and params differ at {show(missing[0])}: missing in {kind}")
        leaves = [by_path[p] for p in p_paths]
    if kind == "mask":
        for path, x in zip(leaf_paths(params), leaves):
            if isinstance(x, torch.Tensor) and x.ndim == 0 and x.dtype == torch.bool:
                continue
            if not isinstance(x, bool):
                raise TypeError(f"{fn}: expected mask leaves to be bools, got "
                                f"{type(x).__name__} at {show(path)}")
        return [bool(x) for x in leaves]
    return leaves


class Split(NamedTuple):
    """A tree cut by labels: its leaves' paths (unique), leaves and spec, and each leaf's label."""
    paths: list[str]
    leaves: list[Any]
    spec: Any
    labels: list

    def part(self, label) -> dict:
        """``{path: leaf}`` of the leaves carrying ``label``, in tree order: what an inner
        transformation of ``masked`` / ``multi_transform`` sees."""
        return {p: x for p, x, lab in zip(self.paths, self.leaves, self.labels) if lab == label}

    def merge(self, new_parts: dict) -> Tree:
        """The tree with each leaf taken from ``new_parts[label][path]``; leaves whose label has
        no entry in ``new_parts`` pass through unchanged."""
        return pytree.tree_unflatten(
            [new_parts[lab][p] if lab in new_parts else x
             for p, x, lab in zip(self.paths, self.leaves, self.labels)], self.spec)


def split(fn: str, tree: Tree, labels, params: Tree, kind: str = "mask") -> Split:
    """Cut ``tree`` (params' structure) by ``labels`` resolved on ``params``
    (:func:`resolve_labels`), checking its leaf paths are unique."""
    with_path, spec = pytree.tree_flatten_with_path(tree)
    paths = [path_of(p) for p, _ in with_path]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"masks: expected unique leaf paths, got {show(dup)} twice "
                         f"(keys containing {SEP!r} collide with nesting)")
    return Split(paths, [x for _, x in with_path], spec, resolve_labels(fn, labels, params, kind))


def decay_mask_no_bias_or_norm(params: Tree) -> Tree:
    """Weight-decay mask: False for leaves whose key ends in ``bias`` and for tensors with
    ``ndim <= 1`` (batch-norm / layer-norm weights), True for the rest (conv / linear weights).

    torch equivalent: two param groups, the False leaves with ``weight_decay=0``.
    """
    def decide(path, x):
        # The leaf's own key, and of a state_dict key ("features.0.bias") its last dotted part.
        last = key_name(path[-1]).split(".")[-1] if path else ""
        return not (last == "bias" or last.endswith("_bias") or x.ndim <= 1)
    return pytree.tree_map_with_path(decide, params)


