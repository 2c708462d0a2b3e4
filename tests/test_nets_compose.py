"""The ``serial`` combinator and the ``Net`` contract: names, keys, purity and transforms.

Properties: children are named as ``nn.Sequential`` names them; ``init`` is a function of the
key and gives every layer its own key; a training call with dropout and no key is an error while
eval needs none; dropout is deterministic per key; ``apply`` modifies nothing; it runs under
``torch.func.grad`` (new state through ``has_aux``), ``torch.func.vmap`` in eval (per-sample
gradients) and ``torch.compile``.
"""
import functools
import math
import os
import re
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import layers
import nets
from nets.compose import (GELU, AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear,
                          MaxPool2d, Mul, ReLU, as_net, leaves, serial)

SEEDS = st.integers(0, 2**31 - 1)


def tiny_net(p=0.5):
    """Every layer kind once, small enough for 8x8 inputs."""
    features = serial(Conv2d(3, 8, 3, padding=1), BatchNorm2d(8), ReLU(), MaxPool2d(2))
    classifier = serial(AdaptiveAvgPool2d(2), Flatten(), Dropout(p), Linear(8 * 2 * 2, 10))
    return as_net(serial(features=features, classifier=classifier), name="tiny")


def _inputs(seed, shape=(4, 3, 8, 8), dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype), torch.randint(0, 10, shape[:1], generator=gen)


def _assert_trees_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- names and init

def test_serial_names_children_by_position_and_keyword_like_nn_sequential():
    ours = serial(body=serial(Conv2d(3, 4, 3), ReLU(), BatchNorm2d(4)), head=serial(Flatten(), Linear(4, 2)))
    twin = nn.Sequential()
    twin.add_module("body", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    twin.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    declared = {**ours.param_shapes, **ours.state_shapes}
    assert declared == {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    assert [path for path, _ in leaves(ours)] == ["body.0", "body.1", "body.2", "head.0", "head.1"]


def test_serial_rejects_mixed_positional_and_keyword_children_and_non_layers():
    with pytest.raises(TypeError, match="serial: expected layers either all positional or all by keyword"):
        serial(ReLU(), head=ReLU())
    with pytest.raises(TypeError, match="serial: expected layer '1' to be a nets.compose.Layer, got ReLU"):
        serial(ReLU(), nn.ReLU())
    with pytest.raises(ValueError, match="serial: expected at least one layer"):
        serial()


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS)
def test_init_is_a_function_of_the_key_alone(seed):
    net = tiny_net()
    a, sa = net.init(layers.random.key(seed))
    b, sb = net.init(layers.random.key(seed))
    c, _ = net.init(layers.random.key(seed + 1))
    _assert_trees_equal(a, b)
    _assert_trees_equal(sa, sb)
    assert not torch.equal(a["features.0.weight"], c["features.0.weight"])


def test_init_gives_each_layer_its_own_key_and_the_requested_dtype():
    net = as_net(serial(Linear(5, 5), Linear(5, 5)), name="two")
    params, _ = net.init(layers.random.key(0), dtype=torch.float64)
    assert not torch.equal(params["0.weight"], params["1.weight"])
    assert all(v.dtype == torch.float64 for v in params.values())
    _, state = tiny_net().init(layers.random.key(0), dtype=torch.float64)
    assert state["features.1.running_mean"].dtype == torch.float64
    assert state["features.1.num_batches_tracked"].dtype == torch.int64


def test_init_rejects_a_layer_initialiser_that_breaks_its_declared_shapes():
    wrong = Linear(3, 2, init=lambda key, *, dtype, device: {"weight": torch.zeros(3, 3, dtype=dtype),
                                                              "bias": torch.zeros(2, dtype=dtype)})
    net = as_net(serial(wrong), name="wrong")
    with pytest.raises(ValueError, match=r"wrong.init: .*0.weight: declared \(2, 3\), made \(3, 3\)"):
        net.init(layers.random.key(0))


def test_layer_constructors_reject_bad_arguments_naming_the_layer():
    with pytest.raises(ValueError, match=r"Conv2d\(3, 0\): expected out_channels to be a positive int"):
        Conv2d(3, 0, 3)
    with pytest.raises(ValueError, match=r"Linear\(2, 3\): expected init to be one of"):
        Linear(2, 3, init="glorot")
    with pytest.raises(ValueError, match=r"Dropout: expected p \(the drop probability\) in \[0, 1\], got 1.5"):
        Dropout(1.5)


# ----------------------------------------------------------------------------- apply contract

def test_training_apply_of_a_net_with_dropout_and_no_key_raises_naming_the_layers():
    net = tiny_net()
    params, state = net.init(layers.random.key(0))
    x, _ = _inputs(0, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"tiny.apply: expected a random key .* \['classifier.2'\] "
                                         r"when train=True, got key=None"):
        net.apply(params, state, x, train=True)
    m = nets.model_b()
    mp, ms = m.init(layers.random.key(0))
    with pytest.raises(ValueError, match=r"model_b.apply: expected a random key .*'features.7'"):
        m.apply(mp, ms, x.new_zeros(2, 3, 32, 32), train=True)


def test_eval_needs_no_key_and_ignores_a_given_one():
    net = tiny_net()
    params, state = net.init(layers.random.key(0), dtype=torch.float64)
    x, _ = _inputs(1)
    y0, s0 = net.apply(params, state, x, train=False)
    y1, s1 = net.apply(params, state, x, train=False, key=layers.random.key(5))
    assert torch.equal(y0, y1)
    _assert_trees_equal(s0, state)
    _assert_trees_equal(s1, state)


def test_training_without_dropout_needs_no_key():
    net = tiny_net(p=0.0)
    params, state = net.init(layers.random.key(0), dtype=torch.float64)
    x, _ = _inputs(2)
    y, new_state = net.apply(params, state, x, train=True)
    assert y.shape == (4, 10)
    assert int(new_state["features.1.num_batches_tracked"]) == 1


@functools.lru_cache(maxsize=None)
def _model_b_with_dropout():
    net = nets.model_b(dropout=0.2, head_dropout=0.5)
    return (net,) + net.init(layers.random.key(0))


@settings(deadline=None, max_examples=5)
@given(seed=SEEDS)
def test_dropout_in_training_is_deterministic_per_key_and_differs_across_keys(seed):
    net, params, state = _model_b_with_dropout()
    x, _ = _inputs(seed, (2, 3, 32, 32), torch.float32)
    k = layers.random.key(seed)
    y1, s1 = net.apply(params, state, x, train=True, key=k)
    y2, s2 = net.apply(params, state, x, train=True, key=k)
    y3, _ = net.apply(params, state, x, train=True, key=layers.random.fold_in(k, 1))
    assert torch.equal(y1, y2)
    _assert_trees_equal(s1, s2)
    assert not torch.equal(y1, y3)


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS)
def test_serial_hands_child_i_the_ith_key_of_split(seed):
    net = as_net(serial(ReLU(), Dropout(0.5), Dropout(0.25)), name="drops")
    x, _ = _inputs(seed)
    k = layers.random.key(seed)
    y, _ = net.apply({}, {}, x, train=True, key=k)
    keys = layers.random.split(k, 3)
    expected = layers.dropout(layers.dropout(layers.relu(x), p=0.5, train=True, key=keys[1]),
                              p=0.25, train=True, key=keys[2])
    assert torch.equal(y, expected)


