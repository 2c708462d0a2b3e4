"""Pooling over ``(N, C, H, W)``: max over sliding windows, and adaptive average."""
import torch
import torch.nn.functional as F

from . import _checks as C
from ._impl import resolve
from ._members import member_max_pool2d


def _pool_out_size(size, k, s, p, d, ceil_mode):
    """torch's output length for one axis (``pooling_output_shape`` in ATen)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    # ceil_mode may add a last window; torch drops it when it would start inside the right padding.
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _padding_only_window(size, k, s, p, d, out):
    """Whether some window near the leading edge holds padding only (possible with dilation).

    A window starting at ``i s - p >= 0`` contains its first tap, which lies inside the input
    (torch's output-size rule guarantees ``i s - p < size``), so only the few windows that start
    in the leading padding, ``i s < p``, need a look.
    """
    i = 0
    while i < out and i * s < p:
        start = i * s - p
        if not any(0 <= start + u * d < size for u in range(k)):
            return True
        i += 1
    return False


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *, impl=None):
    """Max over each (dilated) window, as ``torch.nn.MaxPool2d``.

    ``y[n, c, i, j] = max_{u < kh, v < kw} x_pad[n, c, i * sh + u * dh, j * sw + v * dw]``
    with ``x_pad`` padded by ``-inf``. Ties send the whole gradient to the first maximum in
    row-major window order (``u`` then ``v``), as torch does.

    Args:
      x: ``(N, C, H, W)`` or unbatched ``(C, H, W)``.
      kernel_size: int or pair. stride: int or pair (default ``kernel_size``).
      padding: int or pair, at most half the kernel size. dilation: int or pair.
      ceil_mode: round the output size up (a partial last window), as torch.
      impl: ``"fast"`` (``F.max_pool2d``), ``"explicit"`` (argmax over gathered windows) or None.

    Returns:
      ``(N, C, Ho, Wo)`` (or ``(C, Ho, Wo)``) with
      ``Ho = floor_or_ceil((H + 2 ph - dh (kh - 1) - 1) / sh) + 1``.
    """
    where = "max_pool2d"
    impl = resolve(impl, where)
    C.check_tensor(x, where)
    C.check_rank(x, (3, 4), where, layout="(N, C, H, W) or (C, H, W)")
    kernel = C.pair(kernel_size, where, "kernel_size", 1)
    stride_ = kernel if stride is None else C.pair(stride, where, "stride", 1)
    pad = C.pair(padding, where, "padding", 0)
    dil = C.pair(dilation, where, "dilation", 1)
    C.check_bool(ceil_mode, where, "ceil_mode")
    if pad[0] * 2 > kernel[0] or pad[1] * 2 > kernel[1]:
        raise ValueError(f"{where}: expected padding at most half of kernel_size={kernel}, "
                         f"got padding={padding!r}")
    out = []
    for axis, size, k, s, p, d in (("height", x.shape[-2], kernel[0], stride_[0], pad[0], dil[0]),
                                   ("width", x.shape[-1], kernel[1], stride_[1], pad[1], dil[1])):
        if d * (k - 1) + 1 > size + 2 * p:
            raise ValueError(f"{where}: expected padded input {axis} >= dilated kernel {axis} "
                             f"{d * (k - 1) + 1} (kernel_size={kernel_size!r}, dilation={dilation!r}, "
                             f"padding={padding!r}), got {C.shape_str(x)}")
        out.append(_pool_out_size(size, k, s, p, d, ceil_mode))
        # torch returns -inf for such a window and its CPU backward then writes out of bounds.
        if _padding_only_window(size, k, s, p, d, out[-1]):
            raise ValueError(f"{where}: expected every window to overlap the input, got a window of "
                             f"padding only along the {axis} (kernel_size={kernel_size!r}, "
                             f"dilation={dilation!r}, padding={padding!r}) for input {C.shape_str(x)}")

    if impl == "fast":   # F.max_pool2d; the members side by side under an ensemble's vmap (_members.py)
        return member_max_pool2d(x, kernel, stride_, pad, dil, ceil_mode)
    if x.dim() == 3:
        y, _ = ExplicitMaxPool2d.apply(x.unsqueeze(0), kernel, stride_, pad, dil, tuple(out))
        return y.squeeze(0)
    y, _ = ExplicitMaxPool2d.apply(x, kernel, stride_, pad, dil, tuple(out))
    return y


def _right_padding(size, k, s, p, d, out):
    """The right (bottom) padding that fits all ``out`` windows: ``p``, or more in ceil mode,
    where the last window may reach past the right padding."""
    return max(p, (out - 1) * s + d * (k - 1) + 1 - size - p)


class ExplicitMaxPool2d(torch.autograd.Function):
    """``max_pool2d``'s explicit formulation, a max over gathered windows, with its backward
    written out.

    Each output is one of its window's taps, ``y[n, c, i, j] = x_pad[n, c, r, q]`` with
    ``(r, q) = (i sh + u* dh, j sw + v* dw)`` and ``(u*, v*)`` the window's first maximum in
    row-major order (``argmax`` returns the first). So the Jacobian has one 1 per output and

        dx_pad[n, c, r, q] += dy[n, c, i, j]      at each window's first maximum (r, q)

    summed where windows overlap and share their maximum, then the padding is dropped. Ties send
    everything to the first maximum, as torch's kernels do; ``-inf`` padding never wins while a
    window holds an input value, and ``max_pool2d`` refuses windows of padding only.

    Inputs ``x`` 4-D, ``out = (Ho, Wo)``. ``forward`` returns ``(y, first_max)``: the
    ``(N, C, Ho, Wo, 1)`` tap index of each window's maximum, a non-differentiable extra output
    so that ``setup_context`` can save it (the torch.func rule), like the indices
    ``F.max_pool2d_with_indices`` returns.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, kernel, stride, padding, dilation, out):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = kernel, stride, padding, dilation, out
        # Pad with -inf so padding never wins; in ceil mode the last window may reach past the
        # right padding, so pad on the right until every one of the ho (wo) windows fits.
        right_h = _right_padding(x.shape[-2], kh, sh, ph, dh, ho)
        right_w = _right_padding(x.shape[-1], kw, sw, pw, dw, wo)
        xp = F.pad(x, (pw, right_w, ph, right_h), value=float("-inf"))
        windows = xp.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
        taps = windows[:, :, :ho, :wo, ::dh, ::dw]                       # (N, C, Ho, Wo, kh, kw)
        taps = taps.reshape(taps.shape[:4] + (kh * kw,))                 # row-major window order
        # argmax returns the first maximum (torch's tie rule); the backward routes dy there alone.
        first_max = taps.argmax(dim=-1, keepdim=True)
        return taps.gather(-1, first_max).squeeze(-1), first_max

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, *hyper = inputs
        _, first_max = output
        ctx.mark_non_differentiable(first_max)
        ctx.save_for_backward(first_max)
        ctx.size = tuple(x.shape[-2:])
        ctx.hyper = hyper

    @staticmethod
    def backward(ctx, dy, _):
        first_max, = ctx.saved_tensors
        (h, w), ((kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo)) = ctx.size, ctx.hyper
        hp = ph + h + _right_padding(h, kh, sh, ph, dh, ho)
        wp = pw + w + _right_padding(w, kw, sw, pw, dw, wo)
        tap = first_max.squeeze(-1)                                      # u* kw + v*
        device = dy.device
        row = (torch.arange(ho, device=device) * sh).reshape(ho, 1) + (tap // kw) * dh
        col = (torch.arange(wo, device=device) * sw).reshape(1, wo) + (tap % kw) * dw
        n, c = dy.shape[:2]
        pixel = (row * wp + col).reshape(n, c, ho * wo)                  # the maximum's padded pixel
        dx_pad = dy.new_zeros(n, c, hp * wp).scatter_add(2, pixel, dy.reshape(n, c, ho * wo))
        return dx_pad.reshape(n, c, hp, wp)[:, :, ph:ph + h, pw:pw + w], None, None, None, None, None


def _adaptive_size(output_size, in_hw, where):
    given = output_size
    if output_size is None or C.is_int(output_size):
        output_size = (output_size, output_size)
    if not (isinstance(output_size, (tuple, list)) and len(output_size) == 2
            and all(o is None or C.is_int(o) for o in output_size)):
        raise TypeError(f"{where}: expected output_size to be an int, None or a pair of them, "
                        f"got {given!r}")
    size = tuple(i if o is None else int(o) for o, i in zip(output_size, in_hw))
    if min(size) < 1:
        raise ValueError(f"{where}: expected output_size >= 1, got {given!r}")
    return size


def _averaging_matrix(out, size, like):
    """``(out, size)`` matrix whose row ``i`` averages ``[floor(i size / out), ceil((i+1) size / out))``."""
    i = torch.arange(out, device=like.device)
    start = (i * size) // out
    end = ((i + 1) * size + out - 1) // out
    j = torch.arange(size, device=like.device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def adaptive_avg_pool2d(x, output_size, *, impl=None):
    """Average over adaptively sized windows so the output is ``output_size``, as torch.

    Output cell ``i`` along an axis of length ``H`` averages input rows
    ``[floor(i H / Ho), ceil((i + 1) H / Ho))``; the same for columns. Windows overlap when
    ``H`` is not a multiple of ``Ho``.

    Args:
      x: ``(N, C, H, W)`` or unbatched ``(C, H, W)``.
      output_size: int or pair ``(Ho, Wo)``; a ``None`` entry keeps that input size.
      impl: ``"fast"`` (``F.adaptive_avg_pool2d``), ``"explicit"`` (``A_h x A_w^T`` with averaging
        matrices) or None (the default).

    Returns:
      ``(N, C, Ho, Wo)`` (or ``(C, Ho, Wo)``).
    """
    where = "adaptive_avg_pool2d"
    impl = resolve(impl, where)
    C.check_tensor(x, where)
    C.check_rank(x, (3, 4), where, layout="(N, C, H, W) or (C, H, W)")
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"{where}: expected non-empty spatial dimensions, got {C.shape_str(x)}")
    size = _adaptive_size(output_size, tuple(x.shape[-2:]), where)

    if impl == "fast":
        return F.adaptive_avg_pool2d(x, size)
    return ExplicitAdaptiveAvgPool2d.apply(x, size)


class ExplicitAdaptiveAvgPool2d(torch.autograd.Function):
    """``adaptive_avg_pool2d``'s explicit formulation, ``Y = A_h X A_w^T``, with its backward
    written out.

    ``A_h`` ``(Ho, H)`` and ``A_w`` ``(Wo, W)`` are constant averaging matrices (row ``i`` holds
    ``1 / len`` over window ``i``), so ``Y`` is linear in ``X`` and

        dX = A_h^T dY A_w

    each output's gradient shared equally among its window's pixels (a pixel in two overlapping
    windows receives from both). Nothing is saved but the sizes: the matrices are rebuilt.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, size):
        rows = _averaging_matrix(size[0], x.shape[-2], x)     # (Ho, H)
        cols = _averaging_matrix(size[1], x.shape[-1], x)     # (Wo, W)
        return rows @ x @ cols.T

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, size = inputs
        ctx.sizes = tuple(x.shape[-2:]), size

    @staticmethod
    def backward(ctx, dy):
        (h, w), (ho, wo) = ctx.sizes
        rows = _averaging_matrix(ho, h, dy)
        cols = _averaging_matrix(wo, w, dy)
        return rows.T @ dy @ cols, None
