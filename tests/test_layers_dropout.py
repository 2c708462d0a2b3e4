"""dropout: a Bernoulli(1 - p) mask drawn from the key, survivors scaled by 1 / (1 - p)."""
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad

import layers
from layers import random as jr
from layers.parallel import BatchAxis, batch_axis, row_offset
from layers._checks import check_probability
from layers.testing import IMPLS, custom_backward_nodes, dtypes, seeds


@settings(deadline=None, max_examples=40)
@given(p=st.floats(0.0, 1.0), seed=seeds(), impl=st.sampled_from(IMPLS),
       dtype=dtypes())
def test_dropout_output_is_mask_times_x_over_keep_prob_and_formulations_agree(p, seed, impl, dtype):
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    key = jr.key(seed)
    y = layers.dropout(x, p=p, train=True, key=key, impl=impl)
    other = layers.dropout(x, p=p, train=True, key=key, impl="explicit" if impl == "fast" else "fast")
    # x * (1 / keep) versus x / keep: one rounding apart at most (dtype eps relative).
    torch.testing.assert_close(y, other, rtol=2 * torch.finfo(dtype).eps, atol=0)
    if p == 0.0:
        assert torch.equal(y, x)
        return
    keep = jr.bernoulli(key, 1.0 - p, x.shape, resolution_bits=16)
    expect = torch.where(keep, x / (1.0 - p), torch.zeros((), dtype=dtype)) if p < 1 else torch.zeros_like(x)
    torch.testing.assert_close(y, expect, rtol=2 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_same_key_gives_same_mask(impl):
    x = torch.ones(1000, dtype=torch.float64)
    a = layers.dropout(x, p=0.3, train=True, key=jr.key(5), impl=impl)
    b = layers.dropout(x, p=0.3, train=True, key=jr.key(5), impl=impl)
    assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_different_keys_give_different_masks(impl):
    x = torch.ones(1000, dtype=torch.float64)
    k1, k2 = jr.split(jr.key(5))
    a = layers.dropout(x, p=0.3, train=True, key=k1, impl=impl)
    b = layers.dropout(x, p=0.3, train=True, key=k2, impl=impl)
    assert not torch.equal(a == 0, b == 0)


@settings(deadline=None, max_examples=25)
@given(p=st.floats(0.05, 0.95), seed=seeds(), impl=st.sampled_from(IMPLS))
def test_dropout_keep_rate_within_six_sigma_of_one_minus_p(p, seed, impl):
    n = 100_000
    y = layers.dropout(torch.ones(n, dtype=torch.float64), p=p, train=True, key=jr.key(seed), impl=impl)
    kept = int((y != 0).sum())
    # kept ~ Binomial(n, 1 - p): a 6-sigma band fails by chance with probability ~2e-9.
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) <= 6 * sigma
    torch.testing.assert_close(y[y != 0], torch.full((kept,), 1 / (1 - p), dtype=torch.float64),
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("p", [0.25, 0.5, 0.9])
def test_dropout_gradient_equals_mask_over_keep_prob(impl, p):
    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    key = jr.key(11)
    g = grad(lambda x: layers.dropout(x, p=p, train=True, key=key, impl=impl).sum())(x)
    mask = jr.bernoulli(key, 1 - p, x.shape, resolution_bits=16).to(torch.float64)
    torch.testing.assert_close(g, mask / (1 - p), rtol=1e-15, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_p_one_gives_zeros_and_zero_gradient_without_nan(impl):
    x = torch.tensor([1.0, -2.0, 0.0, 1e308, float("inf"), float("nan")], dtype=torch.float64)
    y = layers.dropout(x, p=1.0, train=True, key=jr.key(0), impl=impl)
    assert torch.equal(y, torch.zeros_like(x))
    g = grad(lambda x: layers.dropout(x, p=1.0, train=True, key=jr.key(0), impl=impl).sum())(x)
    assert torch.equal(g, torch.zeros_like(x))


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_eval_and_p_zero_are_the_identity(impl):
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layers.dropout(x, p=0.5, train=False, impl=impl), x)      # no key needed
    assert torch.equal(layers.dropout(x, p=0.0, train=True, impl=impl), x)
    g = grad(lambda x: layers.dropout(x, p=0.5, train=False, impl=impl).sum())(x)
    assert torch.equal(g, torch.ones_like(x))


def test_dropout_rejects_p_outside_unit_interval():
    with pytest.raises(ValueError, match=r"dropout: expected p in \[0, 1\], got 1.5"):
        layers.dropout(torch.ones(3), p=1.5, train=True, key=jr.key(0))
    with pytest.raises(ValueError, match=r"dropout: expected p in \[0, 1\], got -0.1"):
        layers.dropout(torch.ones(3), p=-0.1, train=False)
    with pytest.raises(TypeError, match=r"dropout: expected p to be a float in \[0, 1\], got '0.5'"):
        layers.dropout(torch.ones(3), p="0.5", train=False)


def test_dropout_rejects_missing_key_while_training():
    with pytest.raises(ValueError, match=r"dropout: expected a random key .*when train=True and "
                                         r"p=0.5 > 0, got key=None"):
        layers.dropout(torch.ones(3), p=0.5, train=True)


def test_dropout_rejects_malformed_key_and_train_flag():
    with pytest.raises(ValueError, match=r"dropout: expected a random key"):
        layers.dropout(torch.ones(3), p=0.5, train=True, key=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"dropout: expected a random key .*got int"):
        layers.dropout(torch.ones(3), p=0.5, train=True, key=0)
    with pytest.raises(TypeError, match=r"dropout: expected train to be a bool, got 'yes'"):
        layers.dropout(torch.ones(3), p=0.5, train="yes")


def test_dropout_refuses_a_non_tensor_input_and_an_unknown_impl_naming_itself():
    with pytest.raises(TypeError, match=r"^dropout: expected input to be a torch\.Tensor, got list$"):
        layers.dropout([1.0, 2.0], p=0.5, train=True, key=jr.key(0))
    with pytest.raises(ValueError, match=r"^dropout: expected impl to be one of \('fast', 'explicit'\), "
                                         r"got 'slow'$"):
        layers.dropout(torch.ones(3), p=0.5, train=True, key=jr.key(0), impl="slow")


def test_dropout_runs_the_formulation_asked_for():
    # Both formulations give the same values, so only the autograd graph tells them apart.
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    nodes = {"fast": set(), "explicit": {"ExplicitDropoutBackward"}}
    for impl in IMPLS:
        assert custom_backward_nodes(layers.dropout(x, p=0.5, train=True, key=jr.key(1), impl=impl)) == nodes[impl]
        with layers.default_impl(impl):                      # impl=None follows the default
            assert custom_backward_nodes(layers.dropout(x, p=0.5, train=True, key=jr.key(1))) == nodes[impl]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.complex64,
                                   torch.int64, torch.uint8, torch.bool])
