"""Models A, B and C against their torch.nn twins (tests/reference_modules.py).

Same weights through ``functional_call``: outputs, the gradient of every parameter and the new
batch-norm state agree, in train and eval mode; the names of ``params`` and ``state`` are the
twin's ``state_dict()`` keys; the initialisers are the documented ones.
"""
import math

import pytest
import torch
from scipy import stats

import layers
import nets
import reference_modules as R
from nets.testing import check_net, check_state_dict_names

# Dropout off so train mode is deterministic on both sides (dropout has its own tests).
NETS = {
    "model_a": (lambda: nets.model_a(), lambda: R.model_a_module()),
    "model_b": (lambda: nets.model_b(dropout=0.0, head_dropout=0.0), lambda: R.model_b_module()),
    "model_c": (lambda: nets.model_c(dropout=0.0, head_dropout=0.0), lambda: R.model_c_module()),
}

# Tolerance: nets.testing's, float64 with rtol 1e-9 / atol 1e-11 (its RTOL comment gives why).


@pytest.mark.parametrize("name", sorted(NETS))
def test_params_and_state_keys_and_shapes_equal_the_twins_state_dict(name):
    make_net, make_module = NETS[name]
    check_state_dict_names(make_net(), make_module())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_apply_equals_twin_in_outputs_every_gradient_and_new_state(name, train):
    """Batches of 2 and 3, perturbed running statistics; eval returns the state it was given."""
    make_net, make_module = NETS[name]
    check_net(make_net, make_module, (3, 32, 32), max_examples=2, train=(train,))


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
