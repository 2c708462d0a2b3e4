"""The airbench94 recipe (Jordan 2024) built from purenn's layers, nets and optimizers: the
library behind ``python -m experiments.speedrun`` (docs/speedrun.md).

* :mod:`.config`: the typed config (:class:`~.config.SpeedrunConfig`), airbench94's values
  (:data:`~.config.RECIPE`) and the CPU recipe (:data:`~.config.CPU_RECIPE`), by name in
  :data:`~.config.RECIPES` (``--recipe``).
* :mod:`.recipe`: the parameter groups and their rates, the whitened net, the translate /
  alternating-flip augmentation.
* :mod:`experiments.train.lookahead` (shared with the CIFAR commands' ``--lookahead``): the slow
  copy of the weights and the pull towards it every few steps.
* :mod:`.run`: the parts handed to :func:`experiments.train.fit` (through ``FitHooks``), and the
  one evaluation after the last epoch of a run that does not evaluate every epoch.
* :mod:`experiments.benchmarks.airbench_speed`: the pure step's time per image at several batch sizes.
"""
from ..train.lookahead import LookaheadState, lookahead, lookahead_decay, lookahead_step, sync
from .config import CPU_RECIPE, MODEL, RECIPE, RECIPES, SpeedrunConfig
from .recipe import (alternating_flip, augmenter, build_net, build_optimizer, derived_rates,
                     param_labels, whitening_images)
from .run import parts, run_speedrun

__all__ = ["LookaheadState", "lookahead", "lookahead_decay", "lookahead_step", "sync", "MODEL",
           "RECIPE", "CPU_RECIPE", "RECIPES", "SpeedrunConfig", "alternating_flip", "augmenter", "build_net",
           "build_optimizer", "derived_rates", "param_labels", "whitening_images", "parts",
           "run_speedrun"]
