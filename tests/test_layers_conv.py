"""conv2d: both formulations equal torch.nn.Conv2d (outputs and every gradient); bad input fails."""
import re

import pytest
import torch
from torch.func import vjp

import layers
from layers.testing import check_layer, conv2d_cases, fixed_tolerance

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

# float64: the two formulations sum at most C/G*kh*kw = 6*3*3 = 54 products of O(1) numbers in a
# different order than ATen, so agreement is ~1e-14; 1e-10 leaves room without hiding a bug.
# float32: eps 6e-8 times up to 54 terms of magnitude up to ~10 -> ~3e-5 worst case; use 1e-4.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def test_conv2d_output_gradients_purity_vmap_and_backward_equal_torch_conv2d():
    """Both formulations (drawn), every stride / padding / dilation / groups form, float64 and
    float32, four memory layouts, ints with ties: output, input and parameter gradients, purity,
    vmap over the batch, and that impl="explicit" runs ExplicitConv2d's backward (fast: none)."""
    check_layer(layers.conv2d, conv2d_cases(), max_examples=60, tolerance=fixed_tolerance(TOL))


def test_conv2d_explicit_im2col_matches_f_unfold_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    cols, (ho, wo) = layers.conv.im2col(x, (3, 2), (2, 1), (1, 2), ((1, 1), (2, 2)))
    ref = torch.nn.functional.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 2), stride=(2, 1))
    assert cols.shape == ref.shape and ho * wo == ref.shape[-1]
    assert torch.equal(cols, ref)


def _p(o=4, i=3, k=3, bias=True):
    p = {"weight": torch.zeros(o, i, k, k)}
    if bias:
        p["bias"] = torch.zeros(o)
    return p


def test_conv2d_rejects_channel_mismatch():
    with pytest.raises(ValueError, match=r"conv2d: expected input with 3 channels \(weight is "
                                         r"\(4, 3, 3, 3\), groups=1\), got \(8, 4, 32, 32\)"):
        layers.conv2d(_p(), torch.zeros(8, 4, 32, 32))


def test_conv2d_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"conv2d: expected 3-D or 4-D input .*got \(8, 3\)"):
        layers.conv2d(_p(), torch.zeros(8, 3))
    with pytest.raises(ValueError, match=r"conv2d: expected 4-D weight .*got \(4, 3, 3\)"):
        layers.conv2d({"weight": torch.zeros(4, 3, 3)}, torch.zeros(1, 3, 5, 5))


def test_conv2d_rejects_kernel_larger_than_padded_input():
    with pytest.raises(ValueError, match=r"conv2d: expected padded input height >= dilated kernel "
                                         r"height 5 .*got \(1, 3, 3, 9\)"):
        layers.conv2d(_p(), torch.zeros(1, 3, 3, 9), dilation=2)
    layers.conv2d(_p(), torch.zeros(1, 3, 3, 9), dilation=2, padding=1)     # fits once padded


def test_conv2d_rejects_groups_not_dividing_channels():
    with pytest.raises(ValueError, match=r"conv2d: expected input channels divisible by groups=2, "
                                         r"got \(1, 3, 5, 5\)"):
        layers.conv2d(_p(4, 1), torch.zeros(1, 3, 5, 5), groups=2)
    with pytest.raises(ValueError, match=r"conv2d: expected output channels divisible by groups=2, "
                                         r"got weight \(3, 2, 3, 3\)"):
        layers.conv2d(_p(3, 2), torch.zeros(1, 4, 5, 5), groups=2)


