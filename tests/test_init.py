"""Initialisers: shapes and names as torch.nn, bounds and distributions as torch.nn.init."""

import inspect
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import stats

from layers import init, random as jr


@settings(deadline=None, max_examples=30)
@given(cin=st.integers(1, 16), cout=st.integers(1, 16), k=st.integers(1, 5),
       groups=st.sampled_from([1, 2, 4]), bias=st.booleans(),
       scheme=st.sampled_from(init.SCHEMES))
def test_conv2d_params_have_the_shapes_and_names_of_nn_conv2d(cin, cout, k, groups, bias, scheme):
    cin, cout = cin * groups, cout * groups
    ref = torch.nn.Conv2d(cin, cout, k, groups=groups, bias=bias)
    ours = init.conv2d_params(jr.key(0), cin, cout, k, groups=groups, bias=bias, scheme=scheme)
    assert set(ours) == set(ref.state_dict())
    assert {n: t.shape for n, t in ours.items()} == {n: t.shape for n, t in ref.state_dict().items()}


@settings(deadline=None, max_examples=20)
@given(fin=st.integers(1, 64), fout=st.integers(1, 64), bias=st.booleans())
def test_linear_params_have_the_shapes_and_names_of_nn_linear(fin, fout, bias):
    ref = torch.nn.Linear(fin, fout, bias=bias)
    ours = init.linear_params(jr.key(1), fin, fout, bias=bias, dtype=torch.float64)
    assert {n: t.shape for n, t in ours.items()} == {n: t.shape for n, t in ref.state_dict().items()}
    assert all(t.dtype == torch.float64 for t in ours.values())


def test_same_key_same_params_and_different_keys_differ():
    a = init.conv2d_params(jr.key(3), 8, 16, 3)
    b = init.conv2d_params(jr.key(3), 8, 16, 3)
    c = init.conv2d_params(jr.key(4), 8, 16, 3)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["weight"], c["weight"])


def _ks(sample, dist):
    return stats.kstest(sample.double().flatten().numpy(), dist.cdf).pvalue


def test_torch_default_matches_nn_linear_bounds_and_distribution():
    fin, fout = 300, 200
    ours = init.linear_params(jr.key(5), fin, fout)
    bound = 1 / math.sqrt(fin)  # kaiming_uniform(a=sqrt(5)) reduces to this, as nn.Linear's
    ref = torch.nn.Linear(fin, fout)
    assert ref.weight.abs().max() <= bound and ours["weight"].abs().max() <= bound
    # KS against U(-b, b): p below 1e-6 means the distribution is wrong, not unlucky.
    assert _ks(ours["weight"], stats.uniform(-bound, 2 * bound)) > 1e-6
    assert ours["bias"].abs().max() <= bound


@pytest.mark.parametrize("scheme,dist", [
    ("xavier_uniform", lambda fi, fo: stats.uniform(-math.sqrt(6 / (fi + fo)),
                                                    2 * math.sqrt(6 / (fi + fo)))),
    ("xavier_normal", lambda fi, fo: stats.norm(0, math.sqrt(2 / (fi + fo)))),
    ("kaiming_uniform", lambda fi, fo: stats.uniform(-math.sqrt(6 / fi), 2 * math.sqrt(6 / fi))),
    ("kaiming_normal", lambda fi, fo: stats.norm(0, math.sqrt(2 / fi))),
])
def test_schemes_draw_from_their_documented_distribution(scheme, dist):
    cin, cout, k = 64, 128, 3
    options = {"nonlinearity": "relu"} if scheme.startswith("kaiming") else {}
    ours = init.conv2d_params(jr.key(6), cin, cout, k, scheme=scheme, **options)
    fan_in, fan_out = cin * k * k, cout * k * k
    assert _ks(ours["weight"], dist(fan_in, fan_out)) > 1e-6
    assert torch.equal(ours["bias"], torch.zeros(cout))


def test_kaiming_fan_out_and_gain_follow_torch():
    shape = (64, 32, 3, 3)
    w = init.kaiming_normal(jr.key(7), shape, mode="fan_out", nonlinearity="relu")
    ref = torch.nn.init.kaiming_normal_(torch.empty(shape), mode="fan_out", nonlinearity="relu")
    # Both estimate std = sqrt(2 / fan_out); 18k samples give a relative sd near 0.5%.
    expected = math.sqrt(2 / (64 * 9))
    assert abs(w.std().item() / expected - 1) < 0.03
    assert abs(ref.std().item() / expected - 1) < 0.03


