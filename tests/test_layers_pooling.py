"""max_pool2d and adaptive_avg_pool2d: both formulations equal torch (outputs, gradients, ties)."""
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.func import grad

import layers
from layouts import make_input

# Max-pool output is a selection (exact); its gradient sums at most kh*kw <= 9 cotangents per
# input, so float64 agrees to ~1e-15. Adaptive average sums up to H = 9 values: same reasoning.
# float32: eps 6e-8 times <= 9 terms of magnitude <= ~10 -> ~5e-6; 1e-5 is safe.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


common = dict(
    n=st.integers(0, 2), c=st.integers(1, 3),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    layout=st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"]),
    seed=st.integers(0, 2**31 - 1), impl=st.sampled_from(["fast", "explicit"]))


def check_against(f_ours, f_ref, x, seed, dtype):
    """Outputs and input gradients (random cotangent) of ours and torch agree."""
    ref_x = x.detach().clone().requires_grad_(True)
    ref_y = f_ref(ref_x)
    cotangent = torch.randn(ref_y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    (ref_y * cotangent).sum().backward()
    y = f_ours(x)
    assert y.shape == ref_y.shape
    torch.testing.assert_close(y, ref_y.detach(), **TOL[dtype])
    g_x = grad(lambda x: (f_ours(x) * cotangent).sum())(x)
    torch.testing.assert_close(g_x, ref_x.grad, **TOL[dtype])


def stride_pair(stride, kernel):
    if stride is None:
        return kernel
    return stride if isinstance(stride, tuple) else (stride, stride)


@st.composite
def pool_hyper(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = draw(st.one_of(st.none(), st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    spatial = [draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), d * (k - 1) + 6))
               for k, p, d in zip(kernel, padding, dilation)]
    # torch gives -inf for a window of padding only and its backward corrupts memory; we raise
    # (tested below), so such cases are not parity cases.
    for size, k, p, d, s in zip(spatial, kernel, padding, dilation, stride_pair(stride, kernel)):
        assume(all(any(0 <= i * s - p + u * d < size for u in range(k)) for i in range(p)))
    # Exercise the int forms too when both axes agree.
    as_int = lambda t: t[0] if t[0] == t[1] and draw(st.booleans()) else t   # noqa: E731
    return dict(kernel_size=as_int(kernel), stride=stride, padding=as_int(padding),
                dilation=as_int(dilation), ceil_mode=draw(st.booleans())), spatial


@settings(deadline=None, max_examples=60)
@given(hs=pool_hyper(), values=st.sampled_from(["normal", "ints"]), **common)
def test_max_pool2d_output_and_gradient_equal_torch_including_ties(hs, values, n, c, dtype, layout, seed, impl):
    hyper, spatial = hs
    shape = ((n,) if n else ()) + (c, *spatial)
    x = make_input(shape, seed, dtype, layout, values)
    check_against(lambda x: layers.max_pool2d(x, **hyper, impl=impl),
                  lambda x: torch.nn.MaxPool2d(**hyper)(x), x, seed, dtype)


def test_max_pool2d_tie_sends_gradient_to_first_maximum_in_row_major_order():
    x = torch.tensor([[[[1.0, 3.0], [3.0, 3.0]]]], dtype=torch.float64)
    for impl in ("fast", "explicit"):
        g = grad(lambda x: layers.max_pool2d(x, 2, impl=impl).sum())(x)
        assert torch.equal(g, torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64))


@st.composite
def adaptive_case(draw):
    spatial = [draw(st.integers(1, 9)), draw(st.integers(1, 9))]
    out = draw(st.one_of(st.integers(1, 10), st.tuples(st.one_of(st.none(), st.integers(1, 10)),
                                                       st.one_of(st.none(), st.integers(1, 10)))))
    return spatial, out


@settings(deadline=None, max_examples=50)
@given(case=adaptive_case(), **common)
def test_adaptive_avg_pool2d_output_and_gradient_equal_torch(case, n, c, dtype, layout, seed, impl):
    spatial, out = case
    shape = ((n,) if n else ()) + (c, *spatial)
    x = make_input(shape, seed, dtype, layout, "normal")
    check_against(lambda x: layers.adaptive_avg_pool2d(x, out, impl=impl),
                  lambda x: torch.nn.AdaptiveAvgPool2d(out)(x), x, seed, dtype)


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
    with pytest.raises(ValueError, match=r"adaptive_avg_pool2d: expected 3-D or 4-D input .*got \(4,\)"):
        layers.adaptive_avg_pool2d(torch.zeros(4), 1)
