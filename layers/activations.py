"""Elementwise and reshaping pieces: ``relu``, ``flatten``, ``log_softmax``."""
import torch
import torch.nn.functional as F

from . import _checks as C
from ._impl import resolve


def relu(x, *, impl=None):
    """``max(x, 0)``, as ``torch.relu``: gradient 1 where ``x > 0`` and 0 elsewhere, 0 at ``x = 0``.

    Shapes: any -> same. NaN stays NaN.
    """
    where = "relu"
    impl = resolve(impl, where)
    C.check_tensor(x, where)
    if impl == "fast":
        return torch.relu(x)
    # Select rather than clamp: clamp's gradient at the boundary is 1, torch.relu's is 0.
    return torch.where(x <= 0, torch.zeros((), dtype=x.dtype, device=x.device), x)


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
    m = x.detach().amax(dim=d, keepdim=True)
    shifted = x - m
    return shifted - torch.log(torch.exp(shifted).sum(dim=d, keepdim=True))