def test_fan_in_and_fan_out_equal_torch():
    for shape in [(5, 3), (8, 4, 3, 3), (2, 6, 1, 7)]:
        ref = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
        assert init.fan_in_and_fan_out(shape) == ref


def test_batch_norm_params_and_state_equal_nn_batchnorm():
    ref = torch.nn.BatchNorm2d(6).state_dict()
    ours = {**init.batch_norm_params(6), **init.batch_norm_state(6)}
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[n], ref[n]) and ours[n].dtype == ref[n].dtype for n in ref)
    assert init.batch_norm_params(6, affine=False) == {}
    assert init.batch_norm_state(6, track_running_stats=False) == {}


def test_bad_init_arguments_are_refused():
    with pytest.raises(ValueError, match="init: expected scheme in"):
        init.linear_params(jr.key(0), 3, 4, scheme="orthogonal")
    with pytest.raises(ValueError, match="groups=3 must divide in_channels=4"):
        init.conv2d_params(jr.key(0), 4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="expected mode 'fan_in' or 'fan_out'"):
        init.kaiming_uniform(jr.key(0), (3, 3), mode="fan_avg")
    with pytest.raises(ValueError, match="expected positive sizes"):
        init.linear_params(jr.key(0), 0, 4)
    with pytest.raises(TypeError, match="init: expected a random key"):
        init.linear_params(123, 3, 4)


# ----------------------------------------------------------------------------- formulas, bit for bit
# Each scheme equals the layers.random draw its docstring's formula names (torch.nn.init's bound
# or std), with the requested dtype and device: a changed default, a dropped argument or a
# changed branch shows (docs/testing.md, "Mutation score").

def test_calculate_gain_defaults_to_torchs_leaky_relu_gain():
    assert init.calculate_gain() == torch.nn.init.calculate_gain("leaky_relu") == math.sqrt(2 / (1 + 0.01 ** 2))
    assert init.calculate_gain("leaky_relu", 0.2) == torch.nn.init.calculate_gain("leaky_relu", 0.2)


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), shape=st.lists(st.integers(1, 5), min_size=2, max_size=4).map(tuple),
       a=st.sampled_from([0.0, 0.2, math.sqrt(5)]), mode=st.sampled_from(["fan_in", "fan_out"]),
       nonlinearity=st.sampled_from(["leaky_relu", "relu", "tanh"]), gain=st.floats(0.5, 2.0),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_every_scheme_is_its_documented_draw_in_the_requested_dtype(seed, shape, a, mode, nonlinearity, gain, dtype):
    key = jr.key(seed)
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    fan = fan_in if mode == "fan_in" else fan_out
    k_gain = torch.nn.init.calculate_gain(nonlinearity, a)
    b = k_gain * math.sqrt(3.0 / fan)
    cases = [
        (init.kaiming_uniform(key, shape, a=a, mode=mode, nonlinearity=nonlinearity, dtype=dtype),
         jr.uniform(key, shape, dtype=dtype, low=-b, high=b)),
        (init.kaiming_normal(key, shape, a=a, mode=mode, nonlinearity=nonlinearity, dtype=dtype),
         jr.normal(key, shape, dtype=dtype, std=k_gain / math.sqrt(fan))),
        (init.xavier_uniform(key, shape, gain=gain, dtype=dtype),
         jr.uniform(key, shape, dtype=dtype, low=-gain * math.sqrt(6 / (fan_in + fan_out)),
                    high=gain * math.sqrt(6 / (fan_in + fan_out)))),
        (init.xavier_normal(key, shape, gain=gain, dtype=dtype),
         jr.normal(key, shape, dtype=dtype, std=gain * math.sqrt(2 / (fan_in + fan_out)))),
        (init.torch_default_weight(key, shape, dtype=dtype),   # kaiming uniform with a = sqrt(5)
         jr.uniform(key, shape, dtype=dtype, low=-torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
                    * math.sqrt(3.0 / fan_in), high=torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
                    * math.sqrt(3.0 / fan_in))),
    ]
    for i, (got, want) in enumerate(cases):
        assert got.dtype == dtype and got.shape == shape, i
        assert torch.equal(got, want), i
    # the defaults are torch's: a = 0, mode fan_in, leaky_relu (gain sqrt(2 / 1.0001))
    g0 = torch.nn.init.calculate_gain("leaky_relu", 0)
    assert torch.equal(init.kaiming_uniform(key, shape),
                       jr.uniform(key, shape, low=-g0 * math.sqrt(3 / fan_in), high=g0 * math.sqrt(3 / fan_in)))
    assert torch.equal(init.kaiming_normal(key, shape), jr.normal(key, shape, std=g0 / math.sqrt(fan_in)))


