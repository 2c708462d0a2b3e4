"""Models A, B and C against their torch.nn twins (tests/reference_modules.py).

Same weights through ``functional_call``: outputs, the gradient of every parameter and the new
batch-norm state agree, in train and eval mode; the names of ``params`` and ``state`` are the
twin's ``state_dict()`` keys; the initialisers are the documented ones.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from scipy import stats

import layers
import nets
import reference_modules as R

# Dropout off so train mode is deterministic on both sides (dropout has its own tests).
NETS = {
    "model_a": (lambda: nets.model_a(), lambda: R.model_a_module()),
    "model_b": (lambda: nets.model_b(dropout=0.0, head_dropout=0.0), lambda: R.model_b_module()),
    "model_c": (lambda: nets.model_c(dropout=0.0, head_dropout=0.0), lambda: R.model_c_module()),
}

# float64 throughout. The two sides run the same convolution and matmul kernels; differences come
# only from summation order in batch-norm statistics and its backward (a few ulps of O(1)
# values, amplified along the depth of the net and by ~10^4-term reductions in the gradients):
# 1e-9 relative is far above that (~1e-13 seen) and far below any real mistake.
RTOL, ATOL = 1e-9, 1e-11


def _perturbed_state(state, gen):
    """Running statistics away from their (0, 1) start, so eval mode really uses them."""
    out = {}
    for k, v in state.items():
        if k.endswith("running_mean"):
            out[k] = 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=gen, dtype=v.dtype)
        else:
            out[k] = v.clone()
    return out


@pytest.mark.parametrize("name", sorted(NETS))
def test_params_and_state_keys_and_shapes_equal_the_twins_state_dict(name):
    make_net, make_module = NETS[name]
    params, state = make_net().init(layers.random.key(0))
    reference = make_module().state_dict()
    ours = {**params, **state}
    assert {k: tuple(v.shape) for k, v in ours.items()} == \
        {k: tuple(v.shape) for k, v in reference.items()}
    assert not set(params) & set(state)
    assert set(state) == {k for k, _ in make_module().named_buffers()}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(NETS))
@settings(deadline=None, max_examples=2)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(2, 3))
def test_apply_equals_twin_in_outputs_every_gradient_and_new_state(name, train, seed, batch):
    make_net, make_module = NETS[name]
    net, module = make_net(), make_module()
    gen = torch.Generator().manual_seed(seed)
    params, state = net.init(layers.random.key(seed), dtype=torch.float64)
    state = _perturbed_state(state, gen)
    x = torch.randn(batch, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (batch,), generator=gen)

    def loss(p):
        logits, new_state = net.apply(p, state, x, train=train)
        return F.cross_entropy(logits, labels), (logits, new_state)

    grads, (logits, new_state) = torch.func.grad(loss, has_aux=True)(params)

    # The reference uses plain autograd, independent of torch.func.
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    ref_logits, ref_state = R.reference_call(module, leaves, state, x, train=train)
    ref_grads = torch.autograd.grad(F.cross_entropy(ref_logits, labels), list(leaves.values()))

    torch.testing.assert_close(logits, ref_logits.detach(), rtol=RTOL, atol=ATOL)
    assert list(grads) == list(params)
    for k, g in zip(leaves, ref_grads):
        torch.testing.assert_close(grads[k], g, rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")
    assert list(new_state) == list(state)
    for k in state:
        torch.testing.assert_close(new_state[k], ref_state[k], rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{k}: {m}")
        if not train:
            assert new_state[k] is state[k] or torch.equal(new_state[k], state[k])


def _uniform_bound_holds(w, bound):
    return bool((w.abs() <= bound).all()) and float(w.abs().max()) > 0.9 * bound


def test_model_a_uses_torch_default_init():
    params, state = nets.model_a().init(layers.random.key(1))
    for k, w in params.items():
        if k.endswith(".weight") and w.dim() > 1:
            fan_in = math.prod(w.shape[1:])
            bound = 1.0 / math.sqrt(fan_in)
            assert _uniform_bound_holds(w, bound), k
            assert _uniform_bound_holds(params[k[:-len("weight")] + "bias"], bound), k
            # Uniform on [-b, b]: a Kolmogorov-Smirnov test at a fixed key (deterministic).
            assert stats.kstest(w.flatten().numpy(), "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3
    for k in ("features.1", "features.7"):
        assert torch.equal(params[k + ".weight"], torch.ones_like(params[k + ".weight"]))
        assert torch.equal(params[k + ".bias"], torch.zeros_like(params[k + ".bias"]))
        assert torch.equal(state[k + ".running_var"], torch.ones_like(state[k + ".running_var"]))
        assert int(state[k + ".num_batches_tracked"]) == 0


@pytest.mark.parametrize("make", [nets.model_b, nets.model_c], ids=["model_b", "model_c"])
def test_models_b_and_c_use_xavier_uniform_weights_zero_biases_and_unit_batch_norm(make):
    params, _ = make().init(layers.random.key(2))
    convs = [k for k, w in params.items() if w.dim() == 4]
    assert convs and not any(k[:-len("weight")] + "bias" in params for k in convs)  # bias=False
    for k, w in params.items():
        if w.dim() > 1:
            fan_in, fan_out = math.prod(w.shape[1:]), w.shape[0] * math.prod(w.shape[2:])
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert _uniform_bound_holds(w, bound), k
            assert stats.kstest(w.flatten().numpy(), "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3
        elif k.endswith(".weight"):
            assert torch.equal(w, torch.ones_like(w)), k
        else:
            assert torch.equal(w, torch.zeros_like(w)), k


def test_model_c_is_model_b_with_a_third_conv_in_blocks_two_and_three():
    def convs(net):
        return [leaf.kind for _, leaf in nets.leaves(net.layer) if leaf.kind.startswith("Conv2d")]
    b, c = convs(nets.model_b()), convs(nets.model_c())
    assert len(c) == len(b) + 2
    assert set(c) == set(b)
    b_cost = nets.summary(nets.model_b(), (1, 3, 32, 32), show=False).total_macs
    c_cost = nets.summary(nets.model_c(), (1, 3, 32, 32), show=False).total_macs
    assert 1.0 < c_cost / b_cost <= 1.6


@pytest.mark.parametrize("make", [nets.model_b, nets.model_c], ids=["model_b", "model_c"])
def test_dropout_rates_change_no_parameter_name(make):
    a, _ = make(dropout=0.0, head_dropout=0.0).init(layers.random.key(3))
    b, _ = make(dropout=0.3, head_dropout=0.5).init(layers.random.key(3))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", [dict(num_classes=0), dict(dropout=1.0), dict(head_dropout=-0.1),
                                 dict(dropout="0.1")])
def test_model_b_rejects_bad_hyperparameters_naming_the_model(bad):
    with pytest.raises((ValueError, TypeError), match="model_b"):
        nets.model_b(**bad)


def test_model_a_rejects_bad_num_classes_naming_the_model():
    with pytest.raises(ValueError, match=r"model_a: expected num_classes"):
        nets.model_a(num_classes=-1)
