"""The written-out backward passes: each layer's impl="explicit" is a torch.autograd.Function
(``Explicit*`` in layers/*.py) whose backward is the derivation in its docstring. It equals
autograd of the fast formulation (hypothesis draws hyperparameters and values, ties included),
passes torch.autograd.gradcheck (and gradgradcheck) in float64, and runs under torch.func grad,
vmap and jacrev."""
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.func import grad, jacrev, vjp, vmap

import layers
from layers import random as jr
from nets.compose import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear,
                          MaxPool2d, ReLU, as_net, serial)
# The parity tests' cases (layers.testing): shapes, hyperparameters, train / eval / no running
# statistics, eps, constant channels; their dtypes are not used: these tests run in float64.
from layers.testing import (batch_norm_cases, check_autograd_function, conv2d_cases, layouts,
                            make_input, max_pool2d_cases, value_kinds)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")]

D = torch.float64
# float64 throughout. The written-out backward and ATen's kernels compute the same sums in a
# different order: at most C/G*kh*kw = 6*3*3 = 54 products (conv), 3*4*4 = 48 values per channel
# (batch norm), 3*9*9 overlapping windows (pooling) or 5 classes and 3*3*3 elements (loss), each
# O(1), so they agree to ~1e-14. 1e-10 leaves room for that and still catches any wrong term,
# which is off by O(1).
TOL = dict(rtol=1e-10, atol=1e-10)
SEEDS = st.integers(0, 2**31 - 1)


def randn(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale


def values(shape, seed, kind):
    """Normal values, or few small integers: exact zeros (relu), ties (max-pool), constant channels."""
    if kind == "ints":
        return torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(seed)).to(D)
    return randn(shape, seed)


def assert_vjp_matches_fast(f, args, seed):
    """``f("explicit", *args)`` and ``f("fast", *args)`` agree in value and in the vector-Jacobian
    product with a random cotangent, for every argument (all of them are differentiated)."""
    y_fast, pull_fast = vjp(lambda *a: f("fast", *a), *args)
    y_explicit, pull_explicit = vjp(lambda *a: f("explicit", *a), *args)
    torch.testing.assert_close(y_explicit, y_fast, **TOL)
    cotangent = randn(y_fast.shape, seed + 1)
    for i, (got, want) in enumerate(zip(pull_explicit(cotangent), pull_fast(cotangent))):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"argument {i}: {m}")


# ----------------------------------------------------------------------------- against autograd

def conv_cases():
    """The parity cases as (input shape, weight shape, bias, hyperparameters)."""
    pair = lambda v: v if isinstance(v, (tuple, str)) else (v, v)     # noqa: E731 (as _padding takes them)
    return conv2d_cases(max_batch=2).map(lambda c: dict(
        shape=c.input_shape, weight=tuple(c.module.weight.shape), bias=c.module.bias is not None,
        hyper={k: (v if k == "groups" else pair(v)) for k, v in c.kwargs.items() if k != "impl"}))


@settings(max_examples=40)
@given(case=conv_cases(), seed=SEEDS)
def test_conv2d_backward_equals_autograd_of_fast_for_stride_padding_dilation_groups(case, seed):
    args = [randn(case["shape"], seed), randn(case["weight"], seed + 2)]
    if case["bias"]:
        args.append(randn(case["weight"][:1], seed + 3))

    def f(impl, x, weight, *bias):
        params = {"weight": weight, **({"bias": bias[0]} if bias else {})}
        return layers.conv2d(params, x, impl=impl, **case["hyper"])

    assert_vjp_matches_fast(f, args, seed)


