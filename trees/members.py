"""The leading member dimension of stacked trees (``nets.ensemble``, ``optim.vmapped``).

A one-member ensemble runs its member directly rather than through ``torch.func.vmap``: vmap
over a dimension of size 1 is the identity, and skipping it saves the batching rules' per-op
cost. These two views take the dimension off and put it back.
"""
import torch
from torch.utils import _pytree as pytree

__all__ = ["first_member", "as_members"]


def first_member(tree):
    """Every tensor leaf ``(1, s...)`` -> ``(s...)`` (a view); other leaves unchanged."""
    return pytree.tree_map(lambda t: t.squeeze(0) if isinstance(t, torch.Tensor) else t, tree)


def as_members(tree):
    """Every tensor leaf ``(s...)`` -> ``(1, s...)`` (a view): the inverse of :func:`first_member`."""
    return pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, tree)
