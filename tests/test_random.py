"""Explicit random keys: determinism, independence, distributions, and torch.func compatibility."""

import math

import re

import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import stats

from layers import random as jr

seeds = st.integers(min_value=-(2**63), max_value=2**64 - 1)
shapes = st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple)


@settings(deadline=None, max_examples=40)
@given(seed=seeds, shape=shapes)
def test_same_key_gives_same_numbers(seed, shape):
    k = jr.key(seed)
    assert torch.equal(jr.key(seed), k)
    assert torch.equal(jr.bits(k, shape), jr.bits(k, shape))
    assert torch.equal(jr.uniform(k, shape), jr.uniform(k, shape))
    assert torch.equal(jr.normal(k, shape, dtype=torch.float64),
                       jr.normal(k, shape, dtype=torch.float64))


@settings(deadline=None, max_examples=40)
@given(seed=seeds, num=st.integers(2, 16))
def test_split_gives_distinct_keys_unlike_the_parent(seed, num):
    k = jr.key(seed)
    keys = jr.split(k, num)
    assert keys.shape == (num, 2) and keys.dtype == torch.int64
    rows = {tuple(r.tolist()) for r in keys} | {tuple(k.tolist())}
    assert len(rows) == num + 1
    assert ((keys >= 0) & (keys < 2**32)).all()


@settings(deadline=None, max_examples=30)
@given(seed=seeds, a=st.integers(0, 2**32 - 1), b=st.integers(0, 2**32 - 1))
def test_fold_in_depends_on_the_data(seed, a, b):
    k = jr.key(seed)
    fa, fb = jr.fold_in(k, a), jr.fold_in(k, b)
    assert torch.equal(fa, jr.fold_in(k, torch.tensor(a)))
    assert torch.equal(fa, fb) == (a == b)
    assert not torch.equal(fa, k)


def test_split_streams_are_uncorrelated():
    # 200k pairs: the sample correlation of independent uniforms has sd 1/sqrt(n) ~ 0.0022;
    # 6 sd gives a false-alarm rate near 2e-9.
    n = 200_000
    a, b = jr.split(jr.key(7))
    ua, ub = jr.uniform(a, (n,), dtype=torch.float64), jr.uniform(b, (n,), dtype=torch.float64)
    r = torch.corrcoef(torch.stack([ua, ub]))[0, 1].item()
    assert abs(r) < 6 / math.sqrt(n)
    # Neighbouring elements of one stream are uncorrelated too.
    r_lag = torch.corrcoef(torch.stack([ua[:-1], ua[1:]]))[0, 1].item()
    assert abs(r_lag) < 6 / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_uniform_is_in_range_and_uniform(dtype):
    u = jr.uniform(jr.key(1), (50_000,), dtype=dtype, low=-2.0, high=3.0)
    assert u.dtype == dtype
    assert u.min() >= -2.0 and u.max() < 3.0
    if dtype in (torch.float32, torch.float64):
        # Kolmogorov-Smirnov against U(-2, 3); p < 1e-6 would be a real defect, not bad luck.
        assert stats.kstest(u.double().numpy(), stats.uniform(-2, 5).cdf).pvalue > 1e-6


def test_uniform_float64_uses_53_bits():
    u = jr.uniform(jr.key(3), (10_000,), dtype=torch.float64)
    # With 24 bits every value would be a multiple of 2**-24.
    assert ((u * 2**24) % 1 != 0).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_matches_the_standard_normal(dtype):
    z = jr.normal(jr.key(2), (50_000,), dtype=dtype, mean=1.5, std=0.5)
    assert z.dtype == dtype and torch.isfinite(z).all()
    assert stats.kstest(z.double().numpy(), stats.norm(1.5, 0.5).cdf).pvalue > 1e-6


def test_truncated_normal_stays_in_bounds():
    z = jr.truncated_normal(jr.key(4), (20_000,), lower=-1.0, upper=2.0, dtype=torch.float64)
    assert z.min() >= -1.0 and z.max() <= 2.0
    assert stats.kstest(z.numpy(), stats.truncnorm(-1.0, 2.0).cdf).pvalue > 1e-6


