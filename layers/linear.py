"""Fully connected layer: ``y = x W^T + b``."""
import torch
import torch.nn.functional as F

from . import _checks as C
from ._autograd import autocast_as, autocast_of
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
    return ExplicitLinear.apply(x, weight, bias)


class ExplicitLinear(torch.autograd.Function):
    """``linear``'s explicit formulation, ``y = x W^T + b``, with its backward written out.

    With the leading axes of ``x`` flattened into ``B`` rows, ``X`` ``(B, in)`` and the output
    gradient ``dY`` ``(B, out)``:

        dX = dY W              (B, out) @ (out, in)
        dW = dY^T X            (out, B) @ (B, in): one outer product per row, summed
        db = sum_rows dY

    Under ``torch.autocast`` the backward re-enters the forward's autocast, so its matmuls run in
    the forward's precision; each gradient is returned in its input's dtype.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias):
        y = x @ weight.T
        if bias is not None:   # under torch.autocast y is in autocast's dtype: F.linear casts the bias too
            y = y + bias.to(y.dtype)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.autocast = autocast_of(x)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = dw = db = None
        with autocast_as(ctx.autocast):
            rows = dy.reshape(-1, weight.shape[0])                          # dY: (B, out)
            if need_x:
                dx = (dy @ weight).to(x.dtype)
            if need_w:
                dw = (rows.T @ x.reshape(-1, weight.shape[1])).to(weight.dtype)
            if need_b:
                db = rows.sum(0).to(ctx.bias_dtype)
        return dx, dw, db