@settings(deadline=None, max_examples=4)
@given(seed=SEEDS, train=st.booleans())
def test_apply_modifies_none_of_its_arguments_and_repeats_exactly(seed, train):
    net = nets.model_b()
    params, state = net.init(layers.random.key(seed), dtype=torch.float64)
    x, _ = _inputs(seed, (2, 3, 32, 32))
    k = layers.random.key(seed + 1)
    copies = ({k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in state.items()},
              x.clone(), k.clone())
    y1, s1 = net.apply(params, state, x, train=train, key=k)
    y2, s2 = net.apply(params, state, x, train=train, key=k)
    _assert_trees_equal(params, copies[0])
    _assert_trees_equal(state, copies[1])
    assert torch.equal(x, copies[2])
    assert torch.equal(k, copies[3])
    assert torch.equal(y1, y2)
    _assert_trees_equal(s1, s2)
    if train:
        assert not torch.equal(s1["features.1.running_mean"], state["features.1.running_mean"])


def test_apply_rejects_wrong_keys_non_bool_train_and_bad_keys():
    net = tiny_net()
    params, state = net.init(layers.random.key(0))
    x, _ = _inputs(0, dtype=torch.float32)
    extra = {**params, "features.9.weight": params["features.0.weight"]}
    del extra["classifier.3.bias"]
    with pytest.raises(ValueError, match=r"tiny.apply: expected params with the 6 keys of init, got "
                                         r"6 keys \(missing \['classifier.3.bias'\], "
                                         r"unexpected \['features.9.weight'\]\)"):
        net.apply(extra, state, x, train=False)
    with pytest.raises(ValueError, match=r"tiny.apply: expected state .*missing \['features.1.running_var'\]"):
        net.apply(params, {k: v for k, v in state.items() if "var" not in k}, x, train=False)
    with pytest.raises(TypeError, match=r"tiny.apply: expected train to be a bool, got 1"):
        net.apply(params, state, x, train=1)
    with pytest.raises(ValueError, match=r"tiny.apply: expected a random key"):
        net.apply(params, state, x, train=True, key=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"conv2d: expected input with 3 channels"):
        net.apply(params, state, torch.zeros(1, 4, 8, 8), train=False)


# ----------------------------------------------------------------------------- transforms

@settings(deadline=None, max_examples=2)
@given(seed=SEEDS)
def test_grad_with_has_aux_returns_apply_state_and_autograd_gradients(seed):
    net = nets.model_b(dropout=0.2, head_dropout=0.3)
    params, state = net.init(layers.random.key(seed), dtype=torch.float64)
    x, labels = _inputs(seed, (2, 3, 32, 32))
    k = layers.random.key(seed + 7)

    def loss(p):
        logits, new_state = net.apply(p, state, x, train=True, key=k)
        return F.cross_entropy(logits, labels), new_state

    grads, new_state = torch.func.grad(loss, has_aux=True)(params)
    leaves_ = {n: v.clone().requires_grad_(True) for n, v in params.items()}
    value, ref_state = loss(leaves_)
    ref = torch.autograd.grad(value, list(leaves_.values()))
    # Same float64 ops in the same order on both paths: equal up to a few ulps.
    for n, g in zip(leaves_, ref):
        torch.testing.assert_close(grads[n], g, rtol=1e-12, atol=1e-14)
    _assert_trees_equal(new_state, {n: v.detach() for n, v in ref_state.items()})