@settings(deadline=None, max_examples=30)
@given(seed=seeds, p=st.floats(0.0, 1.0), resolution=st.sampled_from([16, 32]))
def test_bernoulli_rate_is_within_six_sigma(seed, p, resolution):
    n = 20_000
    m = jr.bernoulli(jr.key(seed), p, (n,), resolution_bits=resolution)
    assert m.dtype == torch.bool
    sigma = math.sqrt(n * p * (1 - p))
    # 16-bit draws use p rounded to a multiple of 2**-16: at most n * 2**-17 = 0.15 off in mean
    assert abs(m.sum().item() - n * p) <= 6 * sigma + 1


@pytest.mark.parametrize("resolution", [16, 32])
def test_bernoulli_extremes_are_exact(resolution):
    k = jr.key(0)
    assert not jr.bernoulli(k, 0.0, (10_001,), resolution_bits=resolution).any()
    assert jr.bernoulli(k, 1.0, (10_001,), resolution_bits=resolution).all()


@settings(deadline=None, max_examples=15)
@given(seed=seeds, p=st.floats(0.0, 1.0),
       shape=st.sampled_from([(1,), (7,), (3, 5), (2, 3, 1 << 16), ((1 << 18) + 3,)]))
def test_bernoulli_16_bit_draws_are_the_halves_of_the_hashed_words(seed, p, shape):
    # The spec: draw 2j compares the low 16 bits of word j, draw 2j + 1 its high 16 bits, with
    # threshold round(p * 2**16). Shapes past the CPU chunk (2**17 words) and odd counts included.
    k = jr.key(seed)
    n = math.prod(shape)
    words = jr.bits(k, ((n + 1) // 2,))
    halves = torch.stack([words & 0xFFFF, words >> 16], dim=-1).reshape(-1)[:n]
    expected = (halves < round(p * 65536)).reshape(shape)
    assert torch.equal(jr.bernoulli(k, p, shape, resolution_bits=16), expected)
    # a 0-d tensor p gives the same draws as the float
    got = jr.bernoulli(k, torch.tensor(p, dtype=torch.float64), shape, resolution_bits=16)
    assert torch.equal(got, halves.to(torch.float64).reshape(shape) < p * 65536)


def test_bernoulli_rejects_other_resolutions_and_vector_p_at_16_bits():
    with pytest.raises(ValueError, match="resolution_bits 16 or 32, got 8"):
        jr.bernoulli(jr.key(0), 0.5, (3,), resolution_bits=8)
    with pytest.raises(ValueError, match="takes a scalar p"):
        jr.bernoulli(jr.key(0), torch.full((3,), 0.5), (3,), resolution_bits=16)


@settings(deadline=None, max_examples=30)
@given(seed=seeds, n=st.integers(0, 300))
def test_permutation_is_a_permutation(seed, n):
    perm = jr.permutation(jr.key(seed), n)
    assert torch.equal(perm.sort().values, torch.arange(n))


@settings(deadline=None, max_examples=30)
@given(seed=seeds, low=st.integers(-1000, 1000), span=st.integers(1, 2**32))
def test_randint_stays_in_range(seed, low, span):
    r = jr.randint(jr.key(seed), (500,), low, low + span)
    assert r.dtype == torch.int64
    assert r.min() >= low and r.max() < low + span


def test_vmap_over_keys_equals_a_loop():
    keys = jr.split(jr.key(5), 4)
    batched = torch.func.vmap(lambda k: jr.uniform(k, (3, 2)))(keys)
    looped = torch.stack([jr.uniform(k, (3, 2)) for k in keys])
    assert torch.equal(batched, looped)
    folded = torch.func.vmap(jr.fold_in, in_dims=(None, 0))(jr.key(5), torch.arange(3))
    assert torch.equal(folded, torch.stack([jr.fold_in(jr.key(5), i) for i in range(3)]))


def test_grad_through_a_random_mask():
    k = jr.key(6)
    mask = jr.bernoulli(k, 0.5, (10,)).float()
    g = torch.func.grad(lambda x: (x * jr.bernoulli(k, 0.5, (10,)).float()).sum())(torch.ones(10))
    assert torch.equal(g, mask)


def test_numbers_follow_the_device_of_the_request():
    k = jr.key(8)
    assert jr.uniform(k, (3,), device="meta").device.type == "meta"


def test_bad_keys_and_seeds_are_refused():
    with pytest.raises(TypeError, match="random.split: expected a random key"):
        jr.split([1, 2])
    with pytest.raises(ValueError, match=r"random.bits: expected a random key .* got torch.float32"):
        jr.bits(torch.zeros(2), (3,))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        jr.uniform(torch.zeros(3, dtype=torch.int64), (3,))
    with pytest.raises(TypeError, match="random.key: expected an int seed, got float"):
        jr.key(1.5)
    with pytest.raises(ValueError, match="random.bernoulli: expected p in"):
        jr.bernoulli(jr.key(0), 1.5, (3,))
    with pytest.raises(ValueError, match="random.split: expected num >= 1"):
        jr.split(jr.key(0), 0)
    with pytest.raises(TypeError, match="random.fold_in: expected an integer scalar"):
        jr.fold_in(jr.key(0), torch.tensor(1.0))


# ----------------------------------------------------------------------------- formulas and arguments
# Each sampler against the formula its docstring states, bit for bit, so that a changed default,
# a dropped dtype, device or offset, or a changed branch boundary shows (mutation testing,
# docs/testing.md "Mutation score").

def _box_muller(key, n, work):
    k1, k2 = jr.split(key)
    pairs = (n + 1) // 2
    u1, u2 = jr.uniform(k1, (pairs,), dtype=work), jr.uniform(k2, (pairs,), dtype=work)
    radius, angle = torch.sqrt(-2.0 * torch.log1p(-u1)), 2.0 * math.pi * u2
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]


@settings(deadline=None, max_examples=15)
@given(seed=seeds, shape=shapes, dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       mean=st.floats(-3, 3), std=st.floats(0.1, 3))
def test_normal_is_box_muller_of_two_split_uniforms_in_the_working_precision(seed, shape, dtype, mean, std):
    key = jr.key(seed)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    z = _box_muller(key, math.prod(shape), work)
    got = jr.normal(key, shape, dtype=dtype, mean=mean, std=std)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, (z * std + mean).to(dtype).reshape(shape))
    assert torch.equal(jr.normal(key, shape, dtype=dtype), z.to(dtype).reshape(shape))  # defaults: N(0, 1)


