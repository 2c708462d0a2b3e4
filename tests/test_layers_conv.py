"""conv2d: both formulations equal torch.nn.Conv2d (outputs and every gradient); bad input fails."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad

import layers
from layouts import make_input as _make_input


def make_input(shape, seed, dtype, layout, values):
    """Inputs with ints in [-2, 2]: exact zeros and repeated values."""
    return _make_input(shape, seed, dtype, layout, values, int_range=(-2, 3))


pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

# float64: the two formulations sum at most C/G*kh*kw = 6*3*3 = 54 products of O(1) numbers in a
# different order than ATen, so agreement is ~1e-14; 1e-10 leaves room without hiding a bug.
# float32: eps 6e-8 times up to 54 terms of magnitude up to ~10 -> ~3e-5 worst case; use 1e-4.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = draw(st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2))))
    padding = draw(st.one_of(st.just("same"), st.just("valid"), st.integers(0, 2),
                             st.tuples(st.integers(0, 2), st.integers(0, 2))))
    stride = 1 if padding == "same" else draw(
        st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    d2 = dilation if isinstance(dilation, tuple) else (dilation, dilation)
    if isinstance(padding, str):        # "same" always fits; "valid" pads nothing
        p2 = (0, 0) if padding == "valid" else None
    else:
        p2 = padding if isinstance(padding, tuple) else (padding, padding)
    spatial = []
    for axis, (k, d) in enumerate(zip(kernel, d2)):
        need = 1 if p2 is None else max(1, d * (k - 1) + 1 - 2 * p2[axis])
        spatial.append(draw(st.integers(need, need + 4)))
    n = draw(st.integers(0, 3))                     # 0: unbatched (C, H, W)
    shape = ((n,) if n else ()) + (cin, *spatial)
    return dict(cin=cin, cout=cout, kernel=kernel, stride=stride, padding=padding,
                dilation=dilation, groups=groups, shape=shape, bias=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"])),
                values=draw(st.sampled_from(["normal", "ints"])),
                seed=draw(st.integers(0, 2**31 - 1)), impl=draw(st.sampled_from(["fast", "explicit"])))


def torch_conv(case):
    return torch.nn.Conv2d(case["cin"], case["cout"], case["kernel"], stride=case["stride"],
                           padding=case["padding"], dilation=case["dilation"],
                           groups=case["groups"], bias=case["bias"], dtype=case["dtype"])


def hyper(case):
    return {k: case[k] for k in ("stride", "padding", "dilation", "groups")}


@settings(deadline=None, max_examples=60)
@given(conv_cases())
def test_conv2d_output_and_gradients_equal_torch_conv2d(case):
    with torch.random.fork_rng(devices=[]):              # seeded module init, global RNG untouched
        torch.manual_seed(case["seed"])
        module = torch_conv(case)
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    x = make_input(case["shape"], case["seed"], case["dtype"], case["layout"], case["values"])
    ref_x = x.detach().clone().requires_grad_(True)
    ref_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref_y = functional_call(module, ref_params, (ref_x,))
    g = torch.Generator().manual_seed(case["seed"] + 1)
    cotangent = torch.randn(ref_y.shape, generator=g, dtype=case["dtype"])
    (ref_y * cotangent).sum().backward()

    def f(p, x):
        return layers.conv2d(p, x, impl=case["impl"], **hyper(case))

    y = f(params, x)
    assert y.shape == ref_y.shape
    torch.testing.assert_close(y, ref_y.detach(), **TOL[case["dtype"]])
    g_params, g_x = grad(lambda p, x: (f(p, x) * cotangent).sum(), argnums=(0, 1))(params, x)
    torch.testing.assert_close(g_x, ref_x.grad, **TOL[case["dtype"]])
    assert set(g_params) == set(ref_params)
    for k in ref_params:
        torch.testing.assert_close(g_params[k], ref_params[k].grad, **TOL[case["dtype"]])


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