@pytest.mark.parametrize("fan_in", [0, 1, 2, 300])
def test_torch_default_bias_is_uniform_in_plus_minus_one_over_sqrt_fan_in_and_zero_without_inputs(fan_in):
    # nn.Linear.reset_parameters: bound = 1 / sqrt(fan_in) if fan_in > 0 else 0
    key = jr.key(fan_in)
    for dtype in (torch.float32, torch.float64):
        got = init.torch_default_bias(key, fan_in, 7, dtype=dtype)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        assert got.dtype == dtype
        assert torch.equal(got, jr.uniform(key, (7,), dtype=dtype, low=-bound, high=bound))
    if fan_in == 0:
        assert torch.equal(init.torch_default_bias(key, 0, 7), torch.zeros(7))


@pytest.mark.parametrize("draw", [
    lambda k, d: init.xavier_uniform(k, (4, 3), device=d), lambda k, d: init.xavier_normal(k, (4, 3), device=d),
    lambda k, d: init.kaiming_uniform(k, (4, 3), device=d), lambda k, d: init.kaiming_normal(k, (4, 3), device=d),
    lambda k, d: init.torch_default_weight(k, (4, 3), device=d), lambda k, d: init.torch_default_bias(k, 3, 4, device=d),
    lambda k, d: init.conv2d_params(k, 2, 4, 3, device=d)["bias"],
    lambda k, d: init.linear_params(k, 2, 4, scheme="normal", device=d)["weight"],
], ids=["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "torch_default_weight",
        "torch_default_bias", "conv2d_params", "linear_params"])
def test_every_initialiser_puts_its_tensors_on_the_requested_device(draw):
    assert draw(jr.key(2), "meta").device.type == "meta"


# ----------------------------------------------------------------------------- schemes through the layer params
# linear_params / conv2d_params hand the key's first split to the weight scheme, with the options,
# dtype and device they were given, and the second to torch's default bias (zero bias otherwise).

_SCHEME_DRAWS = {   # scheme -> (its function, options that differ from every default)
    "torch_default": (init.torch_default_weight, {}),
    "xavier_uniform": (init.xavier_uniform, {"gain": 2.0}),
    "xavier_normal": (init.xavier_normal, {"gain": 0.5}),
    "kaiming_uniform": (init.kaiming_uniform, {"a": 0.2, "mode": "fan_out", "nonlinearity": "leaky_relu"}),
    "kaiming_normal": (init.kaiming_normal, {"mode": "fan_out", "nonlinearity": "tanh"}),
    "normal": (jr.normal, {"std": 0.01}),
}