@settings(deadline=None, max_examples=15)
@given(seed=seeds, shape=shapes, dtype=st.sampled_from([torch.float64, torch.float32]),
       lower=st.floats(-3, 0.5), width=st.floats(0.01, 4))
def test_truncated_normal_is_the_inverse_cdf_of_a_float64_uniform(seed, shape, dtype, lower, width):
    key, upper = jr.key(seed), lower + width
    cdf = lambda t: 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))  # noqa: E731
    u = jr.uniform(key, shape, dtype=torch.float64)
    z = math.sqrt(2.0) * torch.erfinv(2.0 * (cdf(lower) + u * (cdf(upper) - cdf(lower))) - 1.0)
    got = jr.truncated_normal(key, shape, lower=lower, upper=upper, dtype=dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, z.clamp(lower, upper).to(dtype))
    assert torch.equal(jr.truncated_normal(key, shape, dtype=dtype),
                       jr.truncated_normal(key, shape, lower=-2.0, upper=2.0, dtype=dtype))


def test_truncated_normal_of_a_one_point_interval_is_exactly_that_point():
    # sqrt(2) erfinv(2 cdf(t) - 1) rounds to either side of t: the clamp makes it t exactly.
    for t in torch.linspace(-1.9, 1.9, 39, dtype=torch.float64).tolist():
        got = jr.truncated_normal(jr.key(0), (4,), lower=t, upper=t, dtype=torch.float64)
        assert torch.equal(got, torch.full((4,), t, dtype=torch.float64)), t


@settings(deadline=None, max_examples=30)
@given(seed=seeds, shape=shapes, low=st.integers(-1000, 1000), offset=st.integers(0, 50),
       span=st.one_of(st.integers(1, 100), st.sampled_from([2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32]),
                      st.integers(1, 2**32)))
def test_randint_is_multiply_shift_up_to_2_31_and_modulo_above_of_the_same_words(seed, shape, low, offset, span):
    key = jr.key(seed)
    words = jr.bits(key, shape, offset=offset)
    want = ((words * span) >> 32) + low if span <= 2**31 else (words % span) + low
    assert torch.equal(jr.randint(key, shape, low, low + span, offset=offset), want)
    assert torch.equal(jr.randint(key, shape, low, low + span), jr.randint(key, shape, low, low + span, offset=0))


