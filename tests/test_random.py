"""Explicit random keys: determinism, independence, distributions, and torch.func compatibility."""

import math

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