@settings(deadline=None, max_examples=2)
@given(seed=SEEDS)
def test_vmap_of_grad_in_eval_gives_per_sample_gradients_of_a_loop(seed):
    net = nets.model_b()
    params, state = net.init(layers.random.key(seed), dtype=torch.float64)
    x, labels = _inputs(seed, (3, 3, 32, 32))

    def loss(p, xi, yi):
        logits, _ = net.apply(p, state, xi[None], train=False)
        return F.cross_entropy(logits, yi[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, labels)
    for i in range(x.shape[0]):
        one = torch.func.grad(loss)(params, x[i], labels[i])
        for n in params:
            # Batched and single-sample kernels sum in different orders (float64): ulp level.
            torch.testing.assert_close(per_sample[n][i], one[n], rtol=1e-10, atol=1e-13)


@settings(deadline=None, max_examples=2)
@given(seed=SEEDS)
def test_compiled_apply_traces_as_one_graph_and_equals_eager(seed):
    net = tiny_net()
    params, state = net.init(layers.random.key(seed))
    x, _ = _inputs(seed, dtype=torch.float32)
    k = layers.random.key(seed + 1)
    torch._dynamo.reset()
    # fullgraph: any graph break (impure Python, data-dependent control flow) is an error.
    compiled = torch.compile(net.apply, backend="aot_eager", fullgraph=True)
    for train, key in ((True, k), (False, None)):
        y, s = compiled(params, state, x, train=train, key=key)
        y0, s0 = net.apply(params, state, x, train=train, key=key)
        # aot_eager runs the same kernels: float32 equality up to reassociation by the tracer.
        torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)
        for n in s0:
            torch.testing.assert_close(s[n], s0[n], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(os.environ.get("PURENN_TEST_INDUCTOR") != "1",
                    reason="inductor compiles C++ (~40 s on a 2-core CPU); set PURENN_TEST_INDUCTOR=1")
def test_inductor_compiled_training_step_equals_eager():
    net = tiny_net()
    params, state = net.init(layers.random.key(0))
    x, labels = _inputs(0, dtype=torch.float32)
    k = layers.random.key(1)

    def loss(p, s, key):
        logits, new_state = net.apply(p, s, x, train=True, key=key)
        return F.cross_entropy(logits, labels), new_state

    step = torch.compile(torch.func.grad(loss, has_aux=True))
    start = time.perf_counter()
    grads, new_state = step(params, state, k)
    print(f"inductor compile + first step: {time.perf_counter() - start:.1f} s")
    ref_grads, ref_state = torch.func.grad(loss, has_aux=True)(params, state, k)
    # Inductor fuses and reorders float32 reductions: a few float32 ulps of O(1) values.
    for n in params:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5)
    for n in state:
        torch.testing.assert_close(new_state[n], ref_state[n], rtol=1e-4, atol=1e-5)


def _small_serial_and_twin():
    """A serial net of every compose layer with torch names, and its nn.Sequential twin."""
    from collections import OrderedDict

    from nets.compose import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear,
                              MaxPool2d, ReLU, as_net, serial)
    nn = torch.nn

    def make_net():
        features = serial(Conv2d(3, 4, 3, stride=2, padding=1), BatchNorm2d(4), ReLU(),
                          Conv2d(4, 4, 3, padding=1, groups=2, bias=False), MaxPool2d(2), Dropout(0.0))
        head = serial(AdaptiveAvgPool2d(2), Flatten(), Linear(16, 5))
        return as_net(serial(features=features, classifier=head), name="small")

    def make_twin():
        features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), nn.MaxPool2d(2),
                                 nn.Dropout(0.0))
        head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5))
        return nn.Sequential(OrderedDict(features=features, classifier=head))

    return make_net, make_twin


def test_a_serial_net_of_every_layer_equals_its_nn_sequential_twin_in_train_and_eval():
    """nets.testing.check_net: names, logits, every gradient and the batch-norm state, batches
    of 2 and 3 (tolerance: nets.testing's float64 1e-9)."""
    from nets.testing import check_net
    make_net, make_twin = _small_serial_and_twin()
    check_net(make_net, make_twin, (3, 9, 9), num_classes=5, max_examples=4)


# ----------------------------------------------------------------------------- declared shapes
# stax's _CheckShapeAgreement: the shape a layer declares (``output_shape``, used by
# nets.summary) is the shape its apply returns, for every layer kind, at the boundary where the
# input is exactly as large as the dilated kernel too.

@settings(deadline=None, max_examples=25)
@given(data=st.data(), kind=st.sampled_from(["Conv2d", "MaxPool2d", "AdaptiveAvgPool2d", "BatchNorm2d",
                                             "Flatten", "GELU", "Mul", "ReLU"]))
