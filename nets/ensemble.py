"""Ensembles: K members of one net as one stacked tree, trained and evaluated by ``torch.func.vmap``
(functorch's model-ensembling recipe).

    stack([t_1, ..., t_K])   every leaf (s...) of the K trees -> one leaf (K, s...)
    unstack(t)               the inverse: K trees
    ensemble(net, K)         a Net over stacked trees:
        init(keys (K, 2))                         -> member k is net.init(keys[k])
        apply(params, state, x, *, train, key)    -> logits (K, N, classes)
            x: (N, ...) shared by every member, or (K, N, ...) one batch per member
            key: (K, 2), one dropout key per member (None in eval)

Member k of an ensemble computes what ``net`` computes with member k's parameters and key: the
batching is ``vmap``'s, so no value of one member enters another's arithmetic (a member that
diverges to NaN leaves the others' bits unchanged).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from trees import as_members, first_member

from .compose import Net

__all__ = ["stack", "unstack", "ensemble"]


def stack(trees: Sequence[Any]) -> Any:
    """One tree whose every leaf is ``torch.stack`` of the K trees' leaves (same structure)."""
    trees = list(trees)
    if not trees:
        raise ValueError("stack: expected at least one tree, got none")
    leaves0, spec = pytree.tree_flatten(trees[0])
    columns = [leaves0]
    for i, t in enumerate(trees[1:], 1):
        leaves, s = pytree.tree_flatten(t)
        if s != spec:
            raise ValueError(f"stack: expected trees of one structure, tree {i} differs from tree 0")
        columns.append(leaves)
    return pytree.tree_unflatten([torch.stack(col) for col in zip(*columns)], spec)


def unstack(tree: Any) -> list:
    """The K trees of a stacked tree (leaves indexed along their first dimension)."""
    leaves, spec = pytree.tree_flatten(tree)
    if not leaves:
        raise ValueError("unstack: expected a tree with tensor leaves, got none")
    k = {leaf.shape[0] if isinstance(leaf, torch.Tensor) and leaf.dim() else None for leaf in leaves}
    if len(k) != 1 or None in k:
        raise ValueError(f"unstack: expected every leaf to have the same leading member dimension, "
                         f"got {sorted(map(str, k))}")
    return [pytree.tree_unflatten([leaf[i] for leaf in leaves], spec) for i in range(k.pop())]


def ensemble(net: Net, members: int, *, input_rank: int = 4) -> Net:
    """``members`` copies of ``net`` as one :class:`Net` over stacked trees (module docstring).

    ``input_rank`` is the rank of one member's input batch (4 for images ``(N, C, H, W)``): an
    ``x`` of that rank is shared by every member, one of rank ``input_rank + 1`` is split."""
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"ensemble: expected members to be a positive int, got {members!r}")
    where = f"ensemble({net.name}, {members})"

    def init(keys, **kwargs):
        if not isinstance(keys, torch.Tensor) or keys.shape != (members, 2):
            raise ValueError(f"{where}.init: expected one key per member, (K, 2) = ({members}, 2), "
                             f"got {getattr(keys, 'shape', type(keys).__name__)}")
        inits = [net.init(k, **kwargs) for k in keys]
        return stack([p for p, _ in inits]), stack([s for _, s in inits])

    def apply(params, state, x, *, train, key=None):
        if x.dim() not in (input_rank, input_rank + 1):
            raise ValueError(f"{where}.apply: expected x of rank {input_rank} (shared) or "
                             f"{input_rank + 1} (one batch per member), got {tuple(x.shape)}")
        x_dim = 0 if x.dim() == input_rank + 1 else None
        if x_dim == 0 and x.shape[0] != members:
            raise ValueError(f"{where}.apply: expected x (N, ...) or ({members}, N, ...), got "
                             f"{tuple(x.shape)}")
        if members == 1:
            # vmap over one member is the member itself: run it without the batching rules'
            # per-op cost (the member dimension squeezed off and put back, views both ways).
            logits, new_state = net.apply(first_member(params), first_member(state),
                                          x[0] if x_dim == 0 else x, train=train,
                                          **({} if key is None else {"key": key[0]}))
            return logits.unsqueeze(0), as_members(new_state)
        if key is None:
            return torch.func.vmap(lambda p, s, xx: net.apply(p, s, xx, train=train),
                                   in_dims=(0, 0, x_dim))(params, state, x)
        return torch.func.vmap(lambda p, s, xx, k: net.apply(p, s, xx, train=train, key=k),
                               in_dims=(0, 0, x_dim, 0))(params, state, x, key)

    return Net(init, apply, net.layer, where)

