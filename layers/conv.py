"""2-D convolution (cross-correlation, as torch) over ``(N, C, H, W)`` inputs with OIHW weights."""
import torch
import torch.nn.functional as F

from . import _checks as C
from ._autograd import autocast_as, autocast_of
from ._impl import resolve
from ._members import member_conv2d


def _padding(padding, kernel, dilation, stride, where):
    """((top, bottom), (left, right)) for an int, a pair, "same" or "valid"."""
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{where}: expected stride 1 with padding='same', got stride={stride}")
            # As torch: the total d*(k-1) is split with the odd element on the bottom/right.
            pads = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise ValueError(f"{where}: expected padding to be an int, a pair, 'same' or 'valid', "
                         f"got {padding!r}")
    ph, pw = C.pair(padding, where, "padding", 0)
    return ((ph, ph), (pw, pw))


def im2col(x, kernel, stride, dilation, pads):
    """Patches of ``x`` as columns: ``(N, C, H, W) -> (N, C * kh * kw, Ho * Wo)``, plus ``(Ho, Wo)``.

    Row ``c * kh * kw + i * kw + j`` of column ``(oh, ow)`` holds
    ``x_padded[n, c, oh * sh + i * dh, ow * sw + j * dw]`` - the same layout as ``F.unfold``.
    Built from zero padding and strided views (``Tensor.unfold``), so no data is copied until the
    final reshape.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    (pt, pb), (pl, pr) = pads
    xp = F.pad(x, (pl, pr, pt, pb))
    # A window of the dilated kernel spans d*(k-1)+1 pixels; every d-th of them is a tap.
    windows = xp.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    taps = windows[..., ::dh, ::dw]                      # (N, C, Ho, Wo, kh, kw)
    n, c, ho, wo = taps.shape[:4]
    cols = taps.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)
    return cols, (ho, wo)


def col2im(cols, size, kernel, stride, dilation, pads):
    """The adjoint of :func:`im2col`: ``(N, C * kh * kw, Ho * Wo) -> (N, C, H, W)``.

    ``im2col`` copies pixel ``x_pad[n, c, oh * sh + i * dh, ow * sw + j * dw]`` into row
    ``c * kh * kw + i * kw + j`` of column ``(oh, ow)``; ``col2im`` adds every entry of ``cols``
    back onto the pixel it was copied from (a pixel in several windows receives the sum), then
    drops the padding. ``size`` is the input's ``(H, W)``. Same layout as ``F.fold``.
    """
    (h, w), (kh, kw), (sh, sw), (dh, dw) = size, kernel, stride, dilation
    (pt, pb), (pl, pr) = pads
    hp, wp = h + pt + pb, w + pl + pr
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    n, c = cols.shape[0], cols.shape[1] // (kh * kw)
    rows = torch.arange(kh, device=cols.device) * dh
    rows = rows.reshape(kh, 1, 1, 1) + (torch.arange(ho, device=cols.device) * sh).reshape(1, 1, ho, 1)
    across = torch.arange(kw, device=cols.device) * dw
    across = across.reshape(1, kw, 1, 1) + (torch.arange(wo, device=cols.device) * sw).reshape(1, 1, 1, wo)
    pixel = (rows * wp + across).reshape(-1)       # padded pixel of each entry, in cols' order
    x_pad = cols.new_zeros(n, c, hp * wp).index_add(2, pixel, cols.reshape(n, c, kh * kw * ho * wo))
    return x_pad.reshape(n, c, hp, wp)[:, :, pt:pt + h, pl:pl + w]


class ExplicitConv2d(torch.autograd.Function):
    """``conv2d``'s explicit formulation, im2col + matmul, with its backward written out.

    Per group ``g`` (``G`` groups, ``K = C/G * kh * kw`` taps, ``L = Ho * Wo`` positions) and
    sample ``n``, with ``X_n = im2col(x)_n`` restricted to the group's rows, ``(K, L)``, and
    ``W_g`` the group's weight as ``(O/G, K)``:

        Y_n = W_g X_n + b                                     forward

    so for an output gradient ``dY_n`` (``(O/G, L)``):

        db  = sum over n, i, j of dY[n, o, i, j]              (b is added at every position)
        dW_g = sum_n dY_n X_n^T                               (output gradient x im2col(x)^T,
                                                               summed over the batch)
        dX_n = W_g^T dY_n,   dx = col2im(dX_n)                (the adjoint of im2col)

    ``col2im`` adds each of ``dX``'s entries back onto the input pixel ``im2col`` copied it from
    and drops the padding (including an asymmetric ``"same"`` padding's extra bottom/right
    row), which makes ``dx`` the *transposed convolution* of ``dy`` with ``W``:
    ``F.conv_transpose2d(dy, W, stride=s, dilation=d, groups=G)``, zero-filled to the padded size
    and with the padding cropped (a test checks this). Stride spreads the output gradient out
    (rows no window reached get 0), dilation spaces the
    taps, groups make ``W`` block-diagonal so each group's gradients stay in its own channels.

    Inputs ``x`` 4-D; ``pads`` is ``((top, bottom), (left, right))``. Only ``x`` and ``weight``
    are saved: ``dW`` recomputes ``im2col(x)``. Under ``torch.autocast`` the backward re-enters
    the forward's autocast, so its matmuls run in the forward's precision.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, stride, dilation, pads, groups):
        out_ch, in_per_group, kh, kw = weight.shape
        cols, (ho, wo) = im2col(x, (kh, kw), stride, dilation, pads)      # (N, C*kh*kw, L)
        n = x.shape[0]
        # Group g sees rows [g * C/G * kh * kw, (g + 1) * C/G * kh * kw) of the columns.
        cols = cols.reshape(n, groups, in_per_group * kh * kw, ho * wo)
        w = weight.reshape(groups, out_ch // groups, in_per_group * kh * kw)
        y = (w @ cols).reshape(n, out_ch, ho, wo)                          # (N, G, O/G, L) matmul
        if bias is not None:   # under torch.autocast y is in autocast's dtype: F.conv2d casts the bias too
            y = y + bias.reshape(1, out_ch, 1, 1).to(y.dtype)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, dilation, pads, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.hyper = stride, dilation, pads, groups
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.autocast = autocast_of(x)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        stride, dilation, pads, groups = ctx.hyper
        out_ch, in_per_group, kh, kw = weight.shape
        n, _, ho, wo = dy.shape
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with autocast_as(ctx.autocast):
            dy_g = dy.reshape(n, groups, out_ch // groups, ho * wo)        # dY_n per group
            if need_x:
                w = weight.reshape(groups, out_ch // groups, in_per_group * kh * kw)
                d_cols = w.transpose(1, 2) @ dy_g                          # W_g^T dY_n: (N, G, K, L)
                d_cols = d_cols.reshape(n, groups * in_per_group * kh * kw, ho * wo)
                dx = col2im(d_cols, x.shape[-2:], (kh, kw), stride, dilation, pads).to(x.dtype)
            if need_w:
                cols, _ = im2col(x, (kh, kw), stride, dilation, pads)
                cols = cols.reshape(n, groups, in_per_group * kh * kw, ho * wo)
                dw = (dy_g @ cols.transpose(2, 3)).sum(0)                   # sum_n dY_n X_n^T
                dw = dw.reshape(weight.shape).to(weight.dtype)
            if need_b:
                db = dy.sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def conv2d(params, x, *, stride=1, padding=0, dilation=1, groups=1, impl=None):
    """2-D cross-correlation, as ``torch.nn.Conv2d``.

    ``y[n, o, i, j] = b[o] + sum_{c, u, v} W[o, c, u, v] *
    x_pad[n, g(o) * C/G + c, i * sh + u * dh, j * sw + v * dw]``
    where ``g(o) = o // (O / G)`` is the group of output channel ``o``.

    Args:
      params: ``{"weight": (O, C / groups, kh, kw), "bias": (O,)}``; ``"bias"`` may be left out.
      x: ``(N, C, H, W)`` or unbatched ``(C, H, W)``, in the weight's dtype (under
        ``torch.autocast`` any float16 / bfloat16 / float32 mix, which autocast casts).
      stride, dilation: int or pair, >= 1.
      padding: int or pair (zeros on both sides), ``"valid"`` (none) or ``"same"`` (output size
        equals input size; stride must be 1; an odd total pads one more on the bottom/right).
      groups: input and output channels split into this many independent groups.
      impl: ``"fast"`` (``F.conv2d``), ``"explicit"`` (im2col + matmul) or None (the default).

    Returns:
      ``(N, O, Ho, Wo)`` (or ``(O, Ho, Wo)``), ``Ho = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1``.
    """
    where = "conv2d"
    impl = resolve(impl, where)
    weight, bias = C.weight_and_bias(params, x, where, 4, "(O, C/groups, kh, kw)")
    C.check_rank(x, (3, 4), where, layout="(N, C, H, W) or (C, H, W)")
    C.check_dtype(x, weight, where, "input", "weight's", autocast=True)
    C.check_positive_int(groups, where, "groups")
    stride = C.pair(stride, where, "stride", 1)
    dilation = C.pair(dilation, where, "dilation", 1)
    out_ch, in_per_group, kh, kw = weight.shape
    in_ch = x.shape[-3]
    if in_ch % groups != 0:
        raise ValueError(f"{where}: expected input channels divisible by groups={groups}, "
                         f"got {C.shape_str(x)}")
    if out_ch % groups != 0:
        raise ValueError(f"{where}: expected output channels divisible by groups={groups}, "
                         f"got weight {C.shape_str(weight)}")
    if in_ch != in_per_group * groups:
        raise ValueError(f"{where}: expected input with {in_per_group * groups} channels "
                         f"(weight is {C.shape_str(weight)}, groups={groups}), got {C.shape_str(x)}")
    if bias is not None:
        C.check_vector(bias, out_ch, where, "bias", "weight is", weight)
        C.check_dtype(bias, weight, where, "bias", "weight's", autocast=True)
    pads = _padding(padding, (kh, kw), dilation, stride, where)
    for axis, size, k, d, (p0, p1) in (("height", x.shape[-2], kh, dilation[0], pads[0]),
                                       ("width", x.shape[-1], kw, dilation[1], pads[1])):
        if d * (k - 1) + 1 > size + p0 + p1:
            raise ValueError(f"{where}: expected padded input {axis} >= dilated kernel {axis} "
                             f"{d * (k - 1) + 1} (weight is {C.shape_str(weight)}, dilation={dilation}, "
                             f"padding={padding!r}), got {C.shape_str(x)}")

    if impl == "fast":   # F.conv2d; one call per member under an ensemble's vmap (_members.py)
        return member_conv2d(x, weight, bias, stride, padding, dilation, groups)
    if x.dim() == 3:
        return ExplicitConv2d.apply(x.unsqueeze(0), weight, bias, stride, dilation, pads,
                                    groups).squeeze(0)
    return ExplicitConv2d.apply(x, weight, bias, stride, dilation, pads, groups)
