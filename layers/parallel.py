"""The batch axis split over processes: which rows of the global batch this process holds, and
how batch norm sums over all of them. The data-parallel counterpart of JAX's ``axis_name``.

Under data parallelism each of ``P`` processes holds ``rows`` consecutive rows, starting at row
``start``, of a global batch of ``total`` rows. Two kinds of layer care:

* **Per-row random draws** (dropout, the augmentation of ``experiments.data.augment``): a row
  must get the numbers the one-process run draws for it. The draws are a counter-based hash of
  the element index (:mod:`layers.random`), so this process draws elements
  ``start * m .. (start + rows) * m - 1`` of the global draw (``m`` numbers per row) with
  ``offset=row_offset(shape)``, and no process draws the others' rows.
* **Batch statistics** (batch norm in training): with ``all_reduce`` set, batch norm sums its
  per-channel sums over every process, so the statistics are those of the global batch
  (``--sync-bn``); ``all_reduce`` must be differentiable, its backward summing the incoming
  gradients over the processes too. Without it the statistics stay local, as in torch's DDP.

The axis is a dynamic scope, as JAX's is while a ``pmap`` runs: the trainer enters it around each
step and the layers read it, so no net needs a new argument::

    with layers.parallel.batch_axis(BatchAxis(start=64, rows=64, total=128, all_reduce=f)):
        logits, state = net.apply(params, state, x_slice, train=True, key=k)

Outside ``batch_axis`` (every one-process run) :func:`current` is None and every layer does
exactly what it did before, bit for bit.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, NamedTuple, Optional

import torch

__all__ = ["BatchAxis", "batch_axis", "current", "row_offset"]


class BatchAxis(NamedTuple):
    """This process's part of a global batch: rows ``start .. start + rows - 1`` of ``total``.

    ``all_reduce(t) -> t summed over the processes`` (differentiable) makes batch norm use the
    global batch's statistics; None keeps them local.
    """

    start: int
    rows: int
    total: int
    all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


_AXIS: contextvars.ContextVar = contextvars.ContextVar("purenn_batch_axis", default=None)


@contextlib.contextmanager
def batch_axis(axis: BatchAxis):
    """Within the block, layers see ``axis`` (:func:`current`); the previous one comes back after."""
    if not isinstance(axis, BatchAxis):
        raise TypeError(f"batch_axis: expected a layers.parallel.BatchAxis, got {type(axis).__name__}")
    if not (0 <= axis.start and 1 <= axis.rows and axis.start + axis.rows <= axis.total):
        raise ValueError(f"batch_axis: expected rows {axis.start} .. {axis.start + axis.rows - 1} "
                         f"to lie in a batch of {axis.total}, got {axis}")
    token = _AXIS.set(axis)
    try:
        yield axis
    finally:
        _AXIS.reset(token)


def current() -> Optional[BatchAxis]:
    """The batch axis in force, or None (one process holds the whole batch)."""
    return _AXIS.get()


def row_offset(shape, where: str) -> int:
    """Where this process's draws of ``shape`` (rows first) begin in the global draw:
    ``start * prod(shape[1:])`` inside :func:`batch_axis`, 0 outside. ``shape[0]`` must be the
    axis's ``rows``: the layer was handed this process's slice."""
    axis = _AXIS.get()
    if axis is None:
        return 0
    shape = tuple(int(s) for s in shape)
    if not shape or shape[0] != axis.rows:
        raise ValueError(f"{where}: expected this process's {axis.rows} rows of the global batch "
                         f"of {axis.total} (layers.parallel.batch_axis), got shape {shape}")
    return axis.start * math.prod(shape[1:])
