"""batch_norm: torch.nn.BatchNorm{1,2}d parity (output, gradients, running stats) and the
equinox-style properties (stats move in training, stay bit-identical in eval, formula by hand)."""
import importlib

import re

import pytest
import torch
from torch.func import grad, vjp

import layers
from layers.testing import batch_norm_cases, check_layer, fixed_tolerance

# float64: means/variances over at most N*H*W = 3*4*4 = 48 values; ATen uses a different
# summation order (Welford), so outputs agree to ~1e-14 and 1e-10 is generous.
# float32: eps 6e-8, reductions of <= 48 O(1) values, normalised by std >= sqrt(eps); the gradient
# of the normalisation has a 1/std factor, so allow 1e-4.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
STATE_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def test_batch_norm_output_gradients_running_stats_purity_and_backward_equal_torch_batchnorm():
    """Ranks 2-4, affine or not, running statistics or not, momentum None / 0 / 1 / any, eps,
    train and eval, 1-3 calls in a row, constant channels (ints): output, input and parameter
    gradients, the new state, purity, vmap in eval, and which backward ran."""
    check_layer(layers.batch_norm, batch_norm_cases(), max_examples=100, tolerance=fixed_tolerance(TOL))


def _trees(c=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    params = {"weight": torch.rand(c, generator=g, dtype=dtype) + 0.5,
              "bias": torch.randn(c, generator=g, dtype=dtype)}
    state = {"running_mean": torch.zeros(c, dtype=dtype), "running_var": torch.ones(c, dtype=dtype),
             "num_batches_tracked": torch.tensor(0)}
    return params, state


def _x(shape=(4, 3, 5, 5), seed=1, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3 + 1


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_batch_norm_running_stats_change_in_training(impl):
    params, state = _trees()
    _, new_state = layers.batch_norm(params, state, _x(), train=True, impl=impl)
    assert not torch.equal(new_state["running_mean"], state["running_mean"])
    assert not torch.equal(new_state["running_var"], state["running_var"])
    assert int(new_state["num_batches_tracked"]) == 1


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_batch_norm_eval_leaves_state_bit_identical(impl):
    params, state = _trees()
    _, state = layers.batch_norm(params, state, _x(), train=True, impl=impl)
    _, eval_state = layers.batch_norm(params, state, _x(seed=2), train=False, impl=impl)
    for k in STATE_KEYS:
        assert torch.equal(eval_state[k], state[k])


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_batch_norm_output_equals_formula_by_hand(impl):
    params, state = _trees()
    x = _x()
    y, new_state = layers.batch_norm(params, state, x, train=True, momentum=0.25, eps=1e-3, impl=impl)
    for c in range(3):
        v = x[:, c]
        n = v.numel()
        mean = v.sum() / n
        biased = ((v - mean) ** 2).sum() / n
        expect = (v - mean) / (biased + 1e-3) ** 0.5 * params["weight"][c] + params["bias"][c]
        torch.testing.assert_close(y[:, c], expect, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new_state["running_mean"][c], 0.75 * 0 + 0.25 * mean,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new_state["running_var"][c], 0.75 * 1 + 0.25 * biased * n / (n - 1),
                                   rtol=1e-12, atol=1e-12)
    y_eval, _ = layers.batch_norm(params, new_state, x, train=False, eps=1e-3, impl=impl)
    rm, rv = new_state["running_mean"], new_state["running_var"]
    expect = (x - rm[:, None, None]) / (rv[:, None, None] + 1e-3).sqrt() \
        * params["weight"][:, None, None] + params["bias"][:, None, None]
    torch.testing.assert_close(y_eval, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_batch_norm_momentum_none_is_the_cumulative_average_of_batches(impl):
    params, state = _trees()
    xs = [_x(seed=s) for s in range(3)]
    for x in xs:
        _, state = layers.batch_norm(params, state, x, train=True, momentum=None, impl=impl)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs])
    # Started from running_mean 0 with 0 batches tracked: the first batch replaces it entirely.
    torch.testing.assert_close(state["running_mean"], means.mean(0), rtol=1e-12, atol=1e-12)
    assert int(state["num_batches_tracked"]) == 3


@pytest.mark.parametrize("impl", ["fast", "explicit"])
@pytest.mark.parametrize("momentum", [None, 0.1])
def test_batch_norm_keeps_the_inputs_device_in_every_mode(impl, momentum):
    # meta stands in for a GPU: nothing the running update makes (momentum=None's zero buffers
    # included) may land on the CPU
    params = {"weight": torch.ones(3, device="meta"), "bias": torch.zeros(3, device="meta")}
    state = {"running_mean": torch.zeros(3, device="meta"), "running_var": torch.ones(3, device="meta"),
             "num_batches_tracked": torch.tensor(0, device="meta")}
    x = torch.randn(2, 3, 4, 4, device="meta")
    for train in (True, False):
        y, new = layers.batch_norm(params, state, x, train=train, momentum=momentum, impl=impl)
        assert y.device.type == "meta" and {t.device.type for t in new.values()} == {"meta"}
    y, new = layers.batch_norm(params, {}, x, train=True, momentum=momentum, impl=impl)
    assert y.device.type == "meta" and new == {}


@pytest.mark.parametrize("impl", ["fast", "explicit"])
@pytest.mark.parametrize("tracked", [0, 2, 5])
def test_batch_norm_momentum_none_with_an_int_num_batches_tracked_updates_as_torch(impl, tracked):
    # momentum=None weights the batch by 1 / (tracked + 1); the count may be a Python int.
    params, _ = _trees()
    g = torch.Generator().manual_seed(2)
    state = {"running_mean": torch.randn(3, generator=g, dtype=torch.float64),
             "running_var": torch.rand(3, generator=g, dtype=torch.float64) + 0.5, "num_batches_tracked": tracked}
    x = _x()
    module = torch.nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    module.load_state_dict({**params, **state, "num_batches_tracked": torch.tensor(tracked)})
    module.train()(x)
    _, new = layers.batch_norm(params, state, x, train=True, momentum=None, impl=impl)
    assert new["num_batches_tracked"] == tracked + 1 and isinstance(new["num_batches_tracked"], int)
    # float64 means and variances of 100 values per channel, ATen's order against ours: ~1e-15
    for k in STATE_KEYS[:2]:
        torch.testing.assert_close(new[k], getattr(module, k), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["fast", "explicit"])
def test_batch_norm_grad_works_through_training_and_eval(impl):
    params, state = _trees()
    x = _x()
    for train in (True, False):
        g = grad(lambda p: layers.batch_norm(p, state, x, train=train, impl=impl)[0].pow(2).sum())(params)
        assert set(g) == {"weight", "bias"} and all(torch.isfinite(v).all() for v in g.values())


def test_batch_norm_rejects_one_value_per_channel_when_training():
    params, state = _trees()
    with pytest.raises(ValueError, match=r"batch_norm: expected more than 1 value per channel .*"
                                         r"got input \(1, 3\)"):
        layers.batch_norm(params, state, torch.zeros(1, 3, dtype=torch.float64), train=True)
    with pytest.raises(ValueError, match=r"batch_norm: expected more than 1 value per channel"):
        layers.batch_norm(params, {}, torch.zeros(1, 3, 1, 1, dtype=torch.float64), train=False)   # no running stats
    layers.batch_norm(params, state, torch.zeros(1, 3, dtype=torch.float64), train=False)        # eval is fine


def test_batch_norm_rejects_state_with_missing_keys():
    params, state = _trees()
    del state["num_batches_tracked"]
    with pytest.raises(ValueError, match=r"batch_norm: expected state .*missing \['num_batches_tracked'\]"):
        layers.batch_norm(params, state, _x(), train=True)


def test_batch_norm_rejects_wrong_param_keys():
    params, state = _trees()
    with pytest.raises(ValueError, match=r"batch_norm: expected params .*missing \['bias'\]"):
        layers.batch_norm({"weight": params["weight"]}, state, _x(), train=True)
    with pytest.raises(ValueError, match=r"batch_norm: expected params .*unknown \['scale'\]"):
        layers.batch_norm({**params, "scale": params["weight"]}, state, _x(), train=True)


def test_batch_norm_rejects_channel_mismatch():
    params, state = _trees()
    with pytest.raises(ValueError, match=r"batch_norm: expected weight of shape \(4,\) \(one per "
                                         r"channel of input \(4, 4, 5, 5\)\), got \(3,\)"):
        layers.batch_norm(params, state, _x((4, 4, 5, 5)), train=True)
    with pytest.raises(ValueError, match=r"batch_norm: expected running_mean of shape \(4,\)"):
        layers.batch_norm({}, state, _x((4, 4, 5, 5)), train=True)


def test_batch_norm_rejects_wrong_rank_and_bad_hyperparameters():
    params, state = _trees()
    with pytest.raises(ValueError, match=r"batch_norm: expected 2-D or 3-D or 4-D input .*got \(3,\)"):
        layers.batch_norm(params, state, torch.zeros(3), train=True)
    with pytest.raises(TypeError, match=r"batch_norm: expected train to be a bool, got None"):
        layers.batch_norm(params, state, _x(), train=None)
    with pytest.raises(ValueError, match=r"batch_norm: expected momentum to be None or a float in "
                                         r"\[0, 1\], got 1.5"):
        layers.batch_norm(params, state, _x(), train=True, momentum=1.5)
    with pytest.raises(ValueError, match=r"batch_norm: expected eps to be a float > 0, got 0"):
        layers.batch_norm(params, state, _x(), train=True, eps=0)


def test_batch_norm_refusals_name_what_was_expected_and_what_came_whole():
    params, state = _trees()
    x = _x()
    ints = {"weight": torch.ones(3, dtype=torch.int64), "bias": torch.zeros(3, dtype=torch.int64)}
    int_state = {"running_mean": torch.zeros(3, dtype=torch.int32), "running_var": torch.ones(3, dtype=torch.int32),
                 "num_batches_tracked": torch.tensor(0)}
    cases = [
        (lambda: layers.batch_norm(params, state, [1.0], train=True), TypeError,
         "batch_norm: expected input to be a torch.Tensor, got list"),
        (lambda: layers.batch_norm(params, state, torch.ones(3, dtype=torch.float64), train=True), ValueError,
         "batch_norm: expected 2-D or 3-D or 4-D input (N, C), (N, C, L) or (N, C, H, W), got (3,)"),
        (lambda: layers.batch_norm(params, {**state, "running_var": torch.ones(4, dtype=torch.float64)}, x,
                                   train=True), ValueError,
         "batch_norm: expected running_var of shape (3,) (one per channel of input (4, 3, 5, 5)), got (4,)"),
        (lambda: layers.batch_norm(params, {**state, "num_batches_tracked": torch.zeros(2)}, x, train=True),
         TypeError, "batch_norm: expected num_batches_tracked to be an int or a 0-d tensor, got tensor([0., 0.])"),
        (lambda: layers.batch_norm(params, {**state, "num_batches_tracked": 1.5}, x, train=True), TypeError,
         "batch_norm: expected num_batches_tracked to be an int or a 0-d tensor, got 1.5"),
        # which statistics would be used, and why there are too few values for them
        (lambda: layers.batch_norm(params, state, torch.ones(1, 3, 1, 1, dtype=torch.float64), train=True),
         ValueError, "batch_norm: expected more than 1 value per channel when using batch statistics "
                     "(train=True, running stats kept), got input (1, 3, 1, 1)"),
        (lambda: layers.batch_norm({}, {}, torch.ones(1, 3), train=False), ValueError,
         "batch_norm: expected more than 1 value per channel when using batch statistics "
         "(train=False, running stats absent), got input (1, 3)"),
        (lambda: layers.batch_norm({}, {}, torch.ones(2, 0, 3), train=True), ValueError,   # no channels at all
         "batch_norm: expected more than 1 value per channel when using batch statistics "
         "(train=True, running stats absent), got input (2, 0, 3)"),
        (lambda: layers.batch_norm(ints, {}, x, train=True), TypeError,
         "batch_norm: expected weight with a floating dtype, got torch.int64"),
        (lambda: layers.batch_norm({}, int_state, x, train=True), TypeError,
         "batch_norm: expected running_mean with a floating dtype, got torch.int32"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match="^" + re.escape(message) + "$"):
            call()


# ----------------------------------------------------------------------------- synchronised batch norm
# Inside layers.parallel.batch_axis with an all_reduce, batch norm uses the global batch's
# statistics (layers/batch_norm.py, _synced). Simulated in one process: the global batch is
# `copies` equal slices, so all_reduce(t) = copies * t is exactly the sum over the processes.

from hypothesis import given, settings, strategies as st  # noqa: E402

from layers.parallel import BatchAxis, batch_axis  # noqa: E402


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), copies=st.sampled_from([1, 2, 4]), rows=st.integers(1, 3),
       spatial=st.sampled_from([(), (3,), (2, 3)]), momentum=st.sampled_from([0.1, 0.5, None]),
       affine=st.booleans(), train=st.booleans(), stats=st.booleans(), eps=st.sampled_from([1e-5, 0.1]))