@settings(max_examples=15)
@given(case=conv_cases(), seed=SEEDS)
def test_conv2d_input_gradient_is_the_transposed_convolution_of_the_output_gradient(case, seed):
    x, weight = randn(case["shape"], seed), randn(case["weight"], seed + 2)
    hyper = case["hyper"]
    y, pullback = vjp(lambda x: layers.conv2d({"weight": weight}, x, impl="explicit", **hyper), x)
    dy = randn(y.shape, seed + 1)
    batched = (lambda t: t) if x.dim() == 4 else (lambda t: t.unsqueeze(0))      # noqa: E731
    dx = F.conv_transpose2d(batched(dy), weight, stride=hyper["stride"], dilation=hyper["dilation"],
                            groups=hyper["groups"])
    (pt, pb), (pl, pr) = layers.conv._padding(hyper["padding"], case["weight"][2:], hyper["dilation"],
                                              hyper["stride"], "test")
    h, w = x.shape[-2:]
    # Rows and columns the stride left over get nothing: zero-fill to the padded size, then crop.
    dx = F.pad(dx, (0, w + pl + pr - dx.shape[-1], 0, h + pt + pb - dx.shape[-2]))
    dx = dx[..., pt:pt + h, pl:pl + w]
    torch.testing.assert_close(pullback(dy)[0], dx if x.dim() == 4 else dx.squeeze(0), **TOL)


def pool_cases():
    """The parity cases (windows of padding only already left out) as (shape, hyperparameters)."""
    return max_pool2d_cases().map(lambda c: dict(
        shape=c.input_shape, hyper={k: v for k, v in c.kwargs.items() if k != "impl"}))


def _refused(f):
    try:
        f()
    except ValueError:      # a window of padding only: refused by both formulations (tested elsewhere)
        return True
    return False


@settings(max_examples=40)
@given(case=pool_cases(), kind=st.sampled_from(["normal", "ints"]), seed=SEEDS)
def test_max_pool2d_backward_routes_to_the_first_maximum_as_autograd_of_fast(case, kind, seed):
    x = values(case["shape"], seed, kind)
    assume(not _refused(lambda: layers.max_pool2d(x, **case["hyper"])))
    assert_vjp_matches_fast(lambda impl, x: layers.max_pool2d(x, **case["hyper"], impl=impl), [x], seed)


@settings(max_examples=10)
@given(size=st.tuples(st.integers(1, 9), st.integers(1, 9)), n=st.integers(0, 2),
       out=st.one_of(st.integers(1, 10), st.tuples(st.one_of(st.none(), st.integers(1, 10)),
                                                   st.one_of(st.none(), st.integers(1, 10)))),
       seed=SEEDS)
def test_adaptive_avg_pool2d_backward_equals_autograd_of_fast(size, n, out, seed):
    x = randn(((n,) if n else ()) + (2, *size), seed)
    assert_vjp_matches_fast(lambda impl, x: layers.adaptive_avg_pool2d(x, out, impl=impl), [x], seed)


@settings(max_examples=40)
@given(case=batch_norm_cases(), layout=layouts(), kind=value_kinds(), train=st.booleans(), seed=SEEDS)
def test_batch_norm_backward_equals_autograd_of_fast_in_train_and_eval(case, layout, kind, train, seed):
    x = make_input(case.input_shape, seed, D, layout, kind, **case.input_options)   # ints: constant channels
    c = case.input_shape[1]
    running, affine = case.module.track_running_stats, case.module.affine
    state = ({"running_mean": randn((c,), seed + 4), "running_var": randn((c,), seed + 5).abs() + 0.5,
              "num_batches_tracked": torch.tensor(2)} if running else {})
    args = [x] + ([randn((c,), seed + 2).abs() + 0.5, randn((c,), seed + 3)] if affine else [])

    def f(impl, x, *affine):
        params = dict(zip(("weight", "bias"), affine))
        y, _ = layers.batch_norm(params, state, x, train=train, eps=case.kwargs["eps"], impl=impl)
        return y

    assert_vjp_matches_fast(f, args, seed)


@settings(max_examples=10)
@given(lead=st.lists(st.integers(1, 3), max_size=2), sizes=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       bias=st.booleans(), seed=SEEDS)
def test_linear_backward_equals_autograd_of_fast(lead, sizes, bias, seed):
    out_features, in_features = sizes
    args = [randn(tuple(lead) + (in_features,), seed), randn(sizes, seed + 2)]
    if bias:
        args.append(randn((out_features,), seed + 3))

    def f(impl, x, weight, *b):
        return layers.linear({"weight": weight, **({"bias": b[0]} if b else {})}, x, impl=impl)

    assert_vjp_matches_fast(f, args, seed)