def test_every_layers_declared_output_shape_is_the_shape_apply_returns(data, kind):
    d = data.draw
    n, groups = d(st.integers(1, 2)), d(st.sampled_from([1, 2]))
    c = groups * d(st.integers(1, 2))
    kh, kw = d(st.integers(1, 3)), d(st.integers(1, 3))
    sh, sw, ph, pw = d(st.integers(1, 3)), d(st.integers(1, 3)), d(st.integers(0, 1)), d(st.integers(0, 1))
    dh, dw = d(st.integers(1, 2)), d(st.integers(1, 2))
    if kind == "Conv2d":
        layer = Conv2d(c, groups * d(st.integers(1, 2)), (kh, kw), stride=(sh, sw), padding=(ph, pw),
                       dilation=(dh, dw), groups=groups)
        min_h, min_w = max(1, dh * (kh - 1) + 1 - 2 * ph), max(1, dw * (kw - 1) + 1 - 2 * pw)
    elif kind == "MaxPool2d":
        layer = MaxPool2d((kh, kw), d(st.sampled_from([None, (sh, sw)])))
        min_h, min_w = kh, kw
    else:
        layer = {"AdaptiveAvgPool2d": lambda: AdaptiveAvgPool2d((kh, kw)), "BatchNorm2d": lambda: BatchNorm2d(c),
                 "Flatten": Flatten, "GELU": GELU, "Mul": lambda: Mul(0.25), "ReLU": ReLU}[kind]()
        min_h, min_w = 1, 1
    h, w = min_h + d(st.sampled_from([0, 0, 1, 4])), min_w + d(st.sampled_from([0, 1, 3]))
    net = as_net(serial(layer), name="one")
    params, state = net.init(layers.random.key(0), dtype=torch.float64)
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    y, _ = net.apply(params, state, x, train=False)
    declared = layer.output_shape((n, c, h, w))
    assert declared == tuple(y.shape) and all(type(s) is int for s in declared)
    if kind == "Conv2d":   # N * C_out * Ho * Wo * (C_in / groups) * kh * kw
        assert layer.macs((n, c, h, w)) == y.numel() * (c // groups) * kh * kw


def test_declared_shapes_refuse_inputs_smaller_than_the_kernel_or_not_images_naming_the_layer():
    conv, pool = Conv2d(3, 4, 3, padding=1, dilation=(2, 1)), MaxPool2d(3)
    assert conv.output_shape((1, 3, 3, 1)) == (1, 4, 1, 1)   # padded 5 == dilated kernel 5: one row
    strided = Conv2d(3, 4, 3, stride=2).output_shape((1, 3, 8, 9))   # floor(5 / 2) + 1, floor(6 / 2) + 1
    assert strided == (1, 4, 3, 4) and all(type(s) is int for s in strided)
    with pytest.raises(ValueError, match=r"^Conv2d\(3, 4\): expected padded input height >= dilated kernel "
                                         r"height 5, got input \(1, 3, 2, 9\)"):
        conv.output_shape((1, 3, 2, 9))
    with pytest.raises(ValueError, match=r"^MaxPool2d\(3\): expected padded input width >= dilated kernel "
                                         r"width 3, got input \(2, 1, 5, 2\)"):
        pool.output_shape((2, 1, 5, 2))
    with pytest.raises(ValueError, match=r"^Conv2d\(3, 4\): expected input with 3 channels, got \(1, 2, 8, 8\)"):
        conv.output_shape((1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"^MaxPool2d\(3\): expected a 4-D input shape \(N, C, H, W\), "
                                         r"got \(3, 8, 8\)"):
        pool.output_shape(torch.Size([3, 8, 8]))


def test_gelu_and_mul_equal_nn_gelu_and_a_fixed_scale():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for layer, want, kind in ((GELU(), nn.GELU()(x), "GELU"), (Mul(0.125), x * 0.125, "Mul(0.125)"),
                              (Mul(3), x * 3.0, "Mul(3)")):
        assert layer.kind == kind and layer.op == kind.split("(")[0]
        assert layer.init(layers.random.key(0)) == ({}, {})
        y, state = as_net(serial(layer), name="one").apply({}, {}, x, train=True)
        assert torch.equal(y, want) and state == {}
        assert layer.macs(x.shape) == 0 and layer.param_shapes == {} and layer.state_shapes == {}
    with pytest.raises(TypeError, match=r"Mul: expected scale to be a real number, got '2'"):
        Mul("2")


def test_dropout_layer_keeps_the_shape_costs_no_macs_and_applies_layers_dropout_with_its_key():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    k = layers.random.key(3)
    for p, kind in ((0.5, "Dropout(p=0.5)"), (0.125, "Dropout(p=0.125)"), (0.0, "Dropout(p=0)")):
        layer = Dropout(p)
        assert (layer.op, layer.kind, layer.stochastic) == ("Dropout", kind, p > 0.0)
        assert layer.init(k) == ({}, {}) and layer.param_shapes == {} and layer.state_shapes == {}
        for shape in ((2, 3, 4, 4), torch.Size([5, 7]), (6,)):
            declared = layer.output_shape(shape)
            assert declared == tuple(shape) and type(declared) is tuple and all(type(s) is int for s in declared)
            assert layer.macs(shape) == 0
        y, state = layer.apply({}, {}, x, train=True, key=k)
        assert torch.equal(y, layers.dropout(x, p=p, train=True, key=k)) and state == {}
        assert torch.equal(layer.apply({}, {}, x, train=False)[0], x)


def test_max_pool_with_its_own_stride_declares_and_returns_torchs_shape_and_names_each_axis():
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    for kernel, stride in (((2, 3), (1, 2)), ((3, 2), None), (2, (3, 1))):
        layer = MaxPool2d(kernel, stride)
        y, _ = as_net(serial(layer), name="one").apply({}, {}, x, train=False)
        assert torch.equal(y, nn.MaxPool2d(kernel, stride)(x))
        assert layer.output_shape(tuple(x.shape)) == tuple(y.shape) and layer.macs(tuple(x.shape)) == 0
    with pytest.raises(ValueError, match=r"^MaxPool2d\(3\): expected padded input height >= dilated kernel "
                                         r"height 3, got input \(2, 1, 2, 5\)$"):
        MaxPool2d(3).output_shape((2, 1, 2, 5))


def test_max_pool_names_itself_and_each_bad_argument_and_takes_a_one_by_one_window():
    assert MaxPool2d(1).output_shape((2, 3, 4, 5)) == (2, 3, 4, 5)
    layer = MaxPool2d((2, 3), (1, 2))
    assert (layer.op, layer.kind) == ("MaxPool2d", "MaxPool2d(2x3, stride 1)")
    with pytest.raises(ValueError, match=r"^MaxPool2d\(0\): expected kernel_size >= 1, got 0$"):
        MaxPool2d(0)
    with pytest.raises(TypeError, match=r"^MaxPool2d\(2.5\): expected kernel_size to be an int or a pair"):
        MaxPool2d(2.5)
    with pytest.raises(ValueError, match=r"^MaxPool2d\(2\): expected stride >= 1, got \(1, 0\)$"):
        MaxPool2d(2, (1, 0))
    with pytest.raises(TypeError, match=r"^MaxPool2d\(2\): expected stride to be an int or a pair"):
        MaxPool2d(2, "1")


def test_linear_layer_matches_nn_linear_and_names_itself_and_each_bad_argument():
    k = layers.random.key(5)
    layer = Linear(3, 2)
    assert (layer.op, layer.kind) == ("Linear", "Linear(3, 2)")
    params, state = layer.init(k, dtype=torch.float64)
    twin = nn.Linear(3, 2, dtype=torch.float64)
    assert state == {} and {n: (tuple(p.shape), p.dtype) for n, p in params.items()} == \
        {n: (tuple(p.shape), p.dtype) for n, p in twin.named_parameters()}
    assert layer.param_shapes == {n: tuple(p.shape) for n, p in twin.named_parameters()}
    with torch.no_grad():
        twin.weight.copy_(params["weight"]), twin.bias.copy_(params["bias"])
    for shape in ((4, 3), (3,), (2, 5, 3), torch.Size([1, 3])):
        x = torch.randn(shape, dtype=torch.float64)
        y, _ = layer.apply(params, state, x, train=False)
        assert torch.equal(y, twin(x))  # the same F.linear call: bit for bit
        declared = layer.output_shape(shape)
        assert declared == tuple(y.shape) and type(declared) is tuple and all(type(s) is int for s in declared)
        assert layer.macs(shape) == y.numel() * 3  # nets.summary: one multiply-add per output and input
    # the scheme, bias flag, dtype and device reach layers.init; a callable gets the same key
    assert torch.equal(Linear(3, 2, init="normal").init(k)[0]["weight"],
                       layers.init.linear_params(k, 3, 2, scheme="normal")["weight"])
    assert set(Linear(3, 2, bias=False).init(k)[0]) == {"weight"} and Linear(3, 2, bias=False).param_shapes == {"weight": (2, 3)}
    assert {p.device.type for p in Linear(3, 2).init(k, device="meta")[0].values()} == {"meta"}
    seen = []
    custom = Linear(3, 2, init=lambda key, *, dtype, device: seen.append((key, dtype, device)) or {})
    custom.init(k, dtype=torch.float16, device="meta")
    assert len(seen) == 1 and torch.equal(seen[0][0], k) and seen[0][1:] == (torch.float16, "meta")
    for bad in ((4,), (2, 3, 4), (3, 2), ()):
        with pytest.raises(ValueError, match=r"^Linear\(3, 2\): expected input with last dimension 3, got "
                                             + re.escape(str(bad)) + "$"):
            layer.output_shape(bad)
    with pytest.raises(ValueError, match=r"^Linear\(0, 2\): expected in_features to be a positive int, got 0$"):
        Linear(0, 2)
    with pytest.raises(ValueError, match=r"^Linear\(3, 0\): expected out_features to be a positive int, got 0$"):
        Linear(3, 0)


def test_batch_norm_layer_matches_nn_batch_norm_and_names_itself_and_each_bad_argument():
    k = layers.random.key(6)
    layer = BatchNorm2d(3, momentum=0.5, eps=0.25)
    assert (layer.op, layer.kind) == ("BatchNorm2d", "BatchNorm2d(3)")
    params, state = layer.init(k, dtype=torch.float64)
    twin = nn.BatchNorm2d(3, momentum=0.5, eps=0.25, dtype=torch.float64)
    assert {n: (tuple(p.shape), p.dtype) for n, p in params.items()} == \
        {n: (tuple(p.shape), p.dtype) for n, p in twin.named_parameters()}
    assert {n: (tuple(b.shape), b.dtype) for n, b in state.items()} == \
        {n: (tuple(b.shape), b.dtype) for n, b in twin.named_buffers()}
    assert layer.param_shapes == {n: tuple(p.shape) for n, p in twin.named_parameters()}
    assert layer.state_shapes == {n: tuple(b.shape) for n, b in twin.named_buffers()}
    for tree in layer.init(k, device="meta"):
        assert {t.device.type for t in tree.values()} == {"meta"}
    x = torch.randn(4, 3, 5, 2, dtype=torch.float64)
    y, new = layer.apply(params, state, x, train=True)
    # same formula as torch, summed in another order: a few ulps of float64
    torch.testing.assert_close(y, twin(x), rtol=1e-12, atol=1e-12)
    for n, b in twin.named_buffers():
        torch.testing.assert_close(new[n], b, rtol=1e-12, atol=1e-12)
    for shape in ((4, 3, 5, 2), torch.Size([1, 3, 1, 1])):
        declared = layer.output_shape(shape)
        assert declared == tuple(shape) and type(declared) is tuple and all(type(s) is int for s in declared)
        assert layer.macs(shape) == math.prod(shape)  # nets.summary: one multiply-add per element
    with pytest.raises(ValueError, match=r"^BatchNorm2d\(3\): expected input with 3 channels, got \(4, 2, 5, 2\)$"):
        layer.output_shape((4, 2, 5, 2))
    with pytest.raises(ValueError, match=r"^BatchNorm2d\(3\): expected a 4-D input shape \(N, C, H, W\), "
                                         r"got \(4, 3\)$"):
        layer.output_shape((4, 3))
    with pytest.raises(ValueError, match=r"^BatchNorm2d\(0\): expected num_features to be a positive int, got 0$"):
        BatchNorm2d(0)


def test_flatten_layer_matches_nn_flatten_and_refuses_a_shape_without_a_batch_axis():
    layer = Flatten()
    assert (layer.op, layer.kind) == ("Flatten", "Flatten")
    assert layer.init(layers.random.key(0)) == ({}, {}) and layer.param_shapes == {} == layer.state_shapes
    for shape in ((2, 3, 4, 5), (2, 7), torch.Size([3, 1, 4])):
        x = torch.randn(shape, dtype=torch.float64)
        y, _ = layer.apply({}, {}, x, train=False)
        assert torch.equal(y, nn.Flatten()(x))
        declared = layer.output_shape(shape)
        assert declared == tuple(y.shape) and type(declared) is tuple and all(type(s) is int for s in declared)
        assert layer.macs(shape) == 0
    with pytest.raises(ValueError, match=r"^Flatten: expected an input shape with a batch axis and at least "
                                         r"one more, got \(5,\)$"):
        layer.output_shape((5,))


def test_conv_layer_matches_nn_conv2d_and_names_itself_and_each_bad_argument():
    k = layers.random.key(7)
    layer = Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    assert (layer.op, layer.kind) == ("Conv2d", "Conv2d(4, 6, 3x2, stride 2, pad 1)")
    assert Conv2d(4, 6, 3, bias=False).kind == "Conv2d(4, 6, 3x3, stride 1, pad 0, no bias)"
    params, state = layer.init(k, dtype=torch.float64)
    twin = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2,
                     dtype=torch.float64)
    assert state == {} and {n: (tuple(p.shape), p.dtype) for n, p in params.items()} == \
        {n: (tuple(p.shape), p.dtype) for n, p in twin.named_parameters()}
    assert layer.param_shapes == {n: tuple(p.shape) for n, p in twin.named_parameters()}
    assert all(type(s) is int for s in layer.param_shapes["weight"])
    with torch.no_grad():
        twin.weight.copy_(params["weight"]), twin.bias.copy_(params["bias"])
    for shape in ((2, 4, 7, 9), torch.Size([1, 4, 2, 3])):
        x = torch.randn(shape, dtype=torch.float64)
        y, _ = layer.apply(params, state, x, train=False)
        assert torch.equal(y, twin(x))  # the same F.conv2d call with the same arguments: bit for bit
        declared = layer.output_shape(shape)
        assert declared == tuple(y.shape) and type(declared) is tuple and all(type(s) is int for s in declared)
        # nets.summary: each output sums (C_in / groups) * kh * kw products
        assert layer.macs(shape) == y.numel() * (4 // 2) * 3 * 2 and type(layer.macs(shape)) is int
    # the scheme, bias flag, groups, dtype and device reach layers.init; a callable gets the same key
    assert torch.equal(Conv2d(4, 6, 3, init="normal", groups=2).init(k)[0]["weight"],
                       layers.init.conv2d_params(k, 4, 6, 3, groups=2, scheme="normal")["weight"])
    assert set(Conv2d(4, 6, 3, bias=False).init(k)[0]) == {"weight"}
    assert {p.device.type for p in Conv2d(4, 6, 3).init(k, device="meta")[0].values()} == {"meta"}
    seen = []
    custom = Conv2d(4, 6, 3, init=lambda key, *, dtype, device: seen.append((key, dtype, device)) or {})
    assert custom.init(k, dtype=torch.float16, device="meta") == ({}, {})
    assert len(seen) == 1 and torch.equal(seen[0][0], k) and seen[0][1:] == (torch.float16, "meta")
    # every refusal names the layer, the argument and what came
    with pytest.raises(ValueError, match=r"^Conv2d\(4, 6\): expected padded input width >= dilated kernel width 3, "
                       r"got input \(1, 4, 9, 2\)$"):
        layer.output_shape((1, 4, 9, 2))
    for name, value in (("in_channels", 0), ("out_channels", 0), ("groups", 0)):
        kwargs = {"in_channels": 4, "out_channels": 6, "groups": 1, name: value}
        where = re.escape(f"Conv2d({kwargs['in_channels']}, {kwargs['out_channels']})")
        with pytest.raises(ValueError, match=rf"^{where}: expected {name} to be a positive int, got 0$"):
            Conv2d(kwargs["in_channels"], kwargs["out_channels"], 3, groups=kwargs["groups"])
    for name, minimum in (("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1)):
        kwargs = {"kernel_size": 3, name: (1, minimum - 1)}
        with pytest.raises(ValueError, match=rf"^Conv2d\(4, 6\): expected {name} >= {minimum}, "
                                             rf"got \(1, {minimum - 1}\)$"):
            Conv2d(4, 6, **kwargs)
        kwargs[name] = "2"
        with pytest.raises(TypeError, match=rf"^Conv2d\(4, 6\): expected {name} to be an int or a pair of ints, "
                                            r"got '2'$"):
            Conv2d(4, 6, **kwargs)
    # groups must divide both channel counts: each alone is refused
    for c_in, c_out in ((4, 6), (3, 6), (4, 3)):
        if c_in % 2 == 0 and c_out % 2 == 0:
            continue
        with pytest.raises(ValueError, match=rf"^Conv2d\({c_in}, {c_out}\): expected groups to divide "
                                             r"in_channels and out_channels, got groups=2$"):
            Conv2d(c_in, c_out, 3, groups=2)
    with pytest.raises(ValueError, match=r"^Conv2d\(4, 6\): expected init to be one of .* or a callable, "
                                         r"got 'nope'$"):
        Conv2d(4, 6, 3, init="nope")


def test_relu_and_adaptive_pool_layers_match_torch_nn_and_name_themselves():
    relu = ReLU()
    assert (relu.op, relu.kind) == ("ReLU", "ReLU")
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    assert torch.equal(relu.apply({}, {}, x, train=True)[0], nn.ReLU()(x))
    assert relu.output_shape(torch.Size([2, 3])) == (2, 3) and relu.macs((2, 3)) == 0
    pool = AdaptiveAvgPool2d((2, 3))
    assert (pool.op, pool.kind) == ("AdaptiveAvgPool2d", "AdaptiveAvgPool2d(2x3)")
    assert AdaptiveAvgPool2d(2).kind == "AdaptiveAvgPool2d(2x2)"
    y, _ = pool.apply({}, {}, x, train=False)
    assert torch.equal(y, nn.AdaptiveAvgPool2d((2, 3))(x))  # same kernel: bit for bit
    assert pool.output_shape(torch.Size([2, 3, 5, 4])) == tuple(y.shape) == (2, 3, 2, 3)
    assert pool.macs((2, 3, 5, 4)) == 0
    with pytest.raises(ValueError, match=r"^AdaptiveAvgPool2d\(\(2, 3\)\): expected a 4-D input shape "
                                         r"\(N, C, H, W\), got \(2, 3\)$"):
        pool.output_shape((2, 3))
    with pytest.raises(ValueError, match=r"^AdaptiveAvgPool2d\(0\): expected output_size >= 1, got 0$"):
        AdaptiveAvgPool2d(0)
    with pytest.raises(TypeError, match=r"^AdaptiveAvgPool2d\(None\): expected output_size to be an int or "
                                        r"a pair of ints, got None$"):
        AdaptiveAvgPool2d(None)


# ----------------------------------------------------------------------------- the Sequential and Net records
# serial's record and as_net's Net pinned whole: kind and op, children's keys, the shape and
# multiply-add rules chained through the children, the device rule, and every refusal message.

def _conv_to_linear_children():
    return (Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2), Flatten(), Dropout(0.5),
            Linear(4 * 4 * 4, 5))


def test_serial_is_a_sequential_record_chaining_its_childrens_shapes_costs_and_keys():
    flat = serial(*_conv_to_linear_children())
    a = _conv_to_linear_children()
    nested = serial(features=serial(*a[:4]), classifier=serial(*a[4:]))
    shape = (2, 3, 8, 8)
    # conv: each of 2*4*8*8 outputs sums 3*3*3 products; batch norm one per element; the pool,
    # ReLU, Flatten and Dropout none; Linear 2*5 outputs of 64 products each
    macs = 2 * 4 * 8 * 8 * 3 * 3 * 3 + 2 * 4 * 8 * 8 + 2 * 5 * 64
    k = layers.random.key(11)
    for layer, n in ((flat, 7), (nested, 2)):
        assert (layer.kind, layer.op, layer.stochastic) == ("Sequential", "Sequential", True)
        assert layer.output_shape(shape) == (2, 5) and layer.output_shape(torch.Size([1, 3, 8, 8])) == (1, 5)
        assert layer.macs(shape) == macs and type(layer.macs(shape)) is int
        assert torch.equal(torch.stack(list(layer.child_keys(k))), layers.random.split(k, n))
        net = as_net(layer, name="seq")
        assert net.layer is layer and net.name == "seq"
        params, state = net.init(k, dtype=torch.float64)
        y, _ = net.apply(params, state, torch.randn(shape, dtype=torch.float64), train=False)
        assert tuple(y.shape) == layer.output_shape(shape)
    for stochastic in (serial(ReLU(), Dropout(0.0)), serial(a=serial(ReLU()), b=serial(Flatten()))):
        assert stochastic.stochastic is False
    assert serial(a=serial(ReLU()), b=serial(Dropout(0.25))).stochastic is True
    with pytest.raises(ValueError, match=r"^Linear\(64, 5\): expected input with last dimension 64, "
                                         r"got \(2, 48\)$"):
        flat.macs((2, 3, 6, 8))


def test_init_puts_every_tensor_on_the_given_device_or_else_the_keys():
    """Batch-norm state is made with torch.zeros: it lands on the key's device only if the
    device is handed down through as_net and every serial."""
    def all_on(trees):
        return {v.device.type for tree in trees for v in tree.values()}

    net = as_net(serial(body=serial(Linear(2, 3), BatchNorm2d(3))), name="dev")
    assert all_on(net.init(layers.random.key(0, device="meta"))) == {"meta"}
    assert all_on(net.init(layers.random.key(0), device="meta")) == {"meta"}
    assert all_on(net.init(layers.random.key(0))) == {"cpu"}
    assert all_on(net.layer.init(layers.random.key(0), device="meta")) == {"meta"}


def test_compose_refusals_name_the_net_or_serial_and_what_came_whole():
    net = tiny_net()
    params, state = net.init(layers.random.key(0))
    x, _ = _inputs(0, dtype=torch.float32)
    key_msg = r"expected a random key \(int64 tensor of shape \(2,\) from layers.random.key\), got "
    with pytest.raises(TypeError, match=r"^tiny.apply: expected params to be a dict of tensors, got list$"):
        net.apply(list(params.values()), state, x, train=False)
    with pytest.raises(TypeError, match=r"^tiny.apply: expected state to be a dict of tensors, got tuple$"):
        net.apply(params, (), x, train=False)
    with pytest.raises(TypeError, match=r"^as_net: expected a nets.compose.Layer, got ReLU$"):
        as_net(nn.ReLU(), name="torch")
    with pytest.raises(ValueError, match=rf"^tiny.init: {key_msg}torch.int64 tensor of shape \(3,\)$"):
        net.init(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^tiny.init: expected a floating dtype, got torch.int64$"):
        net.init(layers.random.key(0), dtype=torch.int64)
    with pytest.raises(ValueError, match=rf"^serial.init: {key_msg}torch.float32 tensor of shape \(2,\)$"):
        net.layer.init(torch.zeros(2))
    with pytest.raises(TypeError, match=r"^serial: expected layers either all positional or all by keyword, "
                                        r"got both$"):
        serial(ReLU(), head=ReLU())
    with pytest.raises(ValueError, match=r"^serial: expected at least one layer, got none$"):
        serial()


def test_init_refuses_a_layer_initialiser_that_makes_other_names_saying_params_or_state():
    def extra(key, *, dtype, device):
        return {"weight": torch.zeros(2, 3, dtype=dtype), "bias": torch.zeros(2, dtype=dtype),
                "scale": torch.ones((), dtype=dtype)}

    with pytest.raises(ValueError, match=r"^wrong.init: expected params with the 2 keys of init, got 3 keys "
                                         r"\(missing \[\], unexpected \['0.scale'\]\)$"):
        as_net(serial(Linear(3, 2, init=extra)), name="wrong").init(layers.random.key(0))
    bn = BatchNorm2d(2)
    stateless = bn._replace(init=lambda key, *, dtype, device: (bn.init(key, dtype=dtype, device=device)[0], {}))
    with pytest.raises(ValueError, match=r"^bn.init: expected state with the 3 keys of init, got 0 keys "
                                         r"\(missing \['0.num_batches_tracked', '0.running_mean', "
                                         r"'0.running_var'\], unexpected \[\]\)$"):
        as_net(serial(stateless), name="bn").init(layers.random.key(0))
    flat_var = bn._replace(init=lambda key, *, dtype, device: (
        bn.init(key)[0], {**bn.init(key)[1], "running_var": torch.ones(1, 2)}))
    with pytest.raises(ValueError, match=r"^bn.init: a layer initialiser made state of the wrong shape: "
                                         r"\['0.running_var: declared \(2,\), made \(1, 2\)'\]$"):
        as_net(serial(flat_var), name="bn").init(layers.random.key(0))