def test_conv2d_rejects_bias_of_wrong_length():
    p = _p()
    p["bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"conv2d: expected bias of shape \(4,\) .*got \(5,\)"):
        layers.conv2d(p, torch.zeros(1, 3, 5, 5))


def test_conv2d_rejects_wrong_param_keys():
    with pytest.raises(ValueError, match=r"conv2d: expected params with keys .*unknown \['b'\]"):
        layers.conv2d({"weight": torch.zeros(4, 3, 3, 3), "b": torch.zeros(4)}, torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"conv2d: expected params with keys .*missing \['weight'\]"):
        layers.conv2d({"bias": torch.zeros(4)}, torch.zeros(1, 3, 5, 5))


def test_conv2d_rejects_bad_hyperparameters():
    x = torch.zeros(1, 3, 5, 5)
    with pytest.raises(ValueError, match=r"conv2d: expected stride 1 with padding='same'"):
        layers.conv2d(_p(), x, stride=2, padding="same")
    with pytest.raises(ValueError, match=r"conv2d: expected padding to be .*got 'full'"):
        layers.conv2d(_p(), x, padding="full")
    with pytest.raises(ValueError, match=r"conv2d: expected stride >= 1, got 0"):
        layers.conv2d(_p(), x, stride=0)
    with pytest.raises(TypeError, match=r"conv2d: expected dilation to be an int or a pair"):
        layers.conv2d(_p(), x, dilation=1.5)
    with pytest.raises(ValueError, match=r"conv2d: expected impl to be one of"):
        layers.conv2d(_p(), x, impl="slow")


def test_explicit_conv2d_backward_keeps_the_inputs_device():
    # col2im builds its pixel indices on the gradient's device: made on the CPU they would meet a
    # CUDA (here meta) gradient and fail. Meta tensors carry shapes and devices, no values.
    x = torch.randn(2, 4, 7, 6, device="meta")
    params = {"weight": torch.randn(6, 2, 3, 2, device="meta"), "bias": torch.randn(6, device="meta")}
    y, pull = vjp(lambda p, x: layers.conv2d(p, x, stride=(2, 1), padding=1, dilation=(1, 2), groups=2,
                                             impl="explicit"), params, x)
    dp, dx = pull(torch.randn(y.shape, device="meta"))
    assert y.device.type == dx.device.type == dp["weight"].device.type == "meta"
    assert dx.shape == x.shape and dp["weight"].shape == params["weight"].shape


@pytest.mark.parametrize("autocast_dtype, bias_dtype", [(torch.bfloat16, torch.float16),
                                                         (torch.float16, torch.bfloat16), (torch.bfloat16, None)])
def test_explicit_conv2d_backward_runs_in_the_forwards_autocast_and_returns_each_inputs_dtype(autocast_dtype,
                                                                                              bias_dtype):
    # ExplicitConv2d re-enters the forward's autocast in its backward (called here outside it), so
    # dX = col2im(W^T dY) and dW = sum_n dY X^T are computed, and rounded, in the low precision:
    # every gradient value is one the autocast dtype holds exactly, then cast to its input's dtype.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 5, generator=g).requires_grad_(True)
    w = torch.randn(6, 2, 3, 3, generator=g).requires_grad_(True)
    b = None if bias_dtype is None else torch.randn(6, generator=g).to(bias_dtype).requires_grad_(True)
    params = {"weight": w} if b is None else {"weight": w, "bias": b}
    with torch.autocast("cpu", dtype=autocast_dtype):
        y = layers.conv2d(params, x, padding=1, dilation=(1, 2), groups=2, impl="explicit")
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    inputs = (x, w) if b is None else (x, w, b)
    grads = torch.autograd.grad(y, inputs, dy)
    assert [t.dtype for t in grads] == [t.dtype for t in inputs]
    for got in grads[:2]:
        assert torch.equal(got, got.to(autocast_dtype).to(got.dtype))
    # ... and they are the float32 gradients up to that rounding: 2 * 3 * 3 = 18 products (dX) or
    # 2 * 6 * 5 = 60 (dW) of O(1) numbers, each rounded to 8 (bfloat16) or 11 (float16) bits.
    want = torch.autograd.grad(layers.conv2d({"weight": w}, x, padding=1, dilation=(1, 2), groups=2),
                               (x, w), dy.float())
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=0.1, atol=0.3)
    if b is not None:   # db = sum dY, in the bias's dtype
        assert torch.equal(grads[2], dy.sum(dim=(0, 2, 3)).to(b.dtype))


def _bias(length):
    return {"weight": torch.zeros(4, 3, 3, 3), "bias": torch.zeros(length)}


# Each refusal's whole message: errors name the layer, what was expected and what came, and the
# message is part of conv2d's interface. Unbatched inputs read H and W from the last two axes.
REFUSALS = [
    (_p(), torch.zeros(1, 3, 5, 5), dict(padding=-1), "conv2d: expected padding >= 0, got -1"),
    (_p(), torch.zeros(1, 3, 5, 5), dict(padding=(1, -2)), "conv2d: expected padding >= 0, got (1, -2)"),
    ({"weight": torch.zeros(4, 3, 3)}, torch.zeros(1, 3, 5, 5), {},
     "conv2d: expected 4-D weight (O, C/groups, kh, kw), got (4, 3, 3)"),
    (_p(), torch.zeros(8, 3), {}, "conv2d: expected 3-D or 4-D input (N, C, H, W) or (C, H, W), got (8, 3)"),
    (_bias(5), torch.zeros(1, 3, 5, 5), {},
     "conv2d: expected bias of shape (4,) (weight is (4, 3, 3, 3)), got (5,)"),
    (_p(), torch.zeros(1, 3, 5, 5), dict(groups=0), "conv2d: expected groups to be a positive int, got 0"),
    (_p(), torch.zeros(1, 3, 9, 3), dict(dilation=2),
     "conv2d: expected padded input width >= dilated kernel width 5 (weight is (4, 3, 3, 3), "
     "dilation=(2, 2), padding=0), got (1, 3, 9, 3)"),
    (_p(), torch.zeros(3, 3, 9), dict(dilation=2),
     "conv2d: expected padded input height >= dilated kernel height 5 (weight is (4, 3, 3, 3), "
     "dilation=(2, 2), padding=0), got (3, 3, 9)"),
    (_p(), torch.zeros(1, 3, 3, 9), dict(dilation=(2, 1)),
     "conv2d: expected padded input height >= dilated kernel height 5 (weight is (4, 3, 3, 3), "
     "dilation=(2, 1), padding=0), got (1, 3, 3, 9)"),
]


@pytest.mark.parametrize("impl", ["fast", "explicit"])
@pytest.mark.parametrize("params, x, kwargs, message", REFUSALS)
def test_conv2d_refusal_messages_name_the_layer_what_was_expected_and_what_came(impl, params, x, kwargs,
                                                                                message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        layers.conv2d(params, x, impl=impl, **kwargs)


@pytest.mark.parametrize("impl", ["fast", "explicit"])
@pytest.mark.parametrize("shape, dilation", [((3, 5, 3), (2, 1)), ((1, 3, 3, 5), (1, 2)),
                                             ((3, 3, 5), (1, 2))])
def test_conv2d_accepts_a_kernel_that_just_fits_each_axis_under_its_own_dilation(impl, shape, dilation):
    # The dilated 3x3 kernel spans exactly the input along each axis: one output pixel, as torch's.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    params = {"weight": torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64),
              "bias": torch.randn(4, generator=g, dtype=torch.float64)}
    want = torch.nn.functional.conv2d(x, params["weight"], params["bias"], dilation=dilation)
    torch.testing.assert_close(layers.conv2d(params, x, dilation=dilation, impl=impl), want, **TOL[torch.float64])