def test_dropout_p_one_gives_zeros_of_the_inputs_dtype_as_torch(impl, dtype):
    # F.dropout(p=1) returns zeros in x's dtype for every dtype, integer and bool included.
    x = torch.ones(2, 3, dtype=dtype)
    y = layers.dropout(x, p=1.0, train=True, key=jr.key(0), impl=impl)
    ref = torch.nn.functional.dropout(x, p=1.0, training=True)
    assert y.dtype == ref.dtype == dtype and torch.equal(y, ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_dropout_builds_its_tensors_on_the_inputs_device(impl, p):
    # The mask and the zero must follow x, not the key nor torch's default device. Two probes,
    # as a CUDA input would: a CPU x under torch.device("meta") (where a tensor made without a
    # device lands) gives the same output and gradient as outside, and a meta x with a CPU key
    # (the mask drawn on the key's device) stays on meta.
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    key = jr.key(3)

    def run(x):
        z = x.clone().requires_grad_(True)
        y = layers.dropout(z, p=p, train=True, key=key, impl=impl)
        return y.detach(), torch.autograd.grad(y.sum(), z)[0]

    want = run(x)
    with torch.device("meta"):
        got = run(x)
    assert all(g.device == x.device and torch.equal(g, w) for g, w in zip(got, want))
    on_meta = layers.dropout(x.to("meta"), p=p, train=True, key=key, impl=impl)
    assert on_meta.device.type == "meta" and on_meta.shape == x.shape


def test_check_probability_below_one_refuses_one_naming_the_half_open_interval():
    # The nets' dropout rates use below_one=True (a rate of 1 would zero the whole head).
    assert check_probability(0.999, "net", "dropout", below_one=True) == 0.999
    assert check_probability(1, "net", "dropout") == 1.0
    for p in (1.0, 1, 1.5):
        with pytest.raises(ValueError, match=rf"^net: expected dropout in \[0, 1\), got {p}$"):
            check_probability(p, "net", "dropout", below_one=True)
    with pytest.raises(TypeError, match=r"^net: expected dropout to be a float in \[0, 1\), got '0.5'$"):
        check_probability("0.5", "net", "dropout", below_one=True)


# ----------------------------------------------------------------------------- data parallel
# Inside layers.parallel.batch_axis a process holds rows start .. start + rows - 1 of the batch
# and must draw exactly those rows of the one-process mask (layers.parallel.row_offset), whatever
# the trailing shape; a slice of any other length is refused.

@pytest.mark.parametrize("start, rows, total, trailing", [
    (0, 2, 4, (5, 3)), (2, 2, 4, (5, 3)), (1, 2, 5, (3, 1, 2)), (3, 1, 4, (3,)), (1, 3, 4, ())])
def test_dropout_of_a_process_slice_is_those_rows_of_the_whole_batch_mask(start, rows, total, trailing):
    k = jr.key(7)
    x = torch.randn((total, *trailing), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = layers.dropout(x, p=0.5, train=True, key=k)
    part = x[start:start + rows]
    assert row_offset(part.shape, "here") == 0   # outside an axis: one process holds the batch
    with batch_axis(BatchAxis(start, rows, total)):
        assert row_offset(part.shape, "here") == start * math.prod(trailing)
        got = layers.dropout(part, p=0.5, train=True, key=k)
    assert torch.equal(got, whole[start:start + rows])


def test_dropout_inside_a_batch_axis_refuses_a_slice_of_other_rows_naming_itself():
    with batch_axis(BatchAxis(2, 4, 8)):
        for shape in ((3, 4), (4 + 1, 4), ()):
            with pytest.raises(ValueError, match=rf"^dropout: expected this process's 4 rows of the global batch "
                                                 rf"of 8 \(layers.parallel.batch_axis\), got shape "
                                                 rf"{re.escape(str(shape))}$"):
                layers.dropout(torch.ones(shape), p=0.5, train=True, key=jr.key(0))
