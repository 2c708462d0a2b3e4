"""Dtype mismatches: every layer raises the documented TypeError naming itself, the same in both
formulations, before torch's kernels see the tensors; autocast's legitimate mixes still run.

The rule (docs/layers.md, "Validation"): conv2d and linear take the input and bias in the weight's
dtype; batch_norm takes weight, bias and running statistics in one dtype and the input in it, or
float16 / bfloat16 against float32 ones (torch's mixed precision); cross_entropy takes class
indices of dtype int64 or uint8 (as F.cross_entropy) and class weights in the logits' dtype. Under
``torch.autocast`` any float16 / bfloat16 / float32 mix reaches conv2d, linear and the loss's
weights, which autocast casts itself.
"""
import contextlib
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import layers

pytestmark = pytest.mark.usefixtures("one_thread")

IMPLS = ("fast", "explicit")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
DTYPES = FLOATS + INTS + (torch.bool,)
PARAM_DTYPES = (torch.float32, torch.float64)


def _tensor(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    return torch.randint(0, 3, shape, generator=g).to(dtype)


def _error(fn, impl):
    with pytest.raises(TypeError) as info:
        fn(impl)
    return str(info.value)


def _same_error_in_both_impls(fn, expected):
    messages = {impl: _error(fn, impl) for impl in IMPLS}
    assert messages == {impl: expected for impl in IMPLS}


@st.composite
def mismatch(draw, allowed=lambda x_dtype, w_dtype: x_dtype == w_dtype):
    """``(input dtype, parameter dtype)`` that the layer must refuse."""
    w_dtype = draw(st.sampled_from(PARAM_DTYPES))
    x_dtype = draw(st.sampled_from([d for d in DTYPES if not allowed(d, w_dtype)]))
    return x_dtype, w_dtype


# ----------------------------------------------------------------------------- conv2d, linear

@settings(max_examples=40)
@given(dtypes=mismatch(), bias=st.booleans(), batched=st.booleans())
def test_conv2d_refuses_an_input_of_another_dtype_than_the_weight_in_both_impls(dtypes, bias, batched):
    x_dtype, w_dtype = dtypes
    params = {"weight": _tensor((4, 2, 3, 3), w_dtype)}
    if bias:
        params["bias"] = _tensor((4,), w_dtype)
    x = _tensor((2, 2, 5, 5) if batched else (2, 5, 5), x_dtype)
    _same_error_in_both_impls(lambda impl: layers.conv2d(params, x, padding=1, impl=impl),
                              f"conv2d: expected input of dtype {w_dtype} (the weight's), got {x_dtype}")


@settings(max_examples=40)
@given(dtypes=mismatch(), lead=st.lists(st.integers(1, 3), max_size=2))
def test_linear_refuses_an_input_of_another_dtype_than_the_weight_in_both_impls(dtypes, lead):
    x_dtype, w_dtype = dtypes
    params = {"weight": _tensor((4, 3), w_dtype), "bias": _tensor((4,), w_dtype)}
    x = _tensor(tuple(lead) + (3,), x_dtype)
    _same_error_in_both_impls(lambda impl: layers.linear(params, x, impl=impl),
                              f"linear: expected input of dtype {w_dtype} (the weight's), got {x_dtype}")


@settings(max_examples=20)
@given(dtypes=mismatch(), layer=st.sampled_from(["conv2d", "linear"]))
def test_a_bias_of_another_dtype_than_the_weight_is_refused_in_both_impls(dtypes, layer):
    b_dtype, w_dtype = dtypes
    if layer == "conv2d":
        params = {"weight": _tensor((4, 2, 3, 3), w_dtype), "bias": _tensor((4,), b_dtype)}
        x = _tensor((1, 2, 4, 4), w_dtype)
        fn = lambda impl: layers.conv2d(params, x, impl=impl)     # noqa: E731
    else:
        params = {"weight": _tensor((4, 3), w_dtype), "bias": _tensor((4,), b_dtype)}
        x = _tensor((2, 3), w_dtype)
        fn = lambda impl: layers.linear(params, x, impl=impl)     # noqa: E731
    _same_error_in_both_impls(fn, f"{layer}: expected bias of dtype {w_dtype} (the weight's), got {b_dtype}")


@pytest.mark.parametrize("layer", ["conv2d", "linear"])
def test_an_integer_weight_is_refused_even_against_an_input_of_its_dtype(layer):
    w = torch.ones((4, 2, 3, 3) if layer == "conv2d" else (4, 2), dtype=torch.int64)
    x = torch.ones((1, 2, 4, 4) if layer == "conv2d" else (3, 2), dtype=torch.int64)
    fn = getattr(layers, layer)
    _same_error_in_both_impls(lambda impl: fn({"weight": w}, x, impl=impl),
                              f"{layer}: expected weight with a floating dtype, got torch.int64")


# ----------------------------------------------------------------------------- batch_norm

def _bn_allowed(x_dtype, p_dtype):
    return x_dtype == p_dtype or (x_dtype in (torch.float16, torch.bfloat16) and p_dtype == torch.float32)


def _bn_inputs(p_dtype, x_dtype, affine, tracked, shape=(4, 3, 2, 2)):
    params = {"weight": _tensor((3,), p_dtype, 1), "bias": _tensor((3,), p_dtype, 2)} if affine else {}
    state = ({"running_mean": _tensor((3,), p_dtype, 3), "running_var": _tensor((3,), p_dtype, 4).abs() + 0.5,
              "num_batches_tracked": torch.tensor(2)} if tracked else {})
    return params, state, _tensor(shape, x_dtype)


@settings(max_examples=50)
@given(dtypes=mismatch(allowed=_bn_allowed), train=st.booleans(),
       kept=st.sampled_from([(True, True), (True, False), (False, True)]))
def test_batch_norm_refuses_an_input_of_another_dtype_than_its_parameters_in_both_impls(dtypes, train, kept):
    x_dtype, p_dtype = dtypes
    params, state, x = _bn_inputs(p_dtype, x_dtype, *kept)
    whose = "weight" if params else "running_mean"
    _same_error_in_both_impls(lambda impl: layers.batch_norm(params, state, x, train=train, impl=impl),
                              f"batch_norm: expected input of dtype {p_dtype} (the {whose}'s), got {x_dtype}")


@settings(max_examples=20)
@given(x_dtype=st.sampled_from(INTS + (torch.bool,)), train=st.booleans())
def test_batch_norm_without_parameters_or_statistics_refuses_a_non_floating_input(x_dtype, train):
    x = _tensor((4, 3), x_dtype)
    _same_error_in_both_impls(lambda impl: layers.batch_norm({}, {}, x, train=train, impl=impl),
                              f"batch_norm: expected input with a floating dtype, got {x_dtype}")


@settings(max_examples=30)
@given(dtypes=mismatch(), name=st.sampled_from(["bias", "running_mean", "running_var"]),
       train=st.booleans())
def test_batch_norm_refuses_parameters_and_statistics_of_mixed_dtypes(dtypes, name, train):
    other, p_dtype = dtypes
    params, state, x = _bn_inputs(p_dtype, p_dtype, True, True)
    tree = params if name in params else state
    tree[name] = tree[name].to(other)
    _same_error_in_both_impls(lambda impl: layers.batch_norm(params, state, x, train=train, impl=impl),
                              f"batch_norm: expected {name} of dtype {p_dtype} (the weight's), got {other}")


@settings(max_examples=20)
@given(x_dtype=st.sampled_from([torch.float16, torch.bfloat16]), train=st.booleans(),
       affine=st.booleans())
def test_batch_norm_takes_half_inputs_against_float32_parameters_as_torch_in_both_impls(x_dtype, train,
                                                                                       affine):
    params, state, x = _bn_inputs(torch.float32, x_dtype, affine, True)
    ref_state = {k: v.clone() for k, v in state.items()}
    ref = F.batch_norm(x, ref_state["running_mean"], ref_state["running_var"], params.get("weight"),
                       params.get("bias"), training=train)
    for impl in IMPLS:
        y, new_state = layers.batch_norm(params, state, x, train=train, impl=impl)
        assert y.dtype == x_dtype                       # computed in float32, returned as the input
        # one rounding to the input's 8 (bfloat16) or 11 (float16) mantissa bits: 2**-8 relative
        torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)
        for k in ("running_mean", "running_var"):
            assert new_state[k].dtype == torch.float32
            torch.testing.assert_close(new_state[k], ref_state[k], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- cross_entropy

@settings(max_examples=30)
@given(t_dtype=st.sampled_from(INTS), reduction=st.sampled_from(["mean", "sum", "none"]),
       smoothing=st.sampled_from([0.0, 0.1]))
def test_cross_entropy_takes_int64_and_uint8_indices_and_refuses_other_integers_in_both_impls(
        t_dtype, reduction, smoothing):
    logits = _tensor((5, 3), torch.float64)
    target = torch.tensor([0, 1, 2, 1, 0], dtype=t_dtype)
    call = lambda impl: layers.cross_entropy(logits, target, reduction=reduction,  # noqa: E731
                                             label_smoothing=smoothing, impl=impl)
    if t_dtype in (torch.int64, torch.uint8):        # exactly the two F.cross_entropy takes
        ref = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=smoothing)
        for impl in IMPLS:
            torch.testing.assert_close(call(impl), ref, rtol=1e-12, atol=1e-12)
        return
    with pytest.raises(RuntimeError, match="expected target dtype to be Long or Byte"):
        F.cross_entropy(logits, target)              # torch refuses them too
    _same_error_in_both_impls(
        call, f"cross_entropy: expected target of class indices (torch.int64 or torch.uint8, as "
              f"F.cross_entropy; convert others with .long()) or class probabilities (floating "
              f"dtype), got {t_dtype}")


