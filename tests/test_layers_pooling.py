"""max_pool2d and adaptive_avg_pool2d: both formulations equal torch (outputs, gradients, ties)."""
import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.func import grad, vjp

import layers
from layers import pooling
from layers.testing import adaptive_avg_pool2d_cases, check_layer, fixed_tolerance, max_pool2d_cases

# Max-pool output is a selection (exact); its gradient sums at most kh*kw <= 9 cotangents per
# input, so float64 agrees to ~1e-15. Adaptive average sums up to H = 9 values: same reasoning.
# float32: eps 6e-8 times <= 9 terms of magnitude <= ~10 -> ~5e-6; 1e-5 is safe.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def test_max_pool2d_output_gradient_purity_vmap_and_backward_equal_torch_including_ties():
    """Kernel, stride, padding, dilation, ceil mode (int forms too), ints with ties, four
    layouts, both formulations: output, input gradient (ties to the first maximum), purity,
    vmap over the batch, and which backward ran."""
    check_layer(lambda params, x, **kw: layers.max_pool2d(x, **kw), max_pool2d_cases(),
                max_examples=60, tolerance=fixed_tolerance(TOL))


def test_max_pool2d_tie_sends_gradient_to_first_maximum_in_row_major_order():
    x = torch.tensor([[[[1.0, 3.0], [3.0, 3.0]]]], dtype=torch.float64)
    for impl in ("fast", "explicit"):
        g = grad(lambda x: layers.max_pool2d(x, 2, impl=impl).sum())(x)
        assert torch.equal(g, torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64))


def test_adaptive_avg_pool2d_output_gradient_purity_vmap_and_backward_equal_torch():
    check_layer(lambda params, x, **kw: layers.adaptive_avg_pool2d(x, **kw), adaptive_avg_pool2d_cases(),
                max_examples=50, values=("normal",), tolerance=fixed_tolerance(TOL))


def test_adaptive_avg_pool2d_to_one_is_the_spatial_mean():
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for impl in ("fast", "explicit"):
        y = layers.adaptive_avg_pool2d(x, 1, impl=impl)
        torch.testing.assert_close(y, x.mean(dim=(2, 3), keepdim=True), rtol=1e-14, atol=1e-14)


def test_max_pool2d_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"max_pool2d: expected 3-D or 4-D input .*got \(2, 3\)"):
        layers.max_pool2d(torch.zeros(2, 3), 2)


def test_max_pool2d_rejects_kernel_larger_than_padded_input():
    with pytest.raises(ValueError, match=r"max_pool2d: expected padded input width >= dilated kernel "
                                         r"width 3 .*got \(1, 1, 4, 2\)"):
        layers.max_pool2d(torch.zeros(1, 1, 4, 2), 3)


def test_max_pool2d_rejects_a_window_of_padding_only():
    # Height 1, kernel 2 dilated by 2, padding 1: the first window's taps sit at rows -1 and 1.
    with pytest.raises(ValueError, match=r"max_pool2d: expected every window to overlap the input, "
                                         r"got a window of padding only along the height"):
        layers.max_pool2d(torch.zeros(1, 3, 1, 5), (2, 3), padding=(1, 0), dilation=(2, 1), ceil_mode=True)


def test_max_pool2d_rejects_padding_over_half_the_kernel():
    with pytest.raises(ValueError, match=r"max_pool2d: expected padding at most half of "
                                         r"kernel_size=\(2, 2\), got padding=2"):
        layers.max_pool2d(torch.zeros(1, 1, 8, 8), 2, padding=2)


def test_max_pool2d_rejects_bad_hyperparameters():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"max_pool2d: expected stride >= 1, got 0"):
        layers.max_pool2d(x, 2, stride=0)
    with pytest.raises(TypeError, match=r"max_pool2d: expected kernel_size to be an int or a pair"):
        layers.max_pool2d(x, (2, 2, 2))
    with pytest.raises(TypeError, match=r"max_pool2d: expected ceil_mode to be a bool, got 1"):
        layers.max_pool2d(x, 2, ceil_mode=1)


