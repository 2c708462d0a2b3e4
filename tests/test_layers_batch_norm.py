"""batch_norm: torch.nn.BatchNorm{1,2}d parity (output, gradients, running stats) and the
equinox-style properties (stats move in training, stay bit-identical in eval, formula by hand)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad

import layers
from layouts import make_input as _make_input


def make_input(shape, seed, dtype, layout, values):
    """Inputs off zero mean and unit variance (normal * 2 + 0.5), or few ints (constant channels)."""
    return _make_input(shape, seed, dtype, layout, values, scale=2.0, shift=0.5)


# float64: means/variances over at most N*H*W = 3*4*4 = 48 values; ATen uses a different
# summation order (Welford), so outputs agree to ~1e-14 and 1e-10 is generous.
# float32: eps 6e-8, reductions of <= 48 O(1) values, normalised by std >= sqrt(eps); the gradient
# of the normalisation has a 1/std factor, so allow 1e-4.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
STATE_KEYS = ("running_mean", "running_var", "num_batches_tracked")


@st.composite
def bn_cases(draw):
    rank = draw(st.sampled_from([2, 3, 4]))
    n = draw(st.integers(1, 3))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(rank - 2))
    if n * (spatial[0] if spatial else 1) * (spatial[1] if rank == 4 else 1) == 1:
        n = 2                                          # one value per channel is an error case
    return dict(
        shape=(n, draw(st.integers(1, 4))) + spatial,
        affine=draw(st.booleans()), running=draw(st.booleans()), train=draw(st.booleans()),
        momentum=draw(st.one_of(st.none(), st.sampled_from([0.0, 0.1, 1.0]), st.floats(0, 1))),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])), steps=draw(st.integers(1, 3)),
        tracked=draw(st.integers(0, 5)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"])),
        values=draw(st.sampled_from(["normal", "ints"])), seed=draw(st.integers(0, 2**31 - 1)),
        impl=draw(st.sampled_from(["fast", "explicit"])))


def module_for(case):
    cls = torch.nn.BatchNorm1d if len(case["shape"]) < 4 else torch.nn.BatchNorm2d
    return cls(case["shape"][1], eps=case["eps"], momentum=case["momentum"], affine=case["affine"],
               track_running_stats=case["running"], dtype=case["dtype"])


def initial_trees(case):
    g = torch.Generator().manual_seed(case["seed"] + 7)
    c, dtype = case["shape"][1], case["dtype"]
    params = {"weight": torch.rand(c, generator=g, dtype=dtype) + 0.5,
              "bias": torch.randn(c, generator=g, dtype=dtype)} if case["affine"] else {}
    state = {"running_mean": torch.randn(c, generator=g, dtype=dtype),
             "running_var": torch.rand(c, generator=g, dtype=dtype) + 0.5,
             "num_batches_tracked": torch.tensor(case["tracked"])} if case["running"] else {}
    return params, state


@settings(deadline=None, max_examples=100)
@given(bn_cases())
def test_batch_norm_output_gradients_and_running_stats_equal_torch_batchnorm(case):
    module = module_for(case).train(case["train"])
    params, state = initial_trees(case)
    dtype = case["dtype"]
    for step in range(case["steps"]):
        x = make_input(case["shape"], case["seed"] + step, dtype, case["layout"], case["values"])
        # functional_call writes the new running stats into the buffers it is given: clone them.
        ref_state = {k: v.clone() for k, v in state.items()}
        ref_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        ref_x = x.detach().clone().requires_grad_(True)
        ref_y = functional_call(module, {**ref_params, **ref_state}, (ref_x,))
        cotangent = torch.randn(ref_y.shape, generator=torch.Generator().manual_seed(step), dtype=dtype)
        (ref_y * cotangent).sum().backward()

        def loss(p, x):
            y, new_state = layers.batch_norm(p, state, x, train=case["train"],
                                             momentum=case["momentum"], eps=case["eps"],
                                             impl=case["impl"])
            return (y * cotangent).sum(), (y, new_state)

        (g_params, g_x), (y, new_state) = grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        torch.testing.assert_close(y, ref_y.detach(), **TOL[dtype])
        torch.testing.assert_close(g_x, ref_x.grad, **TOL[dtype])
        assert set(g_params) == set(ref_params)
        for k in ref_params:
            torch.testing.assert_close(g_params[k], ref_params[k].grad, **TOL[dtype])
        assert set(new_state) == set(ref_state)
        for k in ref_state:
            torch.testing.assert_close(new_state[k], ref_state[k], **TOL[dtype])
        state = new_state


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
