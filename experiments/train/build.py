"""A run's optimizer and loss from its typed config
(:class:`~experiments.train.settings.OptimizerSettings`): ``optimizer`` ("sgd" | "adam"), ``lr``,
``momentum``, ``nesterov``, ``weight_decay``, ``decay_mask``, ``schedule`` ("constant" |
"onecycle") with ``pct_start``, ``div_factor``, ``final_div_factor``, and ``label_smoothing``;
see docs/training.md. Every value was checked when the config was made.
"""
from __future__ import annotations

from functools import partial

import layers
import optim

from .settings import OptimizerSettings

__all__ = ["build_optimizer", "build_loss"]


def build_optimizer(cfg: OptimizerSettings, steps_per_epoch: int, epochs: int | None = None):
    """The config's optimizer, with its learning-rate schedule over ``epochs * steps_per_epoch``
    (``epochs`` defaults to ``cfg.epochs``).

    ``onecycle`` is ``optim.one_cycle_schedule`` with linear annealing; a run of fewer than 4
    steps has no room to warm up and anneal and uses the peak rate throughout, and the warm-up
    spans at least 2 steps (one_cycle_schedule refuses an empty phase, as torch's OneCycleLR
    cannot run one).
    """
    total = (cfg.epochs if epochs is None else epochs) * steps_per_epoch
    lr = cfg.lr
    if cfg.schedule == "onecycle" and total >= 4:
        lr = optim.one_cycle_schedule(cfg.lr, total, pct_start=max(cfg.pct_start, 2.0 / total),
                                      anneal_strategy="linear", div_factor=cfg.div_factor,
                                      final_div_factor=cfg.final_div_factor)
    mask = optim.decay_mask_no_bias_or_norm if cfg.decay_mask else None
    if cfg.optimizer == "sgd":
        return optim.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                         weight_decay=cfg.weight_decay, weight_decay_mask=mask)
    return optim.adam(lr, weight_decay=cfg.weight_decay)


def build_loss(cfg: OptimizerSettings):
    """``(logits, y) -> mean cross-entropy`` with the config's label smoothing."""
    return partial(layers.cross_entropy, label_smoothing=cfg.label_smoothing)
