"""Fixed whitening filters for a first convolution, computed from the training images' patches
(airbench, Jordan 2024, arXiv 2404.00498, section 3.2).

Every ``k x k`` window of every image, flattened in a conv weight's order ``(c, i, j)``, is a
patch vector ``v`` of ``D = C k k`` numbers. Their (uncentred) second-moment matrix

    S = (1 / P) sum_p v_p v_p^T                  (D, D), P = N (H - k + 1) (W - k + 1)

is diagonalised as ``S = U diag(lambda) U^T`` (eigenvalues in decreasing order). The filter of
eigen-direction ``d`` is ``w_d = u_d / sqrt(lambda_d + eps)``; a convolution with it gives each
window's coordinate along ``u_d``, scaled to unit second moment:

    E[(w_d . v)(w_e . v)] = u_d^T S u_e / sqrt((lambda_d + eps)(lambda_e + eps))
                          = [d = e] lambda_d / (lambda_d + eps)

so the ``D`` output channels are decorrelated, each with second moment ``~ 1`` wherever
``lambda_d >> eps`` (``eps`` keeps the near-null directions from being amplified without
bound). airbench stacks ``w`` and ``-w``, ``2 D`` filters, so that the GELU after the
convolution sees both signs of every direction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from layers import _checks as C

from .compose import Net

__all__ = ["image_patches", "patch_covariance", "whitening_filters", "whitened_weight",
           "whitened_init"]


def _check_images(images, where: str, kernel_size: int) -> None:
    C.check_tensor(images, where, "images")
    C.check_floating(images, where, "images")
    if images.dim() != 4 or images.shape[0] < 1 or min(images.shape[-2:]) < kernel_size:
        raise ValueError(f"{where}: expected images (N >= 1, C, H, W) with H, W >= kernel_size "
                         f"{kernel_size}, got {tuple(images.shape)}")


def image_patches(images: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Every ``k x k`` window (stride 1, no padding) as a row: ``(N, C, H, W) ->
    (N (H - k + 1) (W - k + 1), C k k)``, each row in a conv weight's ``(c, i, j)`` order, so
    ``patches @ w.reshape(O, -1).T`` is the convolution's output at every position."""
    C.check_positive_int(kernel_size, "image_patches", "kernel_size")
    _check_images(images, "image_patches", kernel_size)
    cols = F.unfold(images, kernel_size)            # (N, C k k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def patch_covariance(images: torch.Tensor, kernel_size: int = 2, *, chunk: int = 1000) -> torch.Tensor:
    """``S = (1 / P) sum_p v_p v_p^T`` over every ``k x k`` patch of ``images (N, C, H, W)``:
    ``(C k k, C k k)`` float64 (uncentred, as airbench). Summed ``chunk`` images at a time, in
    float64, so the whole training set fits in memory."""
    where = "patch_covariance"
    C.check_positive_int(kernel_size, where, "kernel_size")
    C.check_positive_int(chunk, where, "chunk")
    _check_images(images, where, kernel_size)
    d = images.shape[1] * kernel_size * kernel_size
    total = torch.zeros(d, d, dtype=torch.float64, device=images.device)
    count = 0
    for part in images.split(chunk):
        v = image_patches(part.to(torch.float64), kernel_size)
        total += v.T @ v
        count += v.shape[0]
    return total / count


def whitening_filters(images: torch.Tensor, kernel_size: int = 2, *, eps: float = 5e-4,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``2 C k k`` whitening filters of ``images (N, C, H, W)`` (the net's inputs, normalised):
    ``(2 D, C, k, k)`` with ``D = C k k``, rows ``[w_1 .. w_D, -w_1 .. -w_D]``,
    ``w_d = u_d / sqrt(lambda_d + eps)`` for the eigenpairs of :func:`patch_covariance` in
    decreasing order of ``lambda`` (module docstring). ``eps`` > 0 bounds the gain of the
    near-null directions. Computed in float64, returned in ``dtype``.
    """
    where = "whitening_filters"
    if not (C.is_real(eps) and eps > 0):
        raise ValueError(f"{where}: expected eps > 0, got {eps!r}")
    cov = patch_covariance(images, kernel_size)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)       # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    w = (eigenvectors / torch.sqrt(eigenvalues.clamp(min=0) + eps)).T   # row d: w_d
    w = w.reshape(-1, images.shape[1], kernel_size, kernel_size)
    return torch.cat([w, -w]).to(dtype)


def whitened_weight(weight: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """A conv ``weight (O, C, k, k)`` whose first output channels are whitening ``filters``
    (``(2 D, C, k, k)`` as :func:`whitening_filters` returns them, ``[w_1 .. w_D, -w_1 .. -w_D]``),
    rescaled to the norm of the weight they replace:

        m = min(D, O // 2) directions,   W'[:2m] = a [w_1 .. w_m, -w_1 .. -w_m],   W'[2m:] = W[2m:]
        a = ||W[:2m]||_F / ||[w_1 .. w_m, -w_1 .. -w_m]||_F

    The directions and their relative gains ``1 / sqrt(lambda_d + eps)`` are the whitening's; the
    overall scale is the initialiser's, so the layer's effective learning rate under SGD
    (``~ lr / ||W||^2``, with a batch norm after it) stays what it was. Returns a new tensor in
    ``weight``'s dtype and device.
    """
    where = "whitened_weight"
    C.check_tensor(weight, where, "weight")
    C.check_tensor(filters, where, "filters")
    if (weight.dim() != 4 or filters.dim() != 4 or filters.shape[1:] != weight.shape[1:]
            or filters.shape[0] % 2):
        raise ValueError(f"{where}: expected weight (O, C, k, k) and filters (2 D, C, k, k) of the "
                         f"same C, k, got {tuple(weight.shape)} and {tuple(filters.shape)}")
    d = filters.shape[0] // 2
    m = min(d, weight.shape[0] // 2)
    if m == 0:
        raise ValueError(f"{where}: expected a weight of at least 2 output channels, got "
                         f"{tuple(weight.shape)}")
    chosen = torch.cat([filters[:m], filters[d:d + m]]).to(dtype=weight.dtype, device=weight.device)
    scale = weight[:2 * m].norm() / chosen.norm()
    return torch.cat([chosen * scale, weight[2 * m:]])


def whitened_init(net: Net, name: str, filters: torch.Tensor) -> Net:
    """``net`` whose ``init`` replaces parameter ``name`` (a conv weight) by
    :func:`whitened_weight` of it and ``filters``: whitening as an *initialisation*, trained
    afterwards like any weight (airbench instead freezes it). ``apply`` is unchanged."""
    if not isinstance(net, Net):
        raise TypeError(f"whitened_init: expected a nets.Net, got {type(net).__name__}")

    def init(key, **kwargs):
        params, state = net.init(key, **kwargs)
        if name not in params:
            raise ValueError(f"whitened_init: expected a parameter {name!r}, got "
                             f"{sorted(params)[:4]}...")
        return {**params, name: whitened_weight(params[name], filters)}, state
    return net._replace(init=init)
