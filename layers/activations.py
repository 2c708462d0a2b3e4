"""Elementwise and reshaping pieces: ``relu``, ``gelu``, ``flatten``, ``log_softmax``."""
import math

import torch
import torch.nn.functional as F

from . import _checks as C
from ._impl import resolve


def relu(x, *, impl=None):
    """``max(x, 0)``, as ``torch.relu``: gradient 1 where ``x > 0`` and 0 elsewhere, 0 at ``x = 0``.

    Shapes: any -> same. NaN stays NaN, and ``-0.0`` stays ``-0.0`` (bit for bit as torch.relu).
    """
    where = "relu"
    impl = resolve(impl, where)
    C.check_tensor(x, where)
    if impl == "fast":
        return torch.relu(x)
    return ExplicitReLU.apply(x)


class ExplicitReLU(torch.autograd.Function):
    """``relu``'s explicit formulation, ``where(x < 0, 0, x)``, with its backward written out.

        dx = where(y <= 0, 0, dy)

    ``y > 0`` exactly where ``x > 0``, so the saved output decides (as torch's
    ``threshold_backward``, which lets the input be freed): the gradient is 0 at ``x = 0``, and a
    NaN input (``NaN <= 0`` is false) passes ``dy`` through.

    The forward keeps ``x`` where ``x = 0`` (``x < 0``, not ``x <= 0``): ``-0.0`` stays ``-0.0``
    as in torch.relu, so the two agree bit for bit, sign of zero included.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        # Select rather than clamp: clamp's gradient at the boundary is 1, torch.relu's is 0.
        # x < 0, not x <= 0: at x = -0.0 torch.relu returns x itself, sign included.
        return torch.where(x < 0, torch.zeros((), dtype=x.dtype, device=x.device), x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, dy):
        y, = ctx.saved_tensors
        return torch.where(y <= 0, torch.zeros((), dtype=dy.dtype, device=dy.device), dy)


def gelu(x, *, impl=None):
    """The Gaussian error linear unit, as ``torch.nn.GELU()`` (``approximate="none"``):

        gelu(x) = x Phi(x) = x / 2 (1 + erf(x / sqrt(2)))

    ``Phi`` is the standard normal CDF. Shapes: any -> same. NaN stays NaN.
    """
    where = "gelu"
    impl = resolve(impl, where)
    C.check_tensor(x, where)
    C.check_floating(x, where)
    if impl == "fast":
        return F.gelu(x)
    return ExplicitGELU.apply(x)


class ExplicitGELU(torch.autograd.Function):
    """``gelu``'s explicit formulation, ``x / 2 (1 + erf(x / sqrt(2)))``, with its backward written out.

        d gelu / dx = Phi(x) + x phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)

    (product rule on ``x Phi(x)``; ``Phi' = phi``), so ``dx = dy (Phi(x) + x phi(x))``. The
    input is saved: the derivative is not a function of the output alone.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * 0.5 * (1.0 + torch.erf(x * math.sqrt(0.5)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, dy):
        x, = ctx.saved_tensors
        cdf = 0.5 * (1.0 + torch.erf(x * math.sqrt(0.5)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return dy * (cdf + x * pdf)


def _dim(d, rank, where, name):
    if not C.is_int(d):
        raise TypeError(f"{where}: expected {name} to be an int, got {d!r}")
    r = max(rank, 1)
    if not -r <= d < r:
        raise ValueError(f"{where}: expected {name} in [{-r}, {r - 1}] for a {rank}-D input, got {d}")
    return d % r


def flatten(x, start_dim=1, end_dim=-1, *, impl=None):
    """Merge axes ``start_dim..end_dim`` into one, as ``torch.flatten`` / ``nn.Flatten``.

    ``(N, C, H, W) -> (N, C * H * W)`` with the defaults; row-major order is kept.
    """
    where = "flatten"
    impl = resolve(impl, where)
    C.check_tensor(x, where)
    start = _dim(start_dim, x.dim(), where, "start_dim")
    end = _dim(end_dim, x.dim(), where, "end_dim")
    if start > end:
        raise ValueError(f"{where}: expected start_dim <= end_dim, got start_dim={start_dim}, "
                         f"end_dim={end_dim} for input {C.shape_str(x)}")
    if impl == "fast" or x.dim() == 0:
        return torch.flatten(x, start_dim, end_dim)
    merged = 1
    for s in x.shape[start:end + 1]:
        merged *= s
    return x.reshape(tuple(x.shape[:start]) + (merged,) + tuple(x.shape[end + 1:]))


def log_softmax(x, dim=-1, *, impl=None):
    """``log(softmax(x))`` along ``dim``: ``x_i - log(sum_j exp(x_j))``.

    Computed stably as ``(x - m) - log(sum_j exp(x_j - m))`` with ``m = max_j x_j``; ``m`` is
    treated as a constant (the result does not depend on it). Shapes: any -> same.
    """
    where = "log_softmax"
    impl = resolve(impl, where)
    C.check_tensor(x, where)
    d = _dim(dim, x.dim(), where, "dim")
    if impl == "fast":
        return F.log_softmax(x, dim=d)
    return ExplicitLogSoftmax.apply(x, d)


def log_softmax_values(x, d):
    """``(x - m) - log(sum_j exp(x_j - m))`` along axis ``d`` (an index ``>= 0``), no checks:
    the forward of :class:`ExplicitLogSoftmax`, also computed by the explicit cross-entropy."""
    m = x.amax(dim=d, keepdim=True)
    shifted = x - m
    return shifted - torch.log(torch.exp(shifted).sum(dim=d, keepdim=True))


class ExplicitLogSoftmax(torch.autograd.Function):
    """``log_softmax``'s explicit formulation with its backward written out.

    ``y_i = x_i - log sum_j exp(x_j)``, so ``dy_i / dx_k = [i = k] - softmax(x)_k`` and

        dx_k = sum_i dy_i (delta_ik - p_k) = dy_k - p_k sum_i dy_i,   p = softmax(x) = exp(y)

    (``m``, the max subtracted for stability, cancels out and needs no gradient). Only the output
    is saved: ``p = exp(y)``.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, d):
        return log_softmax_values(x, d)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.dim = inputs[1]

    @staticmethod
    def backward(ctx, dy):
        y, = ctx.saved_tensors
        return dy - torch.exp(y) * dy.sum(dim=ctx.dim, keepdim=True), None
