"""The run's random keys: every draw of a training run derives from one seed by ``fold_in``.

    root  = key(seed)
    init  = fold_in(root, INIT)            parameters (net.init)
    split = fold_in(root, SPLIT)           the validation split
    train = fold_in(root, TRAIN)           everything drawn while training:

    epoch e:   ek    = fold_in(train, e)
               order = permutation(fold_in(ek, PERMUTE), N)
    step s:    sk    = fold_in(fold_in(ek, STEP), s)
               augmentation key fold_in(sk, AUGMENT), dropout key fold_in(sk, DROPOUT)

A draw depends only on (seed, epoch, step), never on how many draws came before, so a resumed
run draws exactly what the uninterrupted run drew. The numbers below are part of the checkpoint
format: changing one changes every run's draws.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from layers import random as jr

__all__ = ["INIT", "SPLIT", "TRAIN", "PERMUTE", "STEP", "AUGMENT", "DROPOUT", "RunKeys", "run_keys",
           "StepKeys", "epoch_order", "step_keys", "epoch_step_keys"]

# Purposes folded into the root key.
INIT, SPLIT, TRAIN = 0, 1, 2
# Purposes folded into an epoch's key.
PERMUTE, STEP = 0, 1
# Purposes folded into a step's key.
AUGMENT, DROPOUT = 0, 1


class RunKeys(NamedTuple):
    """The root keys of a run: ``init`` (parameters), ``split`` (validation split), ``train``."""

    init: torch.Tensor
    split: torch.Tensor
    train: torch.Tensor


class StepKeys(NamedTuple):
    """The keys of one training step: ``augment`` (the batch's augmentation), ``dropout``."""

    augment: torch.Tensor
    dropout: torch.Tensor


def run_keys(seed: int) -> RunKeys:
    """:class:`RunKeys` of ``seed`` (each a ``(2,)`` int64 key)."""
    root = jr.key(seed)
    return RunKeys(jr.fold_in(root, INIT), jr.fold_in(root, SPLIT), jr.fold_in(root, TRAIN))


def epoch_order(train_key: torch.Tensor, epoch: int, n: int) -> torch.Tensor:
    """``(n,)`` int64: the order epoch ``epoch`` visits ``n`` examples in."""
    return jr.permutation(jr.fold_in(jr.fold_in(train_key, epoch), PERMUTE), n)


def step_keys(train_key: torch.Tensor, epoch: int, step: int) -> StepKeys:
    """:class:`StepKeys` of step ``step`` (0-based, within the epoch) of epoch ``epoch``."""
    sk = jr.fold_in(jr.fold_in(jr.fold_in(train_key, epoch), STEP), step)
    return StepKeys(jr.fold_in(sk, AUGMENT), jr.fold_in(sk, DROPOUT))


def epoch_step_keys(train_key: torch.Tensor, epoch: int, steps: int) -> StepKeys:
    """:func:`step_keys` of steps ``0 .. steps - 1`` of epoch ``epoch`` at once, the same bits:
    ``(steps, 2)`` each for one ``(2,)`` key, ``(steps, K, 2)`` for members' ``(K, 2)`` keys.

    ``fold_in`` is elementwise integer arithmetic on the key's words, so ``vmap`` over the step
    (and the member) runs each of its operations once for the whole epoch, where a call per
    step and member runs them ``steps * K`` times: about 150 small operations a step and member,
    which at K = 15 cost the tutorial net's ensemble step about a seventh of its time."""
    def one(key, step):
        return tuple(step_keys(key, epoch, step))
    if train_key.dim() == 2:   # members: one row each
        one = torch.func.vmap(one, in_dims=(0, None))
    augment, dropout = torch.func.vmap(one, in_dims=(None, 0))(train_key, torch.arange(steps))
    return StepKeys(augment, dropout)