def test_synced_batch_norm_of_equal_slices_equals_batch_norm_of_the_global_batch(
        seed, copies, rows, spatial, momentum, affine, train, stats, eps):
    g = torch.Generator().manual_seed(seed)
    c = 3
    if rows * max(1, int(torch.tensor(spatial).prod())) < 2:
        rows = 2   # batch statistics need two values per channel, checked on this process's slice
    local = torch.randn((rows, c) + spatial, generator=g, dtype=torch.float64)
    params = ({"weight": torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
               "bias": torch.randn(c, generator=g, dtype=torch.float64)} if affine else {})
    state = {}
    if stats:
        state = {"running_mean": torch.randn(c, generator=g, dtype=torch.float64),
                 "running_var": torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
                 "num_batches_tracked": torch.tensor(3)}
    kw = dict(train=train, momentum=momentum, eps=eps)
    want_y, want_state = layers.batch_norm(params, state, torch.cat([local] * copies), impl="fast", **kw)
    for impl in ("fast", "explicit"):
        with batch_axis(BatchAxis(0, rows, rows * copies, all_reduce=lambda t: copies * t)):
            y, new_state = layers.batch_norm(params, state, local, impl=impl, **kw)
        torch.testing.assert_close(y, want_y[:rows], rtol=1e-12, atol=1e-12)
        assert new_state.keys() == want_state.keys()
        for k in want_state:
            torch.testing.assert_close(new_state[k], want_state[k], rtol=1e-12, atol=1e-12)
            assert new_state[k].dtype == want_state[k].dtype
        if not train and stats:
            assert new_state is state


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_synced_batch_norm_of_a_half_input_computes_in_the_statistics_dtype_and_returns_the_inputs(x_dtype):
    # as the unsynced explicit formulation: the statistics (float32 here) are those of the input
    # cast up, and y is cast back down to the input's dtype
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 2, 2, generator=g).to(x_dtype)
    params = {"weight": torch.rand(3, generator=g) + 0.5, "bias": torch.randn(3, generator=g)}
    state = layers.init.batch_norm_state(3)
    want_y, want_state = layers.batch_norm(params, state, x, train=True, impl="explicit")
    with batch_axis(BatchAxis(0, 4, 4, all_reduce=lambda t: t)):
        y, new_state = layers.batch_norm(params, state, x, train=True)
    assert y.dtype == x_dtype and {t.dtype for t in new_state.values()} == {torch.float32, torch.int64}
    # float32 sums of 16 values in another order: a few float32 ulps, then one rounding to the
    # input's 8 or 11 mantissa bits (one half-ulp apart at most: 2**-8 relative for bfloat16)
    torch.testing.assert_close(y.float(), want_y.float(), rtol=2**-7, atol=2**-7)
    for k in ("running_mean", "running_var"):
        # computed in half precision instead, these would be ~1e-3 apart, not 1e-6
        torch.testing.assert_close(new_state[k], want_state[k], rtol=1e-6, atol=1e-6)


