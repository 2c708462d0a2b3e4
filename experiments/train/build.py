"""A run's optimizer and loss from its config, and the checks that refuse a config before a run
starts (so a bad value never creates a run folder).

The config keys read here: ``optimizer`` ("sgd" | "adam"), ``lr``, ``momentum``, ``nesterov``,
``weight_decay``, ``decay_mask``, ``schedule`` ("constant" | "onecycle") with ``pct_start``,
``div_factor``, ``final_div_factor``, and ``label_smoothing``; see docs/training.md.
"""
from __future__ import annotations

from functools import partial
from typing import Mapping

import layers
import optim

from .checks import number_in, whole_number
from .loop import check_loop_config

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_loss", "check_training_config",
           "check_optimizer_config"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "onecycle")


def check_training_config(cfg: Mapping) -> None:
    """Refuse (ValueError, one line naming the flag) any value :func:`build_optimizer`,
    :func:`build_loss` or :func:`~experiments.train.loop.fit` would fail on later."""
    whole_number(cfg.get("epochs"), "epochs")
    whole_number(cfg.get("batch_size"), "batch_size")
    check_optimizer_config(cfg)
    number_in(cfg.get("label_smoothing"), "label_smoothing", low=0, high=1)
    try:
        check_loop_config(cfg)
    except ValueError as err:
        raise ValueError(str(err).replace("fit: ", "", 1)) from None


def check_optimizer_config(cfg: Mapping) -> None:
    """Refuse (ValueError, one line naming the flag) what :func:`build_optimizer`
    cannot build: unknown names, a learning rate <= 0, negative decay or momentum, one-cycle
    factors out of range."""
    if cfg.get("optimizer") not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {cfg.get('optimizer')!r}")
    if cfg.get("schedule") not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {cfg.get('schedule')!r}")
    number_in(cfg.get("lr"), "lr", low=0, low_open=True)
    number_in(cfg.get("weight_decay"), "weight_decay", low=0)
    if cfg["optimizer"] == "sgd":
        number_in(cfg.get("momentum"), "momentum", low=0)
    if cfg["schedule"] == "onecycle":
        number_in(cfg.get("pct_start"), "pct_start", low=0, high=1, low_open=True, high_open=True)
        number_in(cfg.get("div_factor"), "div_factor", low=0, low_open=True)
        number_in(cfg.get("final_div_factor"), "final_div_factor", low=0, low_open=True)
    if cfg["optimizer"] == "adam" and cfg.get("decay_mask") and cfg.get("weight_decay"):
        raise ValueError("build_optimizer: expected no decay mask with adam (optim.adam has none), "
                         "got decay_mask=True")


def build_optimizer(cfg: Mapping, steps_per_epoch: int):
    """The config's optimizer, with its learning-rate schedule over ``epochs * steps_per_epoch``.

    ``onecycle`` is ``optim.one_cycle_schedule`` with linear annealing; a run of fewer than 4
    steps has no room to warm up and anneal and uses the peak rate throughout, and the warm-up
    spans at least 2 steps (one_cycle_schedule refuses an empty phase, as torch's OneCycleLR
    cannot run one).
    """
    check_optimizer_config(cfg)
    total = cfg["epochs"] * steps_per_epoch
    lr = cfg["lr"]
    if cfg["schedule"] == "onecycle" and total >= 4:
        lr = optim.one_cycle_schedule(cfg["lr"], total, pct_start=max(cfg["pct_start"], 2.0 / total),
                                      anneal_strategy="linear", div_factor=cfg["div_factor"],
                                      final_div_factor=cfg["final_div_factor"])
    mask = optim.decay_mask_no_bias_or_norm if cfg.get("decay_mask") else None
    if cfg["optimizer"] == "sgd":
        return optim.sgd(lr, momentum=cfg["momentum"], nesterov=bool(cfg.get("nesterov")),
                         weight_decay=cfg["weight_decay"], weight_decay_mask=mask)
    return optim.adam(lr, weight_decay=cfg["weight_decay"])


def build_loss(cfg: Mapping):
    """``(logits, y) -> mean cross-entropy`` with the config's label smoothing."""
    number_in(cfg.get("label_smoothing"), "label_smoothing", low=0, high=1)
    return partial(layers.cross_entropy, label_smoothing=float(cfg["label_smoothing"]))
