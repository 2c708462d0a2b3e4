"""2-D convolution (cross-correlation, as torch) over ``(N, C, H, W)`` inputs with OIHW weights."""
import torch.nn.functional as F

from . import _checks as C
from ._impl import resolve


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

    if impl == "fast":
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    cols, (ho, wo) = im2col(x, (kh, kw), stride, dilation, pads)    # (N, C*kh*kw, L)
    n = x.shape[0]
    # Group g sees rows [g * C/G * kh * kw, (g + 1) * C/G * kh * kw) of the columns.
    cols = cols.reshape(n, groups, in_per_group * kh * kw, ho * wo)
    w = weight.reshape(groups, out_ch // groups, in_per_group * kh * kw)
    y = (w @ cols).reshape(n, out_ch, ho, wo)                          # (N, G, O/G, L) matmul
    if bias is not None:
        y = y + bias.reshape(1, out_ch, 1, 1)
    return y.squeeze(0) if unbatched else y