def test_randint_refuses_an_empty_range_and_a_range_beyond_2_32():
    k = jr.key(0)
    with pytest.raises(ValueError, match=r"random.randint: expected low < high, got \[3, 3\)"):
        jr.randint(k, (2,), 3, 3)
    with pytest.raises(ValueError, match=r"random.randint: range must be at most 2\*\*32, got 4294967297"):
        jr.randint(k, (2,), 0, 2**32 + 1)
    assert torch.equal(jr.randint(k, (5,), 0, 2**32), jr.bits(k, (5,)))   # 2**32 itself is allowed


def test_randint_of_a_2_31_range_is_the_top_31_bits_and_above_it_the_remainder():
    k = jr.key(12)
    words = jr.bits(k, (64,))
    assert torch.equal(jr.randint(k, (64,), 0, 2**31), words >> 1)   # multiply-shift up to 2**31 included
    assert torch.equal(jr.randint(k, (64,), 5, 5 + 2**31 + 1), words % (2**31 + 1) + 5)


@pytest.mark.parametrize("sample", [
    lambda k, d: jr.normal(k, (3, 2), device=d), lambda k, d: jr.normal(k, (3,), dtype=torch.float64, device=d),
    lambda k, d: jr.truncated_normal(k, (3,), device=d), lambda k, d: jr.randint(k, (3,), 0, 5, device=d),
    lambda k, d: jr.permutation(k, 5, device=d)], ids=["normal", "normal64", "truncated_normal", "randint",
                                                      "permutation"])
def test_every_sampler_puts_its_numbers_on_the_requested_device(sample):
    assert sample(jr.key(8), "meta").device.type == "meta"


def test_permutation_is_the_argsort_of_the_keys_words():
    k = jr.key(11)
    assert torch.equal(jr.permutation(k, 257), torch.argsort(jr.bits(k, (257,)), stable=True))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8, torch.int64])
def test_fold_in_of_an_integer_tensor_equals_fold_in_of_its_python_value(dtype):
    k = jr.key(4)
    for v in ([-5, -1, 0, 7, 100] if dtype != torch.uint8 else [0, 7, 200, 255]):
        assert torch.equal(jr.fold_in(k, torch.tensor(v, dtype=dtype)), jr.fold_in(k, v)), (dtype, v)


def test_fold_in_refuses_bools_floats_vectors_and_bad_keys_naming_itself():
    k = jr.key(0)
    with pytest.raises(TypeError, match="random.fold_in: expected an int, got bool"):
        jr.fold_in(k, True)
    with pytest.raises(TypeError, match="random.fold_in: expected an int, got float"):
        jr.fold_in(k, 1.5)
    with pytest.raises(TypeError, match=r"random.fold_in: expected an integer scalar, got torch.int64 tensor "
                                        r"of shape \(2,\)"):
        jr.fold_in(k, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="random.fold_in: expected a random key"):
        jr.fold_in(torch.zeros(3, dtype=torch.int64), 1)
    with pytest.raises(TypeError, match="random.normal: expected a floating dtype, got torch.int64"):
        jr.normal(k, (2,), dtype=torch.int64)


def test_the_streams_are_fixed_known_answers_for_key_split_fold_in_and_bits():
    # A saved run replays its dropout masks and data order only if the generator never changes:
    # these words pin the hash, the domain separators and which key word goes where.
    k = jr.key(2026)
    assert k.tolist() == [3948203504, 3956555240]
    assert jr.fold_in(k, 7).tolist() == [2904715508, 279548008]
    assert jr.fold_in(k, 2**32 + 7).tolist() == [2904715508, 279548008]   # data modulo 2**32
    assert jr.split(k, 2).tolist() == [[2138590413, 3400565648], [2421630477, 294685074]]
    assert jr.bits(k, (3,)).tolist() == [3529247404, 153677777, 3184669356]


def test_fold_in_keeps_the_keys_device():
    assert jr.fold_in(jr.key(3, device="meta"), 5).device.type == "meta"
    assert jr.fold_in(jr.key(3, device="meta"), torch.tensor(5, device="meta")).device.type == "meta"


# ----------------------------------------------------------------------------- bernoulli, bit for bit
# The docstring's rule at both resolutions: element i is bits[i] < round(p * 2**32), or the i-th
# 16-bit half < round(p * 2**16); a tensor p compares in float64; offset skips that many draws.

