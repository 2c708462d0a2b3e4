"""Ways a recipe extends :func:`~experiments.train.loop.fit` without copying it.

    hooks = FitHooks(wrap_step=..., epoch_images=...)
    fit(config, ..., hooks=hooks)

* ``wrap_step(step) -> step``: receives the pure step ``step(params, state, opt_state, batch,
  key) -> (params, state, opt_state, metrics)`` of :func:`~experiments.train.step.make_step` and
  returns the one ``fit`` runs; a wrapper may change what comes out (e.g. pull the weights
  towards a slow copy kept in ``opt_state``: the speedrun's lookahead). It must stay a function of
  its arguments, so that a resumed run is bit-identical: whatever it remembers lives in the trees.
* ``epoch_images(epoch, images) -> images``: the training images epoch ``epoch`` draws its
  batches from (same shape, dtype and device), e.g. every image mirrored on odd epochs
  (airbench's alternating flip). A function of ``(epoch, images)`` only.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

__all__ = ["FitHooks"]


class FitHooks(NamedTuple):
    """``wrap_step`` and ``epoch_images`` (module docstring); None leaves ``fit`` as it is."""

    wrap_step: Callable[[Callable], Callable] | None = None
    epoch_images: Callable[[int, torch.Tensor], torch.Tensor] | None = None