@settings(deadline=None, max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), momentum=st.sampled_from([0.1, None]))
def test_synced_batch_norm_of_one_process_has_batch_norms_gradients(seed, momentum):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    params = {"weight": torch.rand(3, generator=g, dtype=torch.float64) + 0.5,
              "bias": torch.randn(3, generator=g, dtype=torch.float64)}
    state = layers.init.batch_norm_state(3, dtype=torch.float64)

    def loss(p, x, synced):
        if synced:
            with batch_axis(BatchAxis(0, 4, 4, all_reduce=lambda t: t)):
                y, s = layers.batch_norm(p, state, x, train=True, momentum=momentum)
        else:
            y, s = layers.batch_norm(p, state, x, train=True, momentum=momentum)
        return (y * y.detach().sin()).sum(), s

    (gp, gx), s = grad(loss, argnums=(0, 1), has_aux=True)(params, x, True)
    (rp, rx), r = grad(loss, argnums=(0, 1), has_aux=True)(params, x, False)
    # float64, sums of 16 values per channel: only rounding order differs
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    for k in rp:
        torch.testing.assert_close(gp[k], rp[k], rtol=1e-12, atol=1e-12)
    for k in r:   # and the running state (the distributed tests' one-process case, folded in here)
        torch.testing.assert_close(s[k], r[k], rtol=1e-12, atol=1e-12)


