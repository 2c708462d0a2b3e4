"""One model or K ensemble members: what :func:`~experiments.train.loop.fit` draws and sums.

A config with ``seeds = [s_1, ..., s_K]`` trains an ensemble (the net is
``nets.ensemble(net, K)``, the optimizer ``optim.vmapped``); member k's keys are
``run_keys(s_k)``, so member k draws for its initialisation, augmentation and dropout exactly
what a single run with ``seed = s_k`` draws. All members see the batches of member 1's data order
unless ``member_data_order`` gives each its own (then member k also sees the batches of the
single run of seed s_k). A config with ``seed`` trains one model, as it always did: every
method below then does what the loop did before ensembles existed, call for call.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from . import keys as K

__all__ = ["Members"]


class Members:
    """The draws and sums of one model (``count is None``) or of ``count`` members."""

    def __init__(self, settings, train_key: torch.Tensor | None = None):
        # One model's settings have no ``seeds`` (TrainSettings); an ensemble's have them.
        seeds = getattr(settings, "seeds", None)
        self.count = len(seeds) if seeds else None
        if self.count is None:
            self.keys = K.run_keys(settings.seed)
            self.init_key = self.keys.init
            self.train_key = self.keys.train if train_key is None else train_key
        else:
            self.keys = [K.run_keys(int(s)) for s in seeds]
            self.init_key = torch.stack([k.init for k in self.keys])
            self.train_key = (torch.stack([k.train for k in self.keys]) if train_key is None
                              else train_key)
        self.own_order = bool(getattr(settings, "member_data_order", False))
        self._epoch_keys = None   # ((epoch, steps), StepKeys of every step of that epoch)

    def _member_keys(self) -> list[torch.Tensor]:
        return list(self.train_key)

    def order(self, epoch: int, n: int, device) -> torch.Tensor:
        """``(n,)`` (one model, or members sharing an order) or ``(K, n)`` visiting order."""
        if self.count is None:
            return K.epoch_order(self.train_key, epoch, n).to(device)
        if self.own_order:
            return torch.stack([K.epoch_order(k, epoch, n) for k in self._member_keys()]).to(device)
        return K.epoch_order(self.train_key[0], epoch, n).to(device)

    def step_keys(self, epoch: int, step: int, steps: int) -> K.StepKeys:
        """The step's keys: ``(2,)`` each, or ``(K, 2)`` (one row per member), of an epoch of
        ``steps`` steps. The whole epoch's keys are drawn at its first step asked for
        (:func:`~experiments.train.keys.epoch_step_keys`) and kept until the next epoch."""
        if self._epoch_keys is None or self._epoch_keys[0] != (epoch, steps):
            self._epoch_keys = ((epoch, steps), K.epoch_step_keys(self.train_key, epoch, steps))
        keys = self._epoch_keys[1]
        return K.StepKeys(keys.augment[step], keys.dropout[step])

    def inputs(self, net_input: Callable, images: torch.Tensor, idx: torch.Tensor,
               augment_keys: torch.Tensor, *, random: bool = True) -> torch.Tensor:
        """The net's input: ``net_input(key, images[idx])``, stacked over members ``(K, B, ...)``
        with each member's own augmentation key (and batch, with ``member_data_order``).

        Members that share their batches and draw nothing for their input (``random`` False: no
        augmentation) get the one batch ``(B, ...)``: ``vmap`` then runs each convolution once
        with the members' filters side by side instead of as a grouped convolution of K
        groups, which is several times faster on the CPU (docs/performance.md).
        """
        if self.count is None or (not random and idx.dim() == 1):
            return net_input(augment_keys if self.count is None else augment_keys[0], images[idx])
        rows = idx if idx.dim() == 2 else [idx] * self.count
        return torch.stack([net_input(k, images[i]) for k, i in zip(augment_keys, rows)])

    @staticmethod
    def values(t: torch.Tensor):
        """A metric as Python numbers: a float, or a list with one per member."""
        return t.item() if t.dim() == 0 else t.tolist()

    def add(self, total, value, weight):
        """``total + value * weight``, member by member."""
        if self.count is None:
            return total + value * weight
        total = [0.0] * self.count if not isinstance(total, list) else total
        return [t + v * weight for t, v in zip(total, value)]

    def ratio(self, total, seen):
        return total / seen if self.count is None else [t / seen for t in total]

    @staticmethod
    def all_diverged(loss) -> bool:
        """True when no member has a finite loss (one model: its loss is not finite)."""
        return not any(math.isfinite(v) for v in (loss if isinstance(loss, list) else [loss]))