@settings(max_examples=15)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), kind=st.sampled_from(["normal", "ints"]),
       p=st.sampled_from([0.1, 0.5, 0.9]), seed=SEEDS)
def test_relu_log_softmax_and_dropout_backward_equal_autograd_of_fast(shape, kind, p, seed):
    x, key = values(tuple(shape), seed, kind), jr.key(seed)
    for f in (lambda impl, x: layers.relu(x, impl=impl),
              lambda impl, x: layers.log_softmax(x * 3, seed % len(shape), impl=impl),
              lambda impl, x: layers.dropout(x, p=p, train=True, key=key, impl=impl)):
        assert_vjp_matches_fast(f, [x], seed)


@st.composite
def ce_cases(draw):
    classes = draw(st.integers(1, 5))
    batched = draw(st.booleans())
    shape = ((draw(st.integers(1, 3)), classes) + tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
             if batched else (classes,))
    probabilities = draw(st.booleans())
    return dict(shape=shape, probabilities=probabilities, weight=draw(st.booleans()),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
                ignore_index=-100 if probabilities else draw(st.sampled_from([-100, 0])))


@settings(max_examples=50)
@given(case=ce_cases(), seed=SEEDS)
def test_cross_entropy_backward_is_softmax_minus_target_scaled_as_autograd_of_fast(case, seed):
    shape, class_dim = case["shape"], 0 if len(case["shape"]) == 1 else 1
    g = torch.Generator().manual_seed(seed)
    logits = randn(shape, seed, scale=3.0)
    weight = torch.rand(shape[class_dim], generator=g, dtype=D) + 0.1 if case["weight"] else None
    opts = {k: case[k] for k in ("reduction", "label_smoothing", "ignore_index")}
    if case["probabilities"]:
        target = torch.softmax(randn(shape, seed + 2), dim=class_dim)
        # torch differentiates probability targets and class weights too: so do we.
        args = [logits, target] + ([weight] if case["weight"] else [])

        def f(impl, logits, target, *w):
            return layers.cross_entropy(logits, target, weight=w[0] if w else None, impl=impl, **opts)
    else:
        target_shape = shape[:class_dim] + shape[class_dim + 1:]
        target = torch.randint(0, shape[class_dim], target_shape, generator=g)
        target = torch.where(torch.rand(target_shape, generator=g) < 0.3, case["ignore_index"], target)
        if case["reduction"] == "mean":
            assume(bool((target != case["ignore_index"]).any()))     # all ignored: 0 / 0
        args = [logits]        # torch refuses gradients for class weights here (see gradcheck)

        def f(impl, logits):
            return layers.cross_entropy(logits, target, weight=weight, impl=impl, **opts)

    assert_vjp_matches_fast(f, args, seed)


# ----------------------------------------------------------------------------- gradcheck

def _r(*shape, seed=0):
    return randn(shape, seed).requires_grad_(True)


def _positive(*shape, seed=0):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=D) + 0.5).requires_grad_(True)


_T = torch.tensor([0, 2, -100, 1])
_BN = sys.modules["layers.batch_norm"]