# ExplicitBatchNormTrain on its own: its mean and var outputs are differentiable (batch_norm
# detaches them for the running update, so only a direct caller sends them a gradient).

def _bn_train_by_formula(x, weight, bias, eps):
    """``(y, mean, var)`` of batch statistics in plain torch ops: the reference for autograd."""
    axes, per_channel = [0, 2, 3], (1, -1, 1, 1)
    mean = x.mean(dim=axes)
    var = ((x - mean.reshape(per_channel)) ** 2).mean(dim=axes)
    y = (x - mean.reshape(per_channel)) / torch.sqrt(var.reshape(per_channel) + eps)
    return y * weight.reshape(per_channel) + bias.reshape(per_channel), mean, var


def _bn_train_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64) * 2 + 0.5,
            torch.rand(2, generator=g, dtype=torch.float64) + 0.5,
            torch.randn(2, generator=g, dtype=torch.float64))


def test_explicit_batch_norm_train_vjp_through_output_mean_and_var_at_once_equals_autograd_of_the_formula():
    # gradcheck pulls back one output at a time; a loss of y and of the statistics together
    # must add the three paths into dx. float64, 12 values per channel: ~1e-15 apart, 1e-10 slack.
    train = importlib.import_module("layers.batch_norm").ExplicitBatchNormTrain
    inputs = _bn_train_inputs()
    g = torch.Generator().manual_seed(1)
    cotangents = tuple(torch.randn(s, generator=g, dtype=torch.float64) for s in ((3, 2, 2, 2), (2,), (2,)))
    for used in ((0, 1), (0, 2), (0, 1, 2), (1, 2)):
        cot = tuple(c if i in used else torch.zeros_like(c) for i, c in enumerate(cotangents))
        got = vjp(lambda *a: train.apply(*a, 1e-5), *inputs)[1](cot)
        want = vjp(lambda *a: _bn_train_by_formula(*a, 1e-5), *inputs)[1](cot)
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{used}, input {i}: {m}")


@pytest.mark.parametrize("statistic", [1, 2])
def test_explicit_batch_norm_train_gives_the_affine_parameters_no_gradient_from_the_statistics_alone(statistic):
    # mean and var do not depend on weight and bias: autograd of the formula gives them None
    # (no gradient, not zeros), and the written-out backward must skip that work too.
    train = importlib.import_module("layers.batch_norm").ExplicitBatchNormTrain
    x, weight, bias = (t.requires_grad_(True) for t in _bn_train_inputs())
    got = torch.autograd.grad(train.apply(x, weight, bias, 1e-5)[statistic].sum(), (x, weight, bias),
                              allow_unused=True)
    want = torch.autograd.grad(_bn_train_by_formula(x, weight, bias, 1e-5)[statistic].sum(),
                               (x, weight, bias), allow_unused=True)
    assert want[1] is None and want[2] is None
    assert got[1] is None and got[2] is None
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