@settings(deadline=None, max_examples=20)
@given(seed=seeds, p=st.floats(0.0, 1.0), shape=shapes, offset=st.integers(0, 50))
def test_bernoulli_32_bit_draws_compare_the_words_from_offset_with_round_p_times_2_32(seed, p, shape, offset):
    k = jr.key(seed)
    words = jr.bits(k, shape, offset=offset)
    got = jr.bernoulli(k, p, shape, offset=offset)
    assert got.dtype == torch.bool and torch.equal(got, words < round(p * 2**32))
    # a tensor p broadcasts against the shape and compares in float64 (exact for 32-bit words)
    p_last = torch.linspace(0.0, 1.0, shape[-1] if shape else 1, dtype=torch.float64).reshape(shape[-1:])
    expected = words.to(torch.float64) < p_last * 2**32
    assert torch.equal(jr.bernoulli(k, p_last, shape, offset=offset), expected)


@settings(deadline=None, max_examples=20)
@given(seed=seeds, p=st.floats(0.0, 1.0), shape=shapes, offset=st.integers(0, 50),
       resolution=st.sampled_from([16, 32]))
def test_bernoulli_with_an_offset_is_the_tail_of_the_longer_draw(seed, p, shape, offset, resolution):
    # Odd and even offsets: at 16 bits an odd offset starts in the high half of a word.
    k = jr.key(seed)
    n = math.prod(shape)
    whole = jr.bernoulli(k, p, (offset + n,), resolution_bits=resolution)
    got = jr.bernoulli(k, p, shape, resolution_bits=resolution, offset=offset)
    assert torch.equal(got, whole[offset:].reshape(shape))