# Every Function with every input it differentiates, on inputs without ties or kinks (gradcheck
# compares with finite differences, which are meaningless at a tie or at relu's 0).
GRADCHECK = {
    "conv2d stride dilation groups": (
        lambda x, w, b: layers.conv2d({"weight": w, "bias": b}, x, stride=(2, 1), padding=(1, 0),
                                      dilation=(1, 2), groups=2, impl="explicit"),
        lambda: (_r(2, 4, 5, 6), _r(4, 2, 2, 2, seed=1), _r(4, seed=2))),
    "conv2d asymmetric same, unbatched": (
        lambda x, w: layers.conv2d({"weight": w}, x, padding="same", dilation=(1, 2), impl="explicit"),
        lambda: (_r(2, 4, 5), _r(3, 2, 2, 2, seed=1))),
    "linear": (lambda x, w, b: layers.linear({"weight": w, "bias": b}, x, impl="explicit"),
               lambda: (_r(2, 3, 4), _r(5, 4, seed=1), _r(5, seed=2))),
    "max_pool2d ceil padding dilation": (
        lambda x: layers.max_pool2d(x, 3, 2, 1, dilation=(1, 2), ceil_mode=True, impl="explicit"),
        lambda: (_r(2, 2, 6, 7),)),
    "adaptive_avg_pool2d overlapping": (lambda x: layers.adaptive_avg_pool2d(x, (3, 4), impl="explicit"),
                                        lambda: (_r(2, 2, 5, 6),)),
    "batch_norm train: y, mean, var": (
        lambda x, w, b: _BN.ExplicitBatchNormTrain.apply(x, w, b, 1e-5),
        lambda: (_r(3, 2, 2, 2), _positive(2, seed=1), _r(2, seed=2))),
    "batch_norm train, no affine": (lambda x: _BN.ExplicitBatchNormTrain.apply(x, None, None, 0.1),
                                    lambda: (_r(4, 3),)),
    "batch_norm eval with running-stat gradients": (
        lambda x, w, b, m, v: _BN.ExplicitBatchNormEval.apply(x, w, b, m, v, 1e-5),
        lambda: (_r(3, 2, 4), _positive(2, seed=1), _r(2, seed=2), _r(2, seed=3), _positive(2, seed=4))),
    "dropout": (lambda x: layers.dropout(x, p=0.3, train=True, key=jr.key(0), impl="explicit"),
                lambda: (_r(3, 4),)),
    "relu": (lambda x: layers.relu(x, impl="explicit"), lambda: (_r(3, 4),)),
    "gelu": (lambda x: layers.gelu(x, impl="explicit"), lambda: (_r(3, 4),)),
    "log_softmax": (lambda x: layers.log_softmax(x, 1, impl="explicit"), lambda: (_r(3, 4, 2),)),
    "cross_entropy indices, class weights, smoothing, ignore_index, mean": (
        lambda z, w: layers.cross_entropy(z, _T, weight=w, label_smoothing=0.2, impl="explicit"),
        lambda: (_r(4, 3), _positive(3, seed=1))),
    "cross_entropy indices, sum": (
        lambda z, w: layers.cross_entropy(z, _T, weight=w, reduction="sum", label_smoothing=0.2,
                                          impl="explicit"),
        lambda: (_r(4, 3), _positive(3, seed=1))),
    "cross_entropy indices over (N, C, d), none": (
        lambda z, w: layers.cross_entropy(z, _T.reshape(2, 2), weight=w, reduction="none", impl="explicit"),
        lambda: (_r(2, 3, 2), _positive(3, seed=1))),
    "cross_entropy probabilities, weights, smoothing": (
        lambda z, q, w: layers.cross_entropy(z, q, weight=w, label_smoothing=0.2, impl="explicit"),
        lambda: (_r(4, 3, 2), torch.softmax(randn((4, 3, 2), 1), 1).requires_grad_(True), _positive(3, seed=2))),
    "cross_entropy unbatched": (
        lambda z, w: layers.cross_entropy(z, torch.tensor(1), weight=w, label_smoothing=0.2, impl="explicit"),
        lambda: (_r(3), _positive(3, seed=1))),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK))
def test_written_out_backward_passes_gradcheck_gradgradcheck_and_its_vmap_rule_equals_a_loop(name):
    """layers.testing.check_autograd_function: gradcheck and gradgradcheck in float64 (double
    backward is not required, but it holds: every backward is differentiable torch ops on the
    inputs and outputs), and vmap of the forward and of the backward over 3 perturbed copies of
    the inputs equal a loop over them."""
    f, inputs = GRADCHECK[name]
    check_autograd_function(f, inputs())


# ----------------------------------------------------------------------------- which backward runs

