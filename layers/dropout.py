"""Dropout with an explicit random key: ``p`` is the probability of dropping an element."""
import torch

from . import _checks as C
from . import parallel
from . import random as jr
from ._impl import resolve


def dropout(x, *, p, train, key=None, impl=None):
    """Zero each element with probability ``p`` and scale survivors by ``1 / (1 - p)``.

    ``y = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` drawn elementwise from ``key``
    (``layers.random.bernoulli(key, 1 - p, x.shape, resolution_bits=16)``: two draws per hashed
    32-bit word, the keep probability rounded to a multiple of ``2**-16``), so ``E[y] = x`` up to
    that rounding (at most ``7.7e-6``; the scale is the exact ``1 / (1 - p)``). Inside
    :func:`layers.parallel.batch_axis` ``x`` is this process's rows of the batch, and they get
    their rows of the global batch's mask. ``p = 1`` gives exact
    zeros (no ``0 / 0``, even for infinite ``x``); ``train=False`` or ``p = 0`` returns ``x`` unchanged. The same key gives
    the same mask, in both formulations and on every device.

    Args:
      x: any shape.
      p: drop probability in ``[0, 1]`` (torch's convention, not the keep rate).
      train: apply dropout; eval is the identity.
      key: ``layers.random`` key; required when ``train`` and ``p > 0``.
      impl: ``"fast"`` (one fused multiply by the scaled mask), ``"explicit"`` (mask, select,
        divide by the keep probability) or None (the default).

    Returns:
      ``y`` shaped like ``x``.
    """
    where = "dropout"
    impl = resolve(impl, where)
    C.check_tensor(x, where)
    p = C.check_probability(p, where)
    C.check_bool(train, where, "train")
    if not train or p == 0.0:
        return x
    if key is None:
        raise ValueError(f"{where}: expected a random key (layers.random.key) when train=True "
                         f"and p={p} > 0, got key=None")
    jr.check_key(key, where)
    if p == 1.0:
        # Select, never multiply: inf * 0 would be NaN, and so would the gradient of x / 0.
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(torch.zeros_like(x, dtype=torch.bool), x, zero)
    keep_prob = 1.0 - p
    # Inside a data-parallel batch axis this process draws its rows' part of the global mask.
    keep = jr.bernoulli(key, keep_prob, x.shape, device=x.device, resolution_bits=16,
                        offset=parallel.row_offset(x.shape, where))

    if impl == "fast":
        return x * (keep.to(x.dtype) * (1.0 / keep_prob))      # one fused multiply by the scaled mask
    return ExplicitDropout.apply(x, keep, keep_prob)


class ExplicitDropout(torch.autograd.Function):
    """``dropout``'s explicit formulation, ``where(m, x / (1 - p), 0)``, with its backward written out.

    ``y`` is linear in ``x`` with the diagonal Jacobian ``m / (1 - p)``, so

        dx = where(m, dy / (1 - p), 0)

    the same mask, the same scale: a dropped element gets no gradient (a select, so not even an
    infinite ``dy`` leaks through as NaN). ``keep`` (the boolean mask ``m``) is an input and is
    saved; ``keep_prob = 1 - p`` is a Python float.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, keep, keep_prob):
        return torch.where(keep, x / keep_prob, torch.zeros((), dtype=x.dtype, device=x.device))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, keep, keep_prob = inputs
        ctx.save_for_backward(keep)
        ctx.keep_prob = keep_prob

    @staticmethod
    def backward(ctx, dy):
        keep, = ctx.saved_tensors
        zero = torch.zeros((), dtype=dy.dtype, device=dy.device)
        return torch.where(keep, dy / ctx.keep_prob, zero), None, None