def test_cross_entropy_with_uint8_indices_honours_ignore_index_in_both_impls():
    logits = _tensor((4, 3), torch.float64)
    target = torch.tensor([0, 2, 1, 2], dtype=torch.uint8)
    ref = F.cross_entropy(logits, target, ignore_index=2)
    for impl in IMPLS:
        torch.testing.assert_close(layers.cross_entropy(logits, target, ignore_index=2, impl=impl), ref)


@settings(max_examples=20)
@given(dtypes=mismatch(allowed=lambda w, lg: w == lg or not w.is_floating_point))
def test_cross_entropy_refuses_class_weights_of_another_dtype_than_the_logits_in_both_impls(dtypes):
    w_dtype, l_dtype = dtypes
    logits, target = _tensor((4, 3), l_dtype), torch.tensor([0, 1, 2, 1])
    weight = _tensor((3,), w_dtype)
    _same_error_in_both_impls(lambda impl: layers.cross_entropy(logits, target, weight=weight, impl=impl),
                              f"cross_entropy: expected weight of dtype {l_dtype} (the logits'), got {w_dtype}")


# ----------------------------------------------------------------------------- autocast, torch.func

AUTOCAST = (torch.float16, torch.bfloat16, torch.float32)


@settings(max_examples=20)
@given(x_dtype=st.sampled_from(AUTOCAST), w_dtype=st.sampled_from(AUTOCAST),
       layer=st.sampled_from(["conv2d", "linear"]), impl=st.sampled_from(IMPLS))
