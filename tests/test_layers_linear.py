"""linear: both formulations equal torch.nn.Linear (output and gradients); bad input fails."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad

import layers

# float64: dot products of at most 8 terms; ~1e-15 relative, 1e-12 is generous.
# float32: eps 6e-8 times <= 8 O(1) terms -> ~1e-6; allow 1e-5.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@settings(deadline=None, max_examples=50)
@given(lead=st.lists(st.integers(1, 3), max_size=3), fan_in=st.integers(1, 8), fan_out=st.integers(1, 8),
       bias=st.booleans(), layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       zeros=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]),
       seed=st.integers(0, 2**31 - 1), impl=st.sampled_from(["fast", "explicit"]))
def test_linear_output_and_gradients_equal_torch_linear(lead, fan_in, fan_out, bias, layout, zeros,
                                                        dtype, seed, impl):
    with torch.random.fork_rng(devices=[]):    # seeded module init, global RNG untouched
        torch.manual_seed(seed)
        module = torch.nn.Linear(fan_in, fan_out, bias=bias, dtype=dtype)
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) + (fan_in,)
    x = torch.randn(shape, generator=g, dtype=dtype)
    if zeros:
        x = x * (torch.rand(shape, generator=g) < 0.5)
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        big = torch.zeros(shape[:-1] + (2 * fan_in,), dtype=dtype)
        big[..., ::2] = x
        x = big[..., ::2]
    ref_x = x.detach().clone().requires_grad_(True)
    ref_p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref_y = functional_call(module, ref_p, (ref_x,))
    cot = torch.randn(ref_y.shape, generator=g, dtype=dtype)
    (ref_y * cot).sum().backward()
    f = lambda p, x: layers.linear(p, x, impl=impl)   # noqa: E731
    torch.testing.assert_close(f(params, x), ref_y.detach(), **TOL[dtype])
    g_p, g_x = grad(lambda p, x: (f(p, x) * cot).sum(), argnums=(0, 1))(params, x)
    torch.testing.assert_close(g_x, ref_x.grad, **TOL[dtype])
    for k in ref_p:
        torch.testing.assert_close(g_p[k], ref_p[k].grad, **TOL[dtype])


def test_linear_rejects_feature_mismatch():
    with pytest.raises(ValueError, match=r"linear: expected input with last dimension 3 \(weight is "
                                         r"\(4, 3\)\), got \(2, 5\)"):
        layers.linear({"weight": torch.zeros(4, 3)}, torch.zeros(2, 5))


def test_linear_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"linear: expected 2-D weight \(out, in\), got \(4, 3, 1\)"):
        layers.linear({"weight": torch.zeros(4, 3, 1)}, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"linear: expected input with last dimension 3 .*got \(\)"):
        layers.linear({"weight": torch.zeros(4, 3)}, torch.zeros(()))


def test_linear_rejects_bias_of_wrong_length():
    with pytest.raises(ValueError, match=r"linear: expected bias of shape \(4,\) \(weight is \(4, 3\)\), "
                                         r"got \(1,\)"):
        layers.linear({"weight": torch.zeros(4, 3), "bias": torch.zeros(1)}, torch.zeros(2, 3))


def test_linear_rejects_wrong_param_keys():
    with pytest.raises(ValueError, match=r"linear: expected params with keys .*unknown \['w'\]"):
        layers.linear({"weight": torch.zeros(4, 3), "w": torch.zeros(4)}, torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"linear: expected params to be a dict, got tuple"):
        layers.linear((torch.zeros(4, 3),), torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"linear: expected input to be a torch.Tensor, got list"):
        layers.linear({"weight": torch.zeros(4, 3)}, [1.0, 2.0, 3.0])
