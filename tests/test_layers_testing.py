"""layers.testing as a user meets it (docs/testing.md's worked examples): a layer purenn does
not have passes check_layer in a few lines, and planted bugs fail with a case that replays."""
import dataclasses
import math

import pytest
import torch
from hypothesis import strategies as st

import layers
from layers.testing import (Case, check_case, check_layer, custom_backward_nodes, make_input,
                            tolerance)


# ----------------------------------------------------------------------------- worked example 1

def group_norm(params, x, *, num_groups, eps=1e-5):
    """torch.nn.GroupNorm: each sample's channels in ``num_groups`` groups, normalised by the
    group's mean and biased variance, then scaled and shifted per channel. (N, C, *) -> same."""
    n, c = x.shape[:2]
    g = x.reshape(n, num_groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = g.var(-1, unbiased=False, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.dim() - 2)
    return y * params["weight"].reshape(per_channel) + params["bias"].reshape(per_channel)


@st.composite
def group_norm_cases(draw):
    groups, per_group = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    n, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 3))  # torch: > 1 value a group
    eps = draw(st.sampled_from([1e-3, 0.1]))
    return Case(torch.nn.GroupNorm(groups, groups * per_group, eps=eps),
                dict(num_groups=groups, eps=eps), (n, groups * per_group, h, w),
                reduction=per_group * h * w)


def test_a_group_norm_written_by_hand_equals_torch_nn_groupnorm():
    check_layer(group_norm, group_norm_cases(), max_examples=20)


def depthwise_separable(params, x):
    """A 3x3 depthwise convolution (one filter per channel) then a 1x1 pointwise one, as
    ``nn.Sequential(nn.Conv2d(C, C, 3, padding=1, groups=C), nn.Conv2d(C, K, 1))``."""
    depthwise = {"weight": params["0.weight"], "bias": params["0.bias"]}
    pointwise = {"weight": params["1.weight"], "bias": params["1.bias"]}
    return layers.conv2d(pointwise, layers.conv2d(depthwise, x, padding=1, groups=x.shape[1]))


def depthwise_separable_cases():
    return st.builds(
        lambda c, k, n, h, w: Case(torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1, groups=c),
                                                       torch.nn.Conv2d(c, k, 1)), {}, (n, c, h, w),
                                   reduction=9 + c),
        st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5))


def test_a_depthwise_separable_conv_built_from_conv2d_equals_its_nn_sequential():
    check_layer(depthwise_separable, depthwise_separable_cases(), max_examples=20)


# ----------------------------------------------------------------------------- worked example 2

def group_norm_unbiased_variance(params, x, *, num_groups, eps=1e-5):
    n, c = x.shape[:2]
    g = x.reshape(n, num_groups, -1)
    y = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, keepdim=True) + eps)).reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.dim() - 2)
    return y * params["weight"].reshape(per_channel) + params["bias"].reshape(per_channel)


def group_norm_eps_outside_the_root(params, x, *, num_groups, eps=1e-5):
    n, c = x.shape[:2]
    g = x.reshape(n, num_groups, -1)
    var = g.var(-1, unbiased=False, keepdim=True)
    y = ((g - g.mean(-1, keepdim=True)) / (torch.sqrt(var) + eps)).reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.dim() - 2)
    return y * params["weight"].reshape(per_channel) + params["bias"].reshape(per_channel)


def group_norm_detached_weight(params, x, *, num_groups, eps=1e-5):
    return group_norm({"weight": params["weight"].detach(), "bias": params["bias"]}, x,
                      num_groups=num_groups, eps=eps)


@pytest.mark.parametrize("bug, symptom", [
    (group_norm_unbiased_variance, "forward output"),
    (group_norm_eps_outside_the_root, "forward output"),
    (group_norm_detached_weight, "gradient with respect to parameter 'weight'"),
])
def test_a_planted_group_norm_bug_fails_with_a_case_that_replays(bug, symptom):
    with pytest.raises(AssertionError) as failure:
        check_layer(bug, group_norm_cases(), max_examples=15)
    message = str(failure.value)
    assert symptom in message and "Replay this case:" in message
    snippet = message.split("Replay this case:\n", 1)[1].split("\n\n")[0]
    assert f"named('test_layers_testing.{bug.__name__}')" in snippet
    with pytest.raises(AssertionError, match=symptom):          # the snippet alone fails the same way
        exec(snippet, {})


