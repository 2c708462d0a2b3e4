"""linear: both formulations equal torch.nn.Linear (output and gradients); bad input fails."""
import re

import pytest
import torch
import layers
from layers.testing import check_layer, fixed_tolerance, linear_cases

# float64: dot products of at most 8 terms; ~1e-15 relative, 1e-12 is generous.
# float32: eps 6e-8 times <= 8 O(1) terms -> ~1e-6; allow 1e-5.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def test_linear_output_gradients_purity_vmap_and_backward_equal_torch_linear():
    """0-3 leading axes, bias or not, both formulations, float64 / float32, strided layouts and
    exact zeros: output and every gradient, purity, vmap over the batch, which backward ran."""
    check_layer(layers.linear, linear_cases(), max_examples=50, tolerance=fixed_tolerance(TOL))


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
    # the keys it takes (optional ones marked), the keys it got, then what is missing and what is unknown
    expected = "linear: expected params with keys ['weight', 'bias (optional)'], got "
    for keys, tail in ((("weight", "w"), "['w', 'weight'] (unknown ['w'])"),
                       (("bias",), "['bias'] (missing ['weight'])"),
                       (("bias", "w"), "['bias', 'w'] (missing ['weight']) (unknown ['w'])")):
        with pytest.raises(ValueError, match="^" + re.escape(expected + tail) + "$"):
            layers.linear({k: torch.zeros(4, 3) if k != "bias" else torch.zeros(4) for k in keys}, torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"linear: expected params to be a dict, got tuple"):
        layers.linear((torch.zeros(4, 3),), torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"linear: expected input to be a torch.Tensor, got list"):
        layers.linear({"weight": torch.zeros(4, 3)}, [1.0, 2.0, 3.0])


@pytest.mark.parametrize("autocast_dtype, bias_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                                         (torch.bfloat16, None)])
def test_explicit_linear_backward_runs_in_the_forwards_autocast_and_returns_each_inputs_dtype(autocast_dtype, bias_dtype):
    # layers/linear.py, ExplicitLinear: dX = dY W, dW = dY^T X (the matmuls in the forward's
    # autocast precision), db = sum dY; each gradient in its input's dtype.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g).requires_grad_(True)
    w = torch.randn(5, 4, generator=g).requires_grad_(True)
    b = None if bias_dtype is None else torch.randn(5, generator=g).to(bias_dtype).requires_grad_(True)
    params = {"weight": w} if b is None else {"weight": w, "bias": b}
    with torch.autocast("cpu", dtype=autocast_dtype):
        y = layers.linear(params, x, impl="explicit")
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    inputs = (x, w) if b is None else (x, w, b)
    grads = torch.autograd.grad(y, inputs, dy)
    assert [t.dtype for t in grads] == [t.dtype for t in inputs]
    low = lambda t: t.to(autocast_dtype)   # noqa: E731
    assert torch.equal(grads[0], (low(dy) @ low(w)).to(x.dtype))
    assert torch.equal(grads[1], (low(dy).reshape(-1, 5).T @ low(x).reshape(-1, 4)).to(w.dtype))
    if b is not None:
        assert torch.equal(grads[2], dy.reshape(-1, 5).sum(0).to(b.dtype))
