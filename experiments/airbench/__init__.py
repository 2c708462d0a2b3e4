"""The airbench94 recipe (Jordan 2024) built from purenn's layers, nets and optimizers: the
library behind ``python -m experiments.speedrun`` (docs/speedrun.md).

* :mod:`.recipe`: the config (:data:`~.recipe.RECIPE`), its checks, the parameter groups and
  their rates, the whitened net, the translate / alternating-flip augmentation.
* :mod:`experiments.train.lookahead` (shared with the CIFAR commands' ``--lookahead``): the slow
  copy of the weights and the pull towards it every few steps.
* :mod:`.run`: the parts handed to :func:`experiments.train.fit` (through ``FitHooks``).
"""
from ..train.lookahead import LookaheadState, lookahead, lookahead_decay, lookahead_step, sync
from .recipe import (RECIPE, alternating_flip, augmenter, build_net, build_optimizer, check_config,
                     derived_rates, fit_config, param_labels, whitening_images)
from .run import parts, run_speedrun

__all__ = ["LookaheadState", "lookahead", "lookahead_decay", "lookahead_step", "sync", "RECIPE",
           "alternating_flip", "augmenter", "build_net", "build_optimizer", "check_config",
           "derived_rates", "fit_config", "param_labels", "whitening_images", "parts",
           "run_speedrun"]
