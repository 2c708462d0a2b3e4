"""Fully connected layer: ``y = x W^T + b``."""
import torch.nn.functional as F

from . import _checks as C
from ._impl import resolve


def linear(params, x, *, impl=None):
    """Affine map over the last axis, as ``torch.nn.Linear``.

    ``y[..., o] = sum_i x[..., i] * W[o, i] + b[o]``

    Args:
      params: ``{"weight": (out, in), "bias": (out,)}``; ``"bias"`` may be left out.
      x: ``(..., in)``, in the weight's dtype (under ``torch.autocast`` any float16 / bfloat16 /
        float32 mix, which autocast casts).
      impl: ``"fast"`` (``F.linear``), ``"explicit"`` (``x @ W.T + b``) or None (the default).

    Returns:
      ``(..., out)``.
    """
    where = "linear"
    impl = resolve(impl, where)
    weight, bias = C.weight_and_bias(params, x, where, 2, "(out, in)")
    C.check_dtype(x, weight, where, "input", "weight's", autocast=True)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{where}: expected input with last dimension {weight.shape[1]} "
                         f"(weight is {C.shape_str(weight)}), got {C.shape_str(x)}")
    if bias is not None:
        C.check_vector(bias, weight.shape[0], where, "bias", "weight is", weight)
        C.check_dtype(bias, weight, where, "bias", "weight's", autocast=True)

    if impl == "fast":
        return F.linear(x, weight, bias)
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y