def _torch_reference(scheme, shape, options):
    """torch.nn.init's own draw for a scheme (and its documented bound or std) on ``shape``."""
    w = torch.empty(shape, dtype=torch.float64)
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(w)
    if scheme == "torch_default":     # nn.Linear / nn.Conv2d reset_parameters
        return torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5)), 1 / math.sqrt(fan_in)
    if scheme == "xavier_uniform":
        return torch.nn.init.xavier_uniform_(w, **options), options["gain"] * math.sqrt(6 / (fan_in + fan_out))
    if scheme == "xavier_normal":
        return torch.nn.init.xavier_normal_(w, **options), options["gain"] * math.sqrt(2 / (fan_in + fan_out))
    gain = torch.nn.init.calculate_gain(options.get("nonlinearity", "leaky_relu"), options.get("a", 0))
    fan = fan_out if options.get("mode") == "fan_out" else fan_in
    if scheme == "kaiming_uniform":
        return torch.nn.init.kaiming_uniform_(w, **options), gain * math.sqrt(3 / fan)
    if scheme == "kaiming_normal":
        return torch.nn.init.kaiming_normal_(w, **options), gain / math.sqrt(fan)
    return torch.nn.init.normal_(w, **options), options["std"]


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
@pytest.mark.parametrize("scheme", init.SCHEMES)
def test_layer_params_are_the_schemes_draw_with_its_options_and_dtype_and_match_torch_nn_init(scheme, layer):
    fn, options = _SCHEME_DRAWS[scheme]
    key, dtype = jr.key(21), torch.float64
    if layer == "linear":
        shape = (96, 160)
        got = init.linear_params(key, 160, 96, scheme=scheme, dtype=dtype, **options)
    else:
        shape = (48, 16, 3, 5)
        got = init.conv2d_params(key, 32, 48, (3, 5), groups=2, scheme=scheme, dtype=dtype, **options)
    k_weight, k_bias = jr.split(key)
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    want_bias = (init.torch_default_bias(k_bias, fan_in, shape[0], dtype=dtype) if scheme == "torch_default"
                 else torch.zeros(shape[0], dtype=dtype))
    assert set(got) == {"weight", "bias"}
    assert got["weight"].dtype == got["bias"].dtype == dtype
    assert torch.equal(got["weight"], fn(k_weight, shape, dtype=dtype, **options))
    assert torch.equal(got["bias"], want_bias)
    if scheme == "torch_default":   # a real draw in +-1/sqrt(fan_in), not zeros
        assert got["bias"].abs().max() <= 1 / math.sqrt(fan_in) and (got["bias"] != 0).all()
    # Against torch.nn.init's own draw on the same shape (15k samples or more): a uniform scheme
    # stays inside its bound and reaches it within 1% (P(max < 0.99 b) = 0.99**n, negligible);
    # a normal scheme's std is within 3% (the estimate's relative sd is 1/sqrt(2n) < 0.6%).
    ref, scale = _torch_reference(scheme, shape, options)
    for w in (got["weight"], ref):
        if scheme.endswith("normal"):
            assert abs(w.std().item() / scale - 1) < 0.03
        else:
            assert 0.99 * scale <= w.abs().max().item() <= scale


@pytest.mark.parametrize("scheme", init.SCHEMES)
def test_layer_params_of_every_scheme_are_made_on_the_requested_device_and_dtype(scheme):
    _, options = _SCHEME_DRAWS[scheme]
    for params in (init.linear_params(jr.key(2), 3, 4, scheme=scheme, dtype=torch.float64, device="meta", **options),
                   init.conv2d_params(jr.key(2), 2, 4, 3, scheme=scheme, dtype=torch.float64, device="meta",
                                      **options)):
        assert set(params) == {"weight", "bias"}
        assert all(t.device.type == "meta" and t.dtype == torch.float64 for t in params.values()), scheme


def test_options_a_scheme_does_not_take_are_refused_not_ignored():
    # torch_default is nn.Linear's fixed rule: a gain given to it would be silently lost.
    with pytest.raises(TypeError, match=r"^init: scheme 'torch_default' takes options \[\], got \['gain'\]$"):
        init.linear_params(jr.key(0), 3, 4, gain=2.0)
    with pytest.raises(TypeError, match=r"^init: scheme 'xavier_uniform' takes options \['gain'\], "
                                        r"got \['a', 'std'\]$"):
        init.conv2d_params(jr.key(0), 3, 4, 3, scheme="xavier_uniform", std=2.0, a=1.0, gain=2.0)
    for scheme, options in init.SCHEME_OPTIONS.items():   # the table is each scheme's signature
        fn = {"normal": jr.normal, "torch_default": init.torch_default_weight}.get(scheme) or getattr(init, scheme)
        takes = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
        assert takes - {"dtype", "device"} == set(options), scheme


def test_fan_in_and_fan_out_refuse_a_weight_below_two_dims_naming_its_shape():
    with pytest.raises(ValueError, match=r"^init\.fan_in_and_fan_out: expected a weight of at least 2 dims, "
                                         r"got shape \(5,\)$"):
        init.fan_in_and_fan_out((5,))
    with pytest.raises(ValueError, match=r"^init\.fan_in_and_fan_out: expected a weight of at least 2 dims, "
                                         r"got shape \(\)$"):
        init.xavier_uniform(jr.key(0), ())


def test_conv2d_params_count_channels_per_group_as_exact_integers():
    # (2**54 + 2) / 2 is not a float64 number: the weight's element count, named by the refusal,
    # must be the exact 2 * (2**53 + 1) (checked before anything is allocated).
    with pytest.raises(ValueError, match=r"^random\.bits: at most 2\*\*32 numbers per key, asked for "
                                         r"18014398509481986; split the key$"):
        init.conv2d_params(jr.key(0), 2**54 + 2, 2, 1, groups=2)