def test_bernoulli_thresholds_are_exact_a_word_equal_to_p_times_2_32_is_not_drawn():
    # p = w / 2**32 for the stream's largest word w (above 2**31, where a scale of 2**32 + 1
    # would round the threshold up to w + 1): every word below w is True, w itself False.
    k = jr.key(17)
    words = jr.bits(k, (64,))
    w = int(words.max())
    assert w > 2**31
    for p in (w / 2**32, torch.tensor(w / 2**32, dtype=torch.float64)):
        got = jr.bernoulli(k, p, (64,))
        assert torch.equal(got, words < w) and not got[words.argmax()]
    assert jr.bernoulli(k, (w + 1) / 2**32, (64,)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("resolution", [16, 32])
def test_bernoulli_of_a_half_precision_tensor_p_compares_in_float64(dtype, resolution):
    # p * 2**32 in float16 is inf, and an int64 word against a 0-d half tensor compares in half
    # precision (a bfloat16 ulp near 3 * 2**30 is 2**24): either would be a different rule.
    k = jr.key(3)
    p = torch.tensor(0.75, dtype=dtype)
    n = 1 << 14
    words = jr.bits(k, ((n + 1) // 2,)) if resolution == 16 else jr.bits(k, (n,))
    draws = (torch.stack([words & 0xFFFF, words >> 16], dim=-1).reshape(-1)[:n]
             if resolution == 16 else words)
    threshold = 0.75 * 2**resolution
    if dtype != torch.float32:   # the draws include some that half precision rounds up onto the threshold
        assert ((draws < threshold) & (draws.to(dtype) >= threshold)).any()
    assert torch.equal(jr.bernoulli(k, p, (n,), resolution_bits=resolution), draws < threshold)


@pytest.mark.parametrize("resolution", [16, 32])
def test_bernoulli_puts_its_bool_draws_on_the_requested_device(resolution):
    got = jr.bernoulli(jr.key(8), 0.5, (3, 2), device="meta", resolution_bits=resolution)
    assert got.device.type == "meta" and got.dtype == torch.bool and got.shape == (3, 2)


def test_bernoulli_refusals_name_it_and_say_what_was_asked():
    k = jr.key(0)
    assert jr.bernoulli(k, 1.0, (1,), resolution_bits=16, offset=2**33 - 2).tolist() == [True]  # the last draw
    with pytest.raises(ValueError, match=r"^random\.bernoulli: at most 2\*\*33 draws at 16 bits per key, "
                                         r"asked for 8589934592; split the key$"):
        jr.bernoulli(k, 0.5, (2,), resolution_bits=16, offset=2**33 - 2)
    with pytest.raises(ValueError, match=r"^random\.bernoulli: expected offset a whole number >= 0, got -1$"):
        jr.bernoulli(k, 0.5, (2,), resolution_bits=16, offset=-1)
    with pytest.raises(ValueError, match=r"^random\.bernoulli: expected a random key .* got torch.float32"):
        jr.bernoulli(torch.zeros(2), 0.5, (3,), resolution_bits=16)
    with pytest.raises(ValueError, match=r"^random\.bernoulli: resolution_bits=16 takes a scalar p, got a "
                                         r"tensor of shape \(3,\)$"):
        jr.bernoulli(k, torch.full((3,), 0.5), (3,), resolution_bits=16)
    with pytest.raises(ValueError, match=r"^random\.bernoulli: expected p in \[0, 1\], got -0.5$"):
        jr.bernoulli(k, -0.5, (3,), resolution_bits=16)


# ----------------------------------------------------------------------------- uniform, bit for bit
_BELOW_ONE = {torch.float16: 1 - 2**-11, torch.bfloat16: 1 - 2**-8, torch.float32: 1 - 2**-24}   # largest value < 1


def _uniform_formula(key, shape, dtype):
    """uniform's docstring: 53 bits of two words for float64, else 24 bits of one, kept below 1."""
    if dtype == torch.float64:
        w = jr.bits(key, (2,) + shape)
        return ((w[0] >> 5) * 2**26 + (w[1] >> 6)).to(torch.float64) * 2.0**-53
    u = (jr.bits(key, shape) >> 8).to(torch.float32) * 2.0**-24
    return u.to(dtype).clamp_max(_BELOW_ONE[dtype])


_UNIFORM_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@settings(deadline=None, max_examples=30)
@given(seed=seeds, shape=shapes, dtype=st.sampled_from(_UNIFORM_DTYPES), low=st.floats(-4, 4), high=st.floats(-4, 4))
def test_uniform_is_its_documented_bit_formula_scaled_to_low_high(seed, shape, dtype, low, high):
    _check_uniform_formula(jr.key(seed), shape, dtype, low, high)


# The bounds next to the unscaled [0, 1) (where uniform skips the scaling), and a one-point interval.
@pytest.mark.parametrize("low,high", [(0.0, 1.0), (0.0, 2.0), (0.5, 1.0), (-1.0, 1.0), (1.0, 1.0), (-2.0, 3.0)])
@pytest.mark.parametrize("dtype", _UNIFORM_DTYPES, ids=str)
def test_uniform_is_its_bit_formula_for_bounds_next_to_the_unit_interval(dtype, low, high):
    _check_uniform_formula(jr.key(13), (3, 4), dtype, low, high)


def _check_uniform_formula(key, shape, dtype, low, high):
    u = _uniform_formula(key, shape, dtype)
    got = jr.uniform(key, shape, dtype=dtype, low=low, high=high)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, u * (high - low) + low)
    assert torch.equal(jr.uniform(key, shape, dtype=dtype), u)   # defaults: [0, 1)
    if low == high:   # a one-point interval is that point
        assert torch.equal(got, torch.full(shape, low, dtype=dtype))


def test_uniform_takes_an_int_a_tuple_or_a_size_as_shape_and_defaults_to_a_scalar():
    k = jr.key(9)
    want = jr.uniform(k, (5,))
    assert torch.equal(jr.uniform(k, 5), want) and torch.equal(jr.uniform(k, torch.Size([5])), want)
    assert jr.uniform(k).shape == () and torch.equal(jr.uniform(k), want[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_uniform_reaches_the_largest_value_below_one_and_never_one(dtype):
    # 24-bit u rounds up to 1 in half precision (P = 2**-12 for float16, 2**-9 for bfloat16) and is
    # clamped to the largest value below 1; with 50k draws that value occurs (expected 30+ times).
    u = jr.uniform(jr.key(1), (50_000,), dtype=dtype)
    assert u.max().item() == _BELOW_ONE[dtype]
    assert torch.equal(u, _uniform_formula(jr.key(1), (50_000,), dtype))


def test_float64_uniform_takes_two_words_per_number_so_a_key_gives_2_31_of_them():
    k = jr.key(0)   # meta: the size check runs, nothing is allocated
    assert jr.uniform(k, (2**31 - 1,), dtype=torch.float64, device="meta").shape == (2**31 - 1,)
    with pytest.raises(ValueError, match=r"^random\.bits: at most 2\*\*32 numbers per key, asked for 4294967296; "
                                         r"split the key$"):
        jr.uniform(k, (2**31,), dtype=torch.float64, device="meta")


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float16, torch.float64])
def test_uniform_does_not_depend_on_torchs_default_dtype(default):
    # "the numbers depend only on the key, the shape and the dtype" (module docstring)
    k = jr.key(5)
    want = {dt: jr.uniform(k, (1000,), dtype=dt) for dt in _BELOW_ONE}
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(default)
        got = {dt: jr.uniform(k, (1000,), dtype=dt) for dt in _BELOW_ONE}
    finally:
        torch.set_default_dtype(old)
    assert all(torch.equal(got[dt], want[dt]) for dt in want)


def test_uniform_refuses_a_non_floating_dtype_naming_it():
    with pytest.raises(TypeError, match=r"^random\.uniform: expected a floating dtype, got torch\.int64$"):
        jr.uniform(jr.key(0), (2,), dtype=torch.int64)
    with pytest.raises(TypeError, match=r"^random\.uniform: expected a floating dtype, got torch\.bool$"):
        jr.uniform(jr.key(0), (2,), dtype=torch.bool)


def test_split_keeps_the_keys_device():
    keys = jr.split(jr.key(3, device="meta"), 3)
    assert keys.device.type == "meta" and keys.shape == (3, 2) and keys.dtype == torch.int64


def test_bits_offset_skips_words_and_the_stream_ends_at_2_32_words():
    key = jr.key(11)
    whole = jr.bits(key, (7,))
    assert torch.equal(jr.bits(key, (3,), offset=2), whole[2:5]) and torch.equal(jr.bits(key, (2, 2), offset=3),
                                                                                  whole[3:].reshape(2, 2))
    last = jr.bits(key, (1,), offset=2**32 - 2)   # the last word a key gives (its counter 2**32 - 2)
    assert last.shape == (1,) and 0 <= int(last) < 2**32
    for shape, offset, asked in (((2,), 2**32 - 2, 2**32), ((1,), 2**32 - 1, 2**32), ((2**31, 2), 0, 2**32)):
        with pytest.raises(ValueError, match=rf"^random.bits: at most 2\*\*32 numbers per key, asked for {asked}; "
                                             r"split the key$"):
            jr.bits(key, shape, offset=offset, device="meta")


def test_bits_on_the_cpu_hash_in_cache_sized_chunks_and_elsewhere_at_once(monkeypatch):
    # a performance property (layers/random.py, _hashed): a CPU request longer than _CHUNK words
    # is hashed chunk by chunk; another device hashes it in one pass. Same words either way.
    key, n = jr.key(2), 2 * jr._CHUNK + 5
    sizes, real = [], jr._hash
    monkeypatch.setattr(jr, "_hash", lambda k0, k1, counters: sizes.append(counters.numel()) or real(k0, k1, counters))
    words = jr.bits(key, (n,))
    assert sizes == [jr._CHUNK, jr._CHUNK, 5]
    sizes.clear()
    assert jr.bits(key, (n,), device="meta").device.type == "meta" and sizes == [n]
    sizes.clear()
    assert torch.equal(jr.bits(key, (jr._CHUNK,)), words[:jr._CHUNK]) and sizes == [jr._CHUNK]
    assert torch.equal(jr.bits(key, (5,), offset=2 * jr._CHUNK), words[-5:])


def test_a_seed_is_taken_modulo_2_64_and_every_one_of_its_64_bits_makes_another_key():
    assert torch.equal(jr.key(2**64), jr.key(0)) and torch.equal(jr.key(-1), jr.key(2**64 - 1))
    assert torch.equal(jr.key(2**64 + 5), jr.key(5))
    keys = {tuple(jr.key(1 << b).tolist()) for b in range(64)} | {tuple(jr.key(0).tolist())}
    assert len(keys) == 65   # the high word is the seed's top 32 bits, not fewer


def test_an_offset_must_be_a_whole_number_of_words():
    key = jr.key(0)
    for bad in (True, 1.5, -1):
        for call, where in ((lambda o: jr.bits(key, (2,), offset=o), "random.bits"),
                            (lambda o: jr.bernoulli(key, 0.5, (2,), resolution_bits=16, offset=o), "random.bernoulli")):
            with pytest.raises(ValueError, match=rf"^{where}: expected offset a whole number >= 0, got "
                                                 rf"{re.escape(repr(bad))}$"):
                call(bad)