def test_adaptive_avg_pool2d_rejects_bad_output_size_and_rank():
    with pytest.raises(ValueError, match=r"adaptive_avg_pool2d: expected output_size >= 1, got 0"):
        layers.adaptive_avg_pool2d(torch.zeros(1, 1, 4, 4), 0)
    with pytest.raises(TypeError, match=r"adaptive_avg_pool2d: expected output_size to be an int"):
        layers.adaptive_avg_pool2d(torch.zeros(1, 1, 4, 4), (1, 2, 3))
    with pytest.raises(ValueError, match=r"^adaptive_avg_pool2d: expected 3-D or 4-D input \(N, C, H, W\) or "
                                         r"\(C, H, W\), got \(4,\)$"):
        layers.adaptive_avg_pool2d(torch.zeros(4), 1)
    with pytest.raises(TypeError, match=r"^adaptive_avg_pool2d: expected input to be a torch.Tensor, got list$"):
        layers.adaptive_avg_pool2d([[[1.0]]], 1)
    # an empty height or width, batched or not, in either formulation (torch's kernels would divide by 0)
    for shape in ((1, 1, 0, 4), (1, 1, 4, 0), (1, 0, 3), (1, 3, 0), (2, 1, 0, 0)):
        for impl in ("fast", "explicit"):
            with pytest.raises(ValueError, match=r"^adaptive_avg_pool2d: expected non-empty spatial dimensions, "
                                                 rf"got {re.escape(str(shape))}$"):
                layers.adaptive_avg_pool2d(torch.zeros(shape), 1, impl=impl)
    assert layers.adaptive_avg_pool2d(torch.zeros(0, 0, 1, 1), 1).shape == (0, 0, 1, 1)   # empty N, C: fine


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_adaptive_avg_pool2d_keeps_the_inputs_device(impl):
    # the explicit averaging matrices are built on the input's device, not the CPU
    x = torch.randn(1, 2, 5, 7, device="meta")
    assert layers.adaptive_avg_pool2d(x, (2, 3), impl=impl).device.type == "meta"


@pytest.mark.parametrize("shape", [(1, 8, 7, 5), (8, 7, 5)])
def test_explicit_max_pool2d_ceil_mode_equals_torch_when_channels_outnumber_rows_and_columns(shape):
    # Ceil mode adds a last window that reaches past the input (rows 6-7 of 0..6, columns 4-5 of
    # 0..4), so the explicit form pads each axis on the right by an amount computed from that
    # axis's length: more channels than rows, or a height other than the width, must not change
    # it. The checker's cases (layers.testing.max_pool2d_cases) keep C <= 3.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y, pull = vjp(lambda x: layers.max_pool2d(x, 2, ceil_mode=True, impl="explicit"), x)
    want, pull_want = vjp(lambda x: F.max_pool2d(x, 2, ceil_mode=True), x)
    assert y.shape == want.shape == shape[:-2] + (4, 3)
    cotangent = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # A selection, and a sum of at most one cotangent per input (stride = kernel): exact.
    assert torch.equal(y, want) and torch.equal(pull(cotangent)[0], pull_want(cotangent)[0])


def test_explicit_max_pool2d_backward_keeps_the_inputs_device():
    # The backward's row and column indices are built on dy's device: made on the CPU they
    # would meet a CUDA (here meta) dy and fail. Meta tensors carry shapes and devices, no values.
    x = torch.randn(2, 3, 5, 6, device="meta")
    y, pull = vjp(lambda x: layers.max_pool2d(x, 2, ceil_mode=True, impl="explicit"), x)
    dx, = pull(torch.randn(y.shape, device="meta"))
    assert y.device.type == dx.device.type == "meta" and dx.shape == x.shape


@settings(max_examples=30)
@given(k=st.integers(1, 4), s=st.integers(1, 4), d=st.integers(1, 3), size=st.integers(1, 12),
       ceil_mode=st.booleans(), data=st.data())