def test_autocast_mixes_reach_conv2d_and_linear_and_agree_with_float32(x_dtype, w_dtype, layer, impl):
    if layer == "conv2d":
        params = {"weight": _tensor((4, 2, 3, 3), torch.float32, 1), "bias": _tensor((4,), torch.float32, 2)}
        x = _tensor((2, 2, 5, 5), torch.float32)
    else:
        params = {"weight": _tensor((4, 3), torch.float32, 1), "bias": _tensor((4,), torch.float32, 2)}
        x = _tensor((2, 3), torch.float32)
    fn = getattr(layers, layer)
    ref = fn(params, x, impl="fast")
    mixed = {k: v.to(w_dtype) for k, v in params.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(mixed, x.to(x_dtype), impl=impl)
        fast = fn(mixed, x.to(x_dtype), impl="fast")
    assert y.dtype == fast.dtype == torch.bfloat16   # both formulations end in autocast's dtype
    # bfloat16 products (8 mantissa bits) summed over <= 18 terms of magnitude ~1: ~5e-2 absolute
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=1e-1)


@settings(max_examples=20)
@given(logits_dtype=st.sampled_from(AUTOCAST), w_dtype=st.sampled_from(AUTOCAST), impl=st.sampled_from(IMPLS))
def test_autocast_mixes_reach_cross_entropy_class_weights_and_agree_with_float32(logits_dtype, w_dtype, impl):
    logits, target = _tensor((4, 3), torch.float32), torch.tensor([0, 1, 2, 1])
    weight = _tensor((3,), torch.float32, 1).abs() + 0.5
    ref = F.cross_entropy(logits, target, weight=weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layers.cross_entropy(logits.to(logits_dtype), target, weight=weight.to(w_dtype), impl=impl)
    # inputs rounded to bfloat16 (8 mantissa bits, 4e-3 relative), a log-softmax over 3 classes and
    # a weighted mean of 4 terms of magnitude ~1: within 3e-2
    torch.testing.assert_close(loss.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("layer", ["conv2d", "linear", "cross_entropy"])
def test_autocast_mixes_are_refused_on_the_meta_device_where_autocast_never_runs(layer):
    # torch.autocast has no meta device type (asking raises): the mix stays a mismatch there.
    x = _tensor((2, 2, 4, 4) if layer == "conv2d" else (2, 3), torch.float32).to("meta")
    if layer == "cross_entropy":
        weight = torch.ones(3, dtype=torch.bfloat16, device="meta")
        with pytest.raises(TypeError, match=r"^cross_entropy: expected weight of dtype torch.float32 \(the "
                                            r"logits'\), got torch.bfloat16$"):
            layers.cross_entropy(x, torch.zeros(2, dtype=torch.int64, device="meta"), weight=weight)
        return
    w = torch.ones((4, 2, 3, 3) if layer == "conv2d" else (4, 3), dtype=torch.bfloat16, device="meta")
    with pytest.raises(TypeError, match=rf"^{layer}: expected input of dtype torch.bfloat16 \(the weight's\), "
                                        r"got torch.float32$"):
        getattr(layers, layer)({"weight": w}, x)


@pytest.mark.parametrize("layer", ["conv2d", "linear"])
@pytest.mark.parametrize("x_dtype", [torch.float64, torch.int64])
def test_autocast_does_not_excuse_what_it_does_not_cast(layer, x_dtype):
    w = _tensor((4, 2, 3, 3) if layer == "conv2d" else (4, 2), torch.float32)
    x = _tensor((1, 2, 4, 4) if layer == "conv2d" else (3, 2), x_dtype)
    fn = getattr(layers, layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _same_error_in_both_impls(lambda impl: fn({"weight": w}, x, impl=impl),
                                  f"{layer}: expected input of dtype torch.float32 (the weight's), "
                                  f"got {x_dtype}")


@pytest.mark.parametrize("impl", IMPLS)
def test_dtype_checks_hold_under_vmap_and_pass_grad_through(impl):
    params = {"weight": _tensor((4, 2, 3, 3), torch.float32), "bias": _tensor((4,), torch.float32)}
    x = _tensor((3, 2, 5, 5), torch.float32)
    per_sample = torch.func.vmap(lambda xi: layers.conv2d(params, xi, impl=impl))
    with pytest.raises(TypeError, match=r"conv2d: expected input of dtype torch.float32 \(the weight's\), "
                                        r"got torch.float64"):
        per_sample(x.double())
    torch.testing.assert_close(per_sample(x), layers.conv2d(params, x, impl=impl))
    g = torch.func.grad(lambda p: layers.conv2d(p, x, impl=impl).square().sum())(params)
    assert g["weight"].dtype == torch.float32 and g["weight"].shape == (4, 2, 3, 3)


def test_a_parameter_or_statistic_that_is_not_a_tensor_is_named_by_the_layer_and_its_key():
    x, t3 = torch.randn(2, 3, 4, 4), torch.ones(3)
    cases = [
        (lambda: layers.linear({"weight": [[1.0]]}, torch.ones(2, 3)), "linear: expected weight to be a torch.Tensor, got list"),
        (lambda: layers.linear({"weight": torch.ones(3, 3), "bias": [1.0]}, torch.ones(2, 3)),
         "linear: expected bias to be a torch.Tensor, got list"),
        (lambda: layers.conv2d({"weight": 1.0}, x), "conv2d: expected weight to be a torch.Tensor, got float"),
        (lambda: layers.conv2d({"weight": torch.ones(3, 3, 1, 1), "bias": (1.0,)}, x),
         "conv2d: expected bias to be a torch.Tensor, got tuple"),
        (lambda: layers.batch_norm({"weight": [1.0] * 3, "bias": t3}, {}, x, train=True),
         "batch_norm: expected weight to be a torch.Tensor, got list"),
        (lambda: layers.batch_norm({}, {"running_mean": t3, "running_var": None, "num_batches_tracked": 0}, x,
                                   train=True), "batch_norm: expected running_var to be a torch.Tensor, got NoneType"),
        (lambda: layers.cross_entropy([[1.0, 2.0]], torch.tensor([0])), "cross_entropy: expected logits to be a torch.Tensor, got list"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match="^" + re.escape(message) + "$"):
            call()


def test_batch_norm_takes_no_autocast_mix_between_its_parameters_and_statistics():
    # autocast casts an op's inputs, not a layer's own parameters against its running statistics:
    # a bfloat16 weight with float32 statistics is refused under autocast as outside it
    params = {"weight": torch.ones(3, dtype=torch.bfloat16), "bias": torch.zeros(3, dtype=torch.bfloat16)}
    state = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "num_batches_tracked": torch.tensor(0)}
    x = torch.randn(2, 3, 2, 2, dtype=torch.bfloat16)
    for ctx in (torch.autocast("cpu", dtype=torch.bfloat16), contextlib.nullcontext()):
        with ctx, pytest.raises(TypeError, match=r"^batch_norm: expected running_mean of dtype torch\.bfloat16 "
                                                 r"\(the weight's\), got torch\.float32$"):
            layers.batch_norm(params, state, x, train=True)