# ----------------------------------------------------------------------------- the checker itself

def _relu_case(**changes):
    case = Case(torch.nn.ReLU(), dict(impl="explicit"), (3, 4), reduction=1,
                backward=layers.activations.ExplicitReLU)
    return dataclasses.replace(case, **changes)


def test_check_case_fails_a_formulation_that_did_not_run_its_written_out_backward():
    # impl ignored: equal values, but the explicit backward never ran (issue 25's surviving mutant)
    with pytest.raises(AssertionError, match=r"expected the backward of \['ExplicitReLUBackward'\]"):
        check_case(lambda params, x, impl: layers.relu(x, impl="fast"), _relu_case())
    check_case(lambda params, x, impl: layers.relu(x, impl=impl), _relu_case())
    with pytest.raises(AssertionError, match=r"expected only torch's own backward nodes, got "
                                             r"\['ExplicitReLUBackward'\]"):
        check_case(lambda params, x, impl: layers.relu(x, impl="explicit"), _relu_case(backward="builtin"))


def test_check_case_fails_a_layer_that_writes_into_its_state():
    def batch_norm_in_place(params, state, x, *, train, **kw):
        y, new_state = layers.batch_norm(params, state, x, train=train, **kw)
        state["running_mean"].copy_(new_state["running_mean"])       # torch.nn's habit, not ours
        return y, new_state

    # torch.func refuses the write inside vjp; an eager write would fail the purity check
    with pytest.raises(AssertionError, match=r"in-place operation \(aten::copy_\) that would mutate"):
        check_case(batch_norm_in_place, Case(torch.nn.BatchNorm1d(3), {}, (4, 3)), train=True)


class Centred(torch.nn.Module):
    """Subtracts the batch mean: its samples are not independent."""
    def forward(self, x):
        return x - x.mean(0)


def test_check_case_fails_a_batched_case_whose_samples_are_not_independent():
    def centred(params, x):
        return x - x.mean(0)

    with pytest.raises(AssertionError, match="a loop over the samples against the batched call"):
        check_case(centred, Case(Centred(), {}, (3, 2)))
    check_case(centred, Case(Centred(), {}, (3, 2), batched=False))


def test_check_case_fails_a_wrong_state_update_and_names_the_entry():
    def batch_norm_without_momentum(params, state, x, *, train, **kw):
        y, new_state = layers.batch_norm(params, state, x, train=train, **kw)
        return y, {**new_state, "running_mean": state["running_mean"]}

    case = Case(torch.nn.BatchNorm1d(3), dict(momentum=0.1, eps=1e-5), (4, 3))
    with pytest.raises(AssertionError, match=r"state 'running_mean' after the call \(train=True\)"):
        check_case(batch_norm_without_momentum, case, train=True)
    check_case(layers.batch_norm, case, train=True)


def test_the_default_tolerance_is_the_documented_formula():
    for dtype in (torch.float32, torch.float64):
        for n in (1, 9, 54):
            t = n * torch.finfo(dtype).eps ** 0.8
            assert tolerance(dtype, n) == dict(rtol=t, atol=t)
    assert math.isclose(tolerance(torch.float64, 1)["rtol"], 3.1e-13, rel_tol=0.05)
    assert math.isclose(tolerance(torch.float32, 1)["rtol"], 2.8e-6, rel_tol=0.05)


def test_make_input_values_and_layouts():
    x = make_input((2, 3, 4, 5), 0, torch.float64, "channels_last", "ints", int_range=(-2, 3))
    assert x.is_contiguous(memory_format=torch.channels_last) and set(x.unique().tolist()) <= {-2, -1, 0, 1, 2}
    y = make_input((2, 3, 4, 5), 0, torch.float32, "sliced", "extremes")
    assert y.stride()[-1] == 2 and y.abs().max() > 10 and y.dtype == torch.float32
    z = make_input((3, 4), 0, torch.float64, "transposed", "normal")
    assert not z.is_contiguous() and torch.equal(z, make_input((3, 4), 0, torch.float64, "contiguous", "normal"))


def test_custom_backward_nodes_lists_every_autograd_function_in_the_graph():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = layers.log_softmax(layers.relu(x, impl="explicit"), impl="explicit")
    assert custom_backward_nodes(y) == {"ExplicitReLUBackward", "ExplicitLogSoftmaxBackward"}
    assert custom_backward_nodes(layers.relu(x)) == set()
