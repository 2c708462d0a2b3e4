"""What the written-out backward passes share (each layer's ``Explicit*`` ``autograd.Function``).

Every layer's ``impl="explicit"`` formulation is a ``torch.autograd.Function`` whose ``backward``
is the derivation written out (docs/layers.md puts each one beside its code). They follow the
torch.func rules for such functions, so ``grad``, ``vjp``, ``vmap`` and ``jacrev`` work on them:

* ``forward`` takes no ``ctx``; ``setup_context(ctx, inputs, output)`` saves only inputs and
  outputs (an intermediate a backward needs is either returned as an extra output or recomputed
  from the inputs);
* ``backward`` is plain torch ops on saved tensors, so ``generate_vmap_rule = True`` gives the
  vmap rule (``vmap`` of ``forward`` and, for ``jacrev`` and per-sample gradients, of
  ``backward``).

Double backward is not required of them. It works all the same, because each backward is itself
differentiable torch ops on the inputs and outputs (an intermediate is either recomputed or a
differentiable output whose gradient the backward takes in): ``gradgradcheck`` passes for every
one (tests/test_layers_backward.py).
"""
import contextlib

import torch

from ._checks import autocasting


def autocast_of(t):
    """``(device type, dtype)`` of the ``torch.autocast`` active on ``t``'s device, or None.

    Saved by a forward so that its backward computes in the forward's precision, as
    ``torch.amp.custom_bwd`` does for functions that take a ``ctx`` in ``forward``.
    """
    if not autocasting(t):
        return None
    return t.device.type, torch.get_autocast_dtype(t.device.type)


def autocast_as(state):
    """A context that re-enters the autocast ``state`` of :func:`autocast_of` (or does nothing)."""
    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(state[0], dtype=state[1])