def _outputs_with_grad_fn():
    x = _r(2, 2, 4, 4)
    key = jr.key(0)
    return {
        "ExplicitConv2d": layers.conv2d({"weight": _r(3, 2, 3, 3)}, x, impl="explicit"),
        "ExplicitLinear": layers.linear({"weight": _r(3, 4)}, x, impl="explicit"),
        "ExplicitMaxPool2d": layers.max_pool2d(x, 2, impl="explicit"),
        "ExplicitAdaptiveAvgPool2d": layers.adaptive_avg_pool2d(x, 3, impl="explicit"),
        "ExplicitBatchNormTrain": layers.batch_norm({}, {}, x, train=True, impl="explicit")[0],
        "ExplicitBatchNormEval": layers.batch_norm(
            {}, {"running_mean": torch.zeros(2, dtype=D), "running_var": torch.ones(2, dtype=D),
                 "num_batches_tracked": torch.tensor(0)}, x, train=False, impl="explicit")[0],
        "ExplicitDropout": layers.dropout(x, p=0.5, train=True, key=key, impl="explicit"),
        "ExplicitReLU": layers.relu(x, impl="explicit"),
        "ExplicitLogSoftmax": layers.log_softmax(x, 1, impl="explicit"),
        "ExplicitCrossEntropy": layers.cross_entropy(x[:, :, 0, 0], torch.tensor([0, 1]), impl="explicit"),
    }


def test_explicit_formulations_run_their_written_out_backward_and_fast_ones_do_not():
    for function, y in _outputs_with_grad_fn().items():
        assert y.grad_fn.name() == f"{function}Backward", function
    x = _r(2, 2, 4, 4)
    assert "Explicit" not in layers.conv2d({"weight": _r(3, 2, 3, 3)}, x).grad_fn.name()   # the default


# ----------------------------------------------------------------------------- torch.func

def _jacobian_cases():
    p_conv = {"weight": randn((4, 2, 2, 3), 1), "bias": randn((4,), 2)}
    p_lin = {"weight": randn((3, 5), 3), "bias": randn((3,), 4)}
    p_bn = {"weight": randn((4,), 5).abs() + 0.5, "bias": randn((4,), 6)}
    w = torch.rand(3, generator=torch.Generator().manual_seed(7), dtype=D) + 0.1
    t = torch.tensor([2, -100, 0])
    return [
        ("conv2d", lambda impl, x, p: layers.conv2d(p, x, stride=(2, 1), padding=(1, 2), dilation=(2, 1),
                                                    groups=2, impl=impl), randn((2, 4, 5, 4), 8), p_conv),
        ("conv2d same", lambda impl, x, p: layers.conv2d(p, x[:, :2], padding="same", impl=impl),
         randn((2, 4, 4, 5), 9), {"weight": randn((4, 2, 2, 2), 10)}),
        ("linear", lambda impl, x, p: layers.linear(p, x, impl=impl), randn((2, 5), 11), p_lin),
        ("max_pool2d", lambda impl, x, p: layers.max_pool2d(x, 3, 2, 1, ceil_mode=True, impl=impl),
         values((2, 2, 5, 6), 12, "ints"), {}),
        ("adaptive_avg_pool2d", lambda impl, x, p: layers.adaptive_avg_pool2d(x, (2, 3), impl=impl),
         randn((2, 2, 5, 4), 13), {}),
        ("batch_norm train", lambda impl, x, p: layers.batch_norm(p, {}, x, train=True, impl=impl)[0],
         randn((3, 4, 2, 2), 14), p_bn),
        ("cross_entropy", lambda impl, x, p: layers.cross_entropy(x, t, weight=w, label_smoothing=0.1,
                                                                  impl=impl), randn((3, 3), 15), {}),
    ]


@pytest.mark.parametrize("case", range(7), ids=[c[0] for c in _jacobian_cases()])
def test_jacrev_of_the_explicit_formulation_equals_the_fast_one_for_input_and_parameters(case):
    name, f, x, params = _jacobian_cases()[case]
    got = jacrev(lambda x, p: f("explicit", x, p), argnums=(0, 1))(x, params)
    want = jacrev(lambda x, p: f("fast", x, p), argnums=(0, 1))(x, params)
    torch.testing.assert_close(got, want, **TOL)


