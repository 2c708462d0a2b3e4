"""relu, flatten, log_softmax: both formulations equal torch (values and gradients)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad

import layers

IMPLS = st.sampled_from(["fast", "explicit"])
DTYPES = st.sampled_from([torch.float64, torch.float32])
# log_softmax: logsumexp over <= 6 terms of magnitude <= ~15 after the shift; float64 ~1e-15,
# float32 eps 6e-8 times magnitude ~15 -> ~1e-6, so 1e-5.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def values(shape, seed, dtype, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "ints":                                   # exact zeros and ties
        return torch.randint(-2, 3, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g, dtype=dtype) * 5


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


def check(f_ours, f_ref, x, dtype, seed):
    ref_x = x.detach().clone().requires_grad_(True)
    ref_y = f_ref(ref_x)
    cot = torch.randn(ref_y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    (ref_y * cot).sum().backward()
    y = f_ours(x)
    assert y.shape == ref_y.shape
    torch.testing.assert_close(y, ref_y.detach(), **TOL[dtype])
    torch.testing.assert_close(grad(lambda x: (f_ours(x) * cot).sum())(x), ref_x.grad, **TOL[dtype])


@settings(deadline=None, max_examples=40)
@given(shape=shapes, kind=st.sampled_from(["normal", "ints"]), dtype=DTYPES,
       seed=st.integers(0, 2**31 - 1), impl=IMPLS)
def test_relu_value_and_gradient_equal_torch_relu(shape, kind, dtype, seed, impl):
    x = values(shape, seed, dtype, kind)
    check(lambda x: layers.relu(x, impl=impl), torch.relu, x, dtype, seed)


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_relu_gradient_is_zero_at_zero_and_nan_propagates(impl):
    x = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    assert torch.equal(grad(lambda x: layers.relu(x, impl=impl).sum())(x), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    y = layers.relu(torch.tensor([float("nan"), float("-inf")]), impl=impl)
    assert torch.isnan(y[0]) and y[1] == 0


@settings(deadline=None, max_examples=40)
@given(shape=shapes, data=st.data(), impl=IMPLS, seed=st.integers(0, 2**31 - 1))
def test_flatten_equals_torch_flatten(shape, data, impl, seed):
    rank = len(shape)
    start = data.draw(st.integers(-rank, rank - 1))
    end = data.draw(st.integers(start % rank, rank - 1)) - data.draw(st.sampled_from([0, rank]))
    x = values(shape, seed, torch.float64, "normal").transpose(0, -1)       # non-contiguous
    check(lambda x: layers.flatten(x, start, end, impl=impl), lambda x: torch.flatten(x, start, end),
          x, torch.float64, seed)


@settings(deadline=None, max_examples=40)
@given(shape=shapes, data=st.data(), kind=st.sampled_from(["normal", "ints"]), dtype=DTYPES,
       seed=st.integers(0, 2**31 - 1), impl=IMPLS)
def test_log_softmax_value_and_gradient_equal_torch(shape, data, kind, dtype, seed, impl):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = values(shape, seed, dtype, kind)
    check(lambda x: layers.log_softmax(x, dim, impl=impl), lambda x: F.log_softmax(x, dim), x, dtype, seed)


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_log_softmax_is_stable_for_huge_logits(impl):
    x = torch.tensor([[1000.0, 0.0, -1000.0]], dtype=torch.float64)
    y = layers.log_softmax(x, impl=impl)
    torch.testing.assert_close(y, torch.tensor([[0.0, -1000.0, -2000.0]], dtype=torch.float64),
                               rtol=1e-15, atol=0)


def test_flatten_and_log_softmax_reject_bad_dims():
    with pytest.raises(ValueError, match=r"flatten: expected start_dim in \[-2, 1\] for a 2-D input, got 2"):
        layers.flatten(torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match=r"flatten: expected start_dim <= end_dim, got start_dim=1, end_dim=0"):
        layers.flatten(torch.zeros(2, 3), 1, 0)
    with pytest.raises(ValueError, match=r"log_softmax: expected dim in \[-2, 1\] for a 2-D input, got -3"):
        layers.log_softmax(torch.zeros(2, 3), -3)
    with pytest.raises(TypeError, match=r"relu: expected input to be a torch.Tensor, got float"):
        layers.relu(1.0)


@settings(deadline=None, max_examples=40)
@given(shape=shapes, kind=st.sampled_from(["normal", "ints"]), dtype=DTYPES,
       seed=st.integers(0, 2**31 - 1), impl=IMPLS)
def test_gelu_value_and_gradient_equal_torch_nn_gelu(shape, kind, dtype, seed, impl):
    x = values(shape, seed, dtype, kind)
    check(lambda x: layers.gelu(x, impl=impl), torch.nn.GELU(), x, dtype, seed)


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_gelu_is_x_times_the_normal_cdf_and_nan_propagates(impl):
    x = torch.tensor([-3.0, 0.0, 1.0, 40.0, float("-inf")], dtype=torch.float64)
    phi = torch.distributions.Normal(0.0, 1.0).cdf(x[:4])
    torch.testing.assert_close(layers.gelu(x[:4], impl=impl), x[:4] * phi, rtol=1e-15, atol=1e-15)
    y = layers.gelu(torch.tensor([float("nan")]), impl=impl)
    assert torch.isnan(y[0])
    with pytest.raises(TypeError, match=r"gelu: expected input with a floating dtype, got torch.int64"):
        layers.gelu(torch.tensor([1, 2]), impl=impl)
