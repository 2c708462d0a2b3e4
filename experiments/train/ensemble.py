"""Ensembles in the trainer: K members of one net trained as one by ``torch.func.vmap``.

    net_k, opt_k, loss_k = ensemble_parts(net, make_opt, {"lr": [...], "momentum": [...]}, loss_fn)
    fit({"seeds": [s_1, ..., s_K], ...}, net=net_k, opt=opt_k, loss_fn=loss_k, ...)

* ``net_k = nets.ensemble(net, K)``: stacked parameters, logits ``(K, B, classes)``;
* ``opt_k = optim.vmapped(make_opt, **hyperparams)``: member k's optimizer is
  ``make_opt(**{name: values[k]})``; a member that diverges is frozen, the others go on;
* ``loss_k(logits, y)``: ``loss_fn`` per member, ``(K,)`` (``y`` shared ``(B,)`` or ``(K, B)``).

With ``seeds`` in the config, :func:`~experiments.train.loop.fit` draws member k's keys from
``run_keys(s_k)`` (:mod:`experiments.train.members`), writes one metric per member in every
history row and a ``diverged`` list, and checkpoints the whole ensemble; resume is bit-identical
as for one model.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

import nets
import optim

__all__ = ["ensemble_parts", "member_losses", "MAX_MEMBERS"]

#: The most members a command line accepts (a grid is a product: it grows fast).
MAX_MEMBERS = 64


def member_losses(loss_fn: Callable) -> Callable:
    """``(logits (K, B, C), y (B,) or (K, B)) -> (K,)``: ``loss_fn`` of every member."""
    def loss(logits, y):
        if logits.shape[0] == 1:   # one member: itself, without vmap (trees.members)
            return loss_fn(logits[0], y[0] if y.dim() == 2 else y).unsqueeze(0)
        return torch.func.vmap(loss_fn, in_dims=(0, 0 if y.dim() == 2 else None))(logits, y)
    return loss


def ensemble_parts(net, make_opt: Callable[..., optim.GradientTransformation],
                   hyperparams: Mapping[str, Sequence[float]], loss_fn: Callable, *,
                   input_rank: int = 4, flat: bool = False):
    """``(ensemble net, vmapped optimizer, per-member loss)`` for K members, K the length of
    every list in ``hyperparams`` (module docstring).

    ``flat``: the optimizer steps one buffer per member (``optim.vmapped(..., flat=True)``),
    bit-identical to leaf by leaf for plain ``optim.sgd`` and ``optim.adam`` (what the sweeps and
    the ablation build, and pass; tests/test_train_ensemble_flat.py) and 1.1x faster for the
    tutorial net at K = 8 (docs/performance.md, "Ensembles"). Off by default: a stage that reads
    leaf paths (``optim.masked``, a ``weight_decay_mask``) or reduces over leaves (global-norm
    clipping) would see one leaf, so only a caller that knows its optimizer has none turns it on."""
    lengths = {name: len(v) for name, v in hyperparams.items()}
    if not lengths or len(set(lengths.values())) != 1:
        raise ValueError(f"ensemble_parts: expected hyperparameter lists of one length, got {lengths}")
    k = next(iter(lengths.values()))
    if not 1 <= k <= MAX_MEMBERS:
        raise ValueError(f"ensemble_parts: expected 1 to {MAX_MEMBERS} members, got {k}")
    tensors = {name: torch.tensor([float(x) for x in v], dtype=torch.float64)
               for name, v in hyperparams.items()}
    return (nets.ensemble(net, k, input_rank=input_rank), optim.vmapped(make_opt, flat=flat, **tensors),
            member_losses(loss_fn))
