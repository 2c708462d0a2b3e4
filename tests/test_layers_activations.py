"""relu, gelu, flatten, log_softmax: both formulations equal torch (values and gradients), and
each runs its own backward."""
import pytest
import torch
from torch.func import grad, vjp

import layers
from layers.testing import activation_cases, check_layer, fixed_tolerance

# log_softmax: logsumexp over <= 4 terms of magnitude <= ~15 after the shift; float64 ~1e-15,
# float32 eps 6e-8 times magnitude ~15 -> ~1e-6, so 1e-5. relu, gelu, flatten: elementwise.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _check(name, max_examples=40):
    """Both formulations (drawn) of ``layers.<name>`` against its torch.nn module: value and
    gradient, purity, vmap, and that impl="explicit" runs its written-out backward and "fast"
    none (so a swapped branch, which gives equal values, fails)."""
    fn = getattr(layers, name)
    check_layer(lambda params, x, **kw: fn(x, **kw), activation_cases(name), max_examples=max_examples,
                tolerance=fixed_tolerance(TOL))


def test_relu_value_gradient_and_backward_equal_torch_relu():
    _check("relu")


def test_gelu_value_gradient_and_backward_equal_torch_nn_gelu():
    _check("gelu")


def test_flatten_equals_torch_flatten_for_every_start_and_end_dim():
    _check("flatten")


def test_log_softmax_value_gradient_and_backward_equal_torch_for_every_dim():
    _check("log_softmax")


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_relu_gradient_is_zero_at_zero_and_nan_propagates(impl):
    x = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    assert torch.equal(grad(lambda x: layers.relu(x, impl=impl).sum())(x), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    y = layers.relu(torch.tensor([float("nan"), float("-inf")]), impl=impl)
    assert torch.isnan(y[0]) and y[1] == 0


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_log_softmax_is_stable_for_huge_logits(impl):
    x = torch.tensor([[1000.0, 0.0, -1000.0]], dtype=torch.float64)
    y = layers.log_softmax(x, impl=impl)
    torch.testing.assert_close(y, torch.tensor([[0.0, -1000.0, -2000.0]], dtype=torch.float64),
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("impl", ["fast", "explicit"])
@pytest.mark.parametrize("dim", [0, 1])
def test_log_softmax_is_stable_for_slices_of_very_different_scales(impl, dim):
    # The max subtracted for stability is each slice's own: a global max (1000) would shift the
    # second row's exponents to exp(-2000) = 0 and give log(0) = -inf.
    x = torch.tensor([[1000.0, 0.0, -1000.0], [-1000.0, -1001.0, -1002.0]], dtype=torch.float64)
    x = x if dim == 1 else x.T
    y = layers.log_softmax(x, dim, impl=impl)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.log_softmax(x, dim), rtol=1e-15, atol=0)


def test_flatten_and_log_softmax_reject_bad_dims():
    with pytest.raises(ValueError, match=r"^flatten: expected start_dim in \[-2, 1\] for a 2-D input, got 2$"):
        layers.flatten(torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match=r"^flatten: expected end_dim in \[-2, 1\] for a 2-D input, got 2$"):
        layers.flatten(torch.zeros(2, 3), 0, 2)
    with pytest.raises(TypeError, match=r"^flatten: expected start_dim to be an int, got 1.5$"):
        layers.flatten(torch.zeros(2, 3), 1.5)
    with pytest.raises(TypeError, match=r"^flatten: expected end_dim to be an int, got '1'$"):
        layers.flatten(torch.zeros(2, 3), 0, "1")
    with pytest.raises(ValueError, match=r"^flatten: expected start_dim <= end_dim, got start_dim=1, end_dim=0 "
                                         r"for input \(2, 3\)$"):
        layers.flatten(torch.zeros(2, 3), 1, 0)
    with pytest.raises(ValueError, match=r"log_softmax: expected dim in \[-2, 1\] for a 2-D input, got -3"):
        layers.log_softmax(torch.zeros(2, 3), -3)
    with pytest.raises(TypeError, match=r"relu: expected input to be a torch.Tensor, got float"):
        layers.relu(1.0)


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_gelu_is_x_times_the_normal_cdf_and_nan_propagates(impl):
    x = torch.tensor([-3.0, 0.0, 1.0, 40.0, float("-inf")], dtype=torch.float64)
    phi = torch.distributions.Normal(0.0, 1.0).cdf(x[:4])
    torch.testing.assert_close(layers.gelu(x[:4], impl=impl), x[:4] * phi, rtol=1e-15, atol=1e-15)
    y = layers.gelu(torch.tensor([float("nan")]), impl=impl)
    assert torch.isnan(y[0])
    with pytest.raises(TypeError, match=r"gelu: expected input with a floating dtype, got torch.int64"):
        layers.gelu(torch.tensor([1, 2]), impl=impl)


@pytest.mark.parametrize("name", ["relu", "gelu", "flatten", "log_softmax"])
def test_every_activation_names_itself_when_refusing_a_non_tensor_or_an_unknown_impl(name):
    fn = getattr(layers, name)
    with pytest.raises(TypeError, match=rf"^{name}: expected input to be a torch.Tensor, got float"):
        fn(1.0)
    with pytest.raises(ValueError, match=rf"^{name}: expected impl to be one of \('fast', 'explicit'\), got 'slow'"):
        fn(torch.zeros(2, 3), impl="slow")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.float16, torch.bfloat16,
                                   torch.float32, torch.float64])
def test_explicit_relu_keeps_the_inputs_dtype_and_equals_torch_relu(dtype):
    x = torch.tensor([3, -2, 0, 1, -7]).to(dtype)
    y = layers.relu(x, impl="explicit")
    assert y.dtype == dtype and torch.equal(y, torch.relu(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_explicit_relu_equals_torch_relu_bit_for_bit_sign_of_zero_included(dtype):
    # torch.relu keeps -0.0 (it returns x where x is not below 0): a select on x <= 0 would give
    # +0.0. Compared bit for bit: values (NaN where NaN) and the sign bit, forward and backward.
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([-0.0, 0.0, -1.0, 2.0, -inf, inf, nan, -1e-30, 1e-30, -0.0], dtype=dtype)
    cotangent = torch.tensor([1.0, -1.0, 2.0, -0.0, 3.0, -2.0, 5.0, 1.0, -0.0, -0.0], dtype=dtype)
    (y, pull), (want, pull_want) = (vjp(lambda x: layers.relu(x, impl=impl), x) for impl in ("explicit", "fast"))
    dx, dx_want = pull(cotangent)[0], pull_want(cotangent)[0]
    for got, ref in ((y, want), (dx, dx_want)):
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got.signbit(), ref.signbit()), (got, ref)
    assert want[0].signbit() and not y[1].signbit()       # the property is not vacuous


@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 3, 4, 5)])
def test_flatten_runs_the_formulation_asked_for(shape, monkeypatch):
    # Both formulations give the same view, so only watching torch.flatten tells them apart: fast
    # calls it once; explicit reshapes, except a 0-d input (the one case it leaves to torch).
    calls, real = [], torch.flatten
    monkeypatch.setattr(torch, "flatten", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(shape)
    for impl, expected in (("fast", 1), ("explicit", 1 if x.dim() == 0 else 0)):
        calls.clear()
        y = layers.flatten(x, 0, -1, impl=impl)
        assert len(calls) == expected and torch.equal(y, real(x)) and y.shape == (x.numel(),)