def small_net(dropout):
    features = serial(Conv2d(3, 4, 3, stride=2, padding=1, groups=1), BatchNorm2d(4), ReLU(),
                      Conv2d(4, 4, 3, padding=1, groups=2, bias=False), MaxPool2d(2), Dropout(dropout))
    head = serial(AdaptiveAvgPool2d(2), Flatten(), Linear(16, 5))
    return as_net(serial(features=features, classifier=head), name="small")


def test_per_sample_gradients_under_vmap_of_grad_equal_the_fast_ones():
    params = {"conv": {"weight": randn((4, 3, 3, 3), 1) * 0.3, "bias": randn((4,), 2)},
              "grouped": {"weight": randn((4, 2, 3, 3), 3) * 0.3},
              "bn": {"weight": randn((4,), 4).abs() + 0.5, "bias": randn((4,), 5)},
              "fc": {"weight": randn((5, 16), 6) * 0.3, "bias": randn((5,), 7)}}
    bn_state = {"running_mean": randn((4,), 8) * 0.1, "running_var": randn((4,), 9).abs() + 0.5,
                "num_batches_tracked": torch.tensor(3)}
    x, y = randn((4, 3, 9, 9), 10), torch.tensor([0, 4, 2, 1])
    keys = jr.split(jr.key(1), 4)

    def loss(params, xi, yi, key):
        h = layers.conv2d(params["conv"], xi[None], stride=2, padding=1)
        h = layers.conv2d(params["grouped"], h, padding="same", dilation=2, groups=2)
        h, _ = layers.batch_norm(params["bn"], bn_state, h, train=False)     # a batch of one: eval
        h = layers.max_pool2d(layers.relu(h), 3, 2, 1, ceil_mode=True)
        h = layers.dropout(h, p=0.3, train=True, key=key)
        h = layers.flatten(layers.adaptive_avg_pool2d(h, 2))
        return layers.cross_entropy(layers.linear(params["fc"], h), yi[None], label_smoothing=0.1)

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))
    want = per_sample(params, x, y, keys)
    with layers.default_impl("explicit"):
        got = per_sample(params, x, y, keys)
    torch.testing.assert_close(got, want, **TOL)


def test_nested_vmap_over_a_non_leading_axis_of_the_explicit_backward():
    x = randn((3, 2, 2, 6, 6), 2)                 # axis 1 mapped outside, axis 0 inside
    w = randn((3, 2, 3, 3), 3)

    def f(impl):
        def loss(x):
            y = layers.conv2d({"weight": w}, x, padding=1, impl=impl)
            y = layers.max_pool2d(layers.relu(y, impl=impl), 2, impl=impl)
            return layers.log_softmax(layers.adaptive_avg_pool2d(y, 1, impl=impl).flatten(), 0, impl=impl)[0]
        return vmap(vmap(grad(loss)), in_dims=1)(x)

    torch.testing.assert_close(f("explicit"), f("fast"), **TOL)


def test_a_training_step_under_the_explicit_default_equals_the_fast_one():
    net = small_net(0.3)
    params, state = net.init(jr.key(0), dtype=D)
    x, y, key = randn((4, 3, 8, 8), 4), torch.tensor([0, 4, 2, 1]), jr.key(5)

    def loss(params):
        logits, new_state = net.apply(params, state, x, train=True, key=key)
        return layers.cross_entropy(logits, y, label_smoothing=0.1), new_state

    fast_grads, fast_state = grad(loss, has_aux=True)(params)
    with layers.default_impl("explicit"):
        grads, new_state = grad(loss, has_aux=True)(params)
    for k in fast_grads:
        torch.testing.assert_close(grads[k], fast_grads[k], **TOL, msg=lambda m: f"{k}: {m}")
    for k in fast_state:
        torch.testing.assert_close(new_state[k], fast_state[k], **TOL, msg=lambda m: f"{k}: {m}")