def test_explicit_max_pool2d_right_padding_is_the_least_that_fits_every_window(k, s, d, size, ceil_mode, data):
    # ExplicitMaxPool2d pads by _right_padding on the right (bottom): it must reach the end of the
    # last of the `out` windows torch counts, and no further (more only wastes memory: the forward
    # and backward would still agree with torch).
    p = data.draw(st.integers(0, k // 2), label="padding")
    assume(d * (k - 1) + 1 <= size + 2 * p)
    out = pooling._pool_out_size(size, k, s, p, d, ceil_mode)
    right = pooling._right_padding(size, k, s, p, d, out)
    last_window_end = (out - 1) * s + d * (k - 1) + 1          # in padded coordinates
    assert right >= p and last_window_end <= p + size + right
    assert right == p or last_window_end == p + size + right


def test_max_pool2d_refusals_name_the_layer_and_what_came():
    # Refusal messages are part of the interface: each names max_pool2d, what it expected and
    # what it got (as the layout and the argument's name).
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"^max_pool2d: expected 3-D or 4-D input \(N, C, H, W\) or "
                                         r"\(C, H, W\), got \(2, 3\)$"):
        layers.max_pool2d(torch.zeros(2, 3), 2)
    with pytest.raises(TypeError, match=r"^max_pool2d: expected input to be a torch.Tensor, got list$"):
        layers.max_pool2d([[[1.0]]], 1)
    with pytest.raises(ValueError, match=r"^max_pool2d: expected impl to be one of \('fast', 'explicit'\), "
                                         r"got 'slow'$"):
        layers.max_pool2d(x, 2, impl="slow")
    with pytest.raises(ValueError, match=r"^max_pool2d: expected padding >= 0, got -1$"):
        layers.max_pool2d(x, 2, padding=-1)
    with pytest.raises(TypeError, match=r"^max_pool2d: expected padding to be an int or a pair of ints, "
                                        r"got 1.0$"):
        layers.max_pool2d(x, 2, padding=1.0)
    with pytest.raises(ValueError, match=r"^max_pool2d: expected dilation >= 1, got \(1, 0\)$"):
        layers.max_pool2d(x, 2, dilation=(1, 0))
    with pytest.raises(TypeError, match=r"^max_pool2d: expected dilation to be an int or a pair of ints, "
                                        r"got '2'$"):
        layers.max_pool2d(x, 2, dilation="2")


@pytest.mark.parametrize("padding", [(2, 0), (0, 2)])
def test_max_pool2d_refuses_padding_over_half_the_kernel_along_either_axis(padding):
    # Each axis is checked on its own: one axis over the limit is enough to refuse (torch does too).
    with pytest.raises(ValueError, match=r"max_pool2d: expected padding at most half of "
                                         rf"kernel_size=\(2, 2\), got padding={re.escape(str(padding))}"):
        layers.max_pool2d(torch.zeros(1, 1, 8, 8), 2, padding=padding)
    layers.max_pool2d(torch.zeros(1, 1, 8, 8), 2, padding=tuple(p // 2 for p in padding))   # at the limit


def test_max_pool2d_counts_the_padding_on_both_sides_when_the_kernel_must_fit():
    # Height 1 padded by 1 on each side is 3 rows; kernel 2 dilated by 3 spans 4: refused, as torch
    # (which would compute an output height of 0). Height 3 fits (height 2 would leave the first
    # window's taps at rows -1 and 2, padding only).
    with pytest.raises(ValueError, match=r"max_pool2d: expected padded input height >= dilated kernel "
                                         r"height 4 \(kernel_size=2, dilation=3, padding=1\), "
                                         r"got \(1, 1, 1, 5\)"):
        layers.max_pool2d(torch.zeros(1, 1, 1, 5), 2, padding=1, dilation=3)
    x = torch.randn(1, 1, 3, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layers.max_pool2d(x, 2, padding=1, dilation=3),
                       F.max_pool2d(x, 2, padding=1, dilation=3))


def test_padding_only_window_finds_every_window_of_padding_only_that_torch_would_compute():
    # pooling._padding_only_window looks only at the windows that start in the leading padding.
    # Against a look at every one of torch's windows, over every small geometry torch accepts
    # (padding up to half the *dilated* kernel, torch's own limit, wider than max_pool2d's):
    # there a later window can be padding only while the first is not (size 2, kernel 2,
    # stride 1, padding 2, dilation 3: window 1's taps sit at -1 and 2). Within max_pool2d's own
    # limit (padding <= kernel / 2) only the first window can be padding only, so there the loop
    # over later windows is never decisive.
    for size, k, s, p, d, ceil_mode in itertools.product(range(6), range(1, 5), range(1, 4), range(5),
                                                         range(1, 5), (False, True)):
        if 2 * p > d * (k - 1) + 1 or d * (k - 1) + 1 > size + 2 * p:
            continue
        out = pooling._pool_out_size(size, k, s, p, d, ceil_mode)
        want = any(not any(0 <= i * s - p + u * d < size for u in range(k)) for i in range(out))
        assert pooling._padding_only_window(size, k, s, p, d, out) == want, (size, k, s, p, d, ceil_mode)
