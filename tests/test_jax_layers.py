"""layers against JAX in float64: ``jax.lax`` / ``jax.nn`` / optax as a second reference beside torch.nn.

Every layer, in both formulations (``impl="fast"`` and ``impl="explicit"``), gives the outputs and
the gradients (a vector-Jacobian product with a random cotangent) of a reference written with JAX's
own primitives, over hyperparameters drawn by hypothesis. The key hash of ``layers.random`` is
written again in ``jax.numpy`` (uint32 arithmetic instead of masked int64) and gives the same bits,
so a key means the same draw on both sides; dropout masks and outputs are equal bit for bit.

Needs the optional extra ``purenn[jax]`` (jax and optax); skipped only when it is absent. Every
test calls ``hypothesis.target`` with its largest error, so
``pytest tests/test_jax_layers.py --hypothesis-show-statistics`` reports the worst agreement found
(docs/jax.md quotes it).
"""
import math

import pytest
import torch
from hypothesis import assume, given, settings, target
from hypothesis import strategies as st

import layers
from layers import random as jr
from layers.testing import make_input
from jax_support import jax_x64  # noqa: F401  (a fixture)
from nets import from_jax, to_jax

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytestmark = pytest.mark.usefixtures("jax_x64")
jnp = jax.numpy
lax = jax.lax

# float64 throughout. Each output element is a sum of at most ~60 products of O(1) values
# (conv: C/G * kh * kw <= 2 * 3 * 3 taps; batch norm: a mean over <= 2 * 6 * 6 values), summed in a
# different order by XLA and by torch: at most ~60 * 2.2e-16 * sum|terms| ~ 1e-13 apart in the
# worst case (measured: ~1e-15, docs/jax.md). 1e-12 leaves room and still fails on any real bug
# (a wrong pad, stride, group or statistic is off by O(1)).
TOL = dict(rtol=1e-12, atol=1e-12)
IMPLS = st.sampled_from(["fast", "explicit"])
SEEDS = st.integers(0, 2**31 - 1)
FEW = settings(deadline=None, max_examples=12)


def as_jax(t):
    # Through DLPack (nets.to_jax): jnp.asarray would compile an identity program per shape.
    return to_jax(t.detach().clone())


def as_torch(a):
    return from_jax(a).clone()


def max_error(got, want):
    """Largest of |got - want| / (1 + |want|) (both finite here), the quantity TOL bounds."""
    got, want = got.detach(), want.detach()
    return float(((got - want).abs() / (1 + want.abs())).max()) if want.numel() else 0.0


def reference_vjp(reference, args, cot):
    """``reference(*args)`` and its vector-Jacobian product with ``cot``, as one jitted function:
    one compilation per drawn shape instead of one per primitive keeps the suite fast."""
    def both(args, cot):
        y, vjp = jax.vjp(reference, *args)
        return y, vjp(cot)
    return jax.jit(both)(args, cot)


def check_vjp(ours, reference, args, seed, label):
    """``ours(*tensors)`` and ``reference(*jax_arrays)`` agree, and so do their gradients with
    respect to every argument for one random cotangent. Returns the torch output."""
    y = ours(*args)
    cot = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(y, args, cot, allow_unused=True) if y.requires_grad else [None] * len(args)
    y_ref, grads_ref = reference_vjp(reference, [as_jax(a) for a in args], as_jax(cot))
    assert tuple(y.shape) == tuple(y_ref.shape), label
    errors = [max_error(y, as_torch(y_ref))]
    torch.testing.assert_close(y.detach(), as_torch(y_ref), **TOL, msg=f"{label}: output")
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        g = torch.zeros_like(args[i]) if g is None else g
        torch.testing.assert_close(g, as_torch(g_ref), **TOL, msg=f"{label}: gradient of arg {i}")
        errors.append(max_error(g, as_torch(g_ref)))
    target(max(errors), label=label)
    return y


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# ------------------------------------------------------------------------------ conv2d


@st.composite
def conv_case(draw):
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
                             st.sampled_from(["valid", "same"])))
    stride = (1, 1) if padding == "same" else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = (padding, padding) if isinstance(padding, int) else padding
    # Inputs at least as large as the dilated kernel once padded (with "same", any size works).
    spatial = [draw(st.integers(max(1, d * (k - 1) + 1 - (0 if isinstance(p, str) else 2 * p)), 6))
               for k, d, p in zip(kernel, dilation, pads if not isinstance(padding, str) else ("", ""))]
    return dict(groups=groups, c_in=c_in, c_out=c_out, kernel=kernel, dilation=dilation,
                padding=padding, stride=stride, spatial=spatial,
                n=draw(st.integers(1, 2)), bias=draw(st.booleans()))


def lax_conv(case):
    """conv2d as ``lax.conv_general_dilated`` (NCHW / OIHW, JAX's own "SAME" and "VALID")."""
    p = case["padding"]
    if p == "same":
        padding = "SAME"
    elif p == "valid":
        padding = "VALID"
    else:
        ph, pw = (p, p) if isinstance(p, int) else p
        padding = ((ph, ph), (pw, pw))

    def conv(x, w, b=None):
        y = lax.conv_general_dilated(x, w, case["stride"], padding, rhs_dilation=case["dilation"],
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                     feature_group_count=case["groups"],
                                     precision=lax.Precision.HIGHEST)
        return y if b is None else y + b[None, :, None, None]
    return conv


# torch warns that "same" padding with an even kernel may copy the input: expected, and drawn here.
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@FEW
@given(case=conv_case(), impl=IMPLS, seed=SEEDS)
def test_conv2d_equals_lax_conv_general_dilated_with_gradients(case, impl, seed):
    g = torch.Generator().manual_seed(seed)
    x = leaf(torch.randn(case["n"], case["c_in"], *case["spatial"], dtype=torch.float64, generator=g))
    w = leaf(torch.randn(case["c_out"], case["c_in"] // case["groups"], *case["kernel"],
                         dtype=torch.float64, generator=g))
    args = [x, w] + ([leaf(torch.randn(case["c_out"], dtype=torch.float64, generator=g))]
                     if case["bias"] else [])
    hyper = {k: case[k] for k in ("stride", "padding", "dilation", "groups")}

    def ours(x, w, b=None):
        params = {"weight": w} if b is None else {"weight": w, "bias": b}
        return layers.conv2d(params, x, **hyper, impl=impl)
    check_vjp(ours, lax_conv(case), args, seed + 1, f"conv2d/{impl}")


# -------------------------------------------------------------------------- max_pool2d


def torch_pool_size(size, k, s, p, d, ceil_mode):
    """torch.nn.MaxPool2d's output length (its documented formula, with the ceil-mode rule that
    a last window starting in the right padding is dropped)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (math.ceil(span / s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


@st.composite
def pool_case(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    spatial = [draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), d * (k - 1) + 5))
               for k, p, d in zip(kernel, padding, dilation)]
    # Windows of padding only are refused by layers (torch returns -inf): not parity cases.
    for size, k, p, d, s in zip(spatial, kernel, padding, dilation, stride):
        assume(all(any(0 <= i * s - p + u * d < size for u in range(k)) for i in range(p)))
    return dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                ceil_mode=draw(st.booleans())), spatial


def lax_max_pool(hyper, spatial):
    """max_pool2d as ``lax.reduce_window(max)`` from -inf, padded on the right as far as torch's
    output size needs (ceil mode)."""
    pads = []
    for size, k, s, p, d in zip(spatial, hyper["kernel_size"], hyper["stride"], hyper["padding"],
                                hyper["dilation"]):
        out = torch_pool_size(size, k, s, p, d, hyper["ceil_mode"])
        pads.append((p, max(p, (out - 1) * s + d * (k - 1) + 1 - size - p)))

    def pool(x):
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1) + hyper["kernel_size"],
                                 (1, 1) + hyper["stride"], ((0, 0), (0, 0)) + tuple(pads),
                                 window_dilation=(1, 1) + hyper["dilation"])
    return pool


@FEW
@given(case=pool_case(), values=st.sampled_from(["normal", "ints"]), impl=IMPLS, seed=SEEDS)
def test_max_pool2d_equals_lax_reduce_window_and_ties_route_to_the_first_maximum(case, values, impl, seed):
    hyper, spatial = case
    x = leaf(make_input((2, 2, *spatial), seed, torch.float64, "contiguous", values))
    ours = lambda x: layers.max_pool2d(x, **hyper, impl=impl)  # noqa: E731
    if hyper["dilation"] == (1, 1):
        # "ints" draws many tied windows: JAX's select-and-scatter also picks the first maximum.
        check_vjp(ours, lax_max_pool(hyper, spatial), [x], seed + 1, f"max_pool2d/{impl}")
        return
    # Known difference: JAX has no gradient for a dilated max-pool; outputs still agree.
    y_ref = lax_max_pool(hyper, spatial)(as_jax(x))
    torch.testing.assert_close(ours(x).detach(), as_torch(y_ref), rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="dilation"):
        jax.grad(lambda x: lax_max_pool(hyper, spatial)(x).sum())(as_jax(x))


# ------------------------------------------------------------------ adaptive_avg_pool2d


@FEW
@given(h=st.integers(1, 7), w=st.integers(1, 7), oh=st.integers(1, 4), ow=st.integers(1, 4),
       impl=IMPLS, seed=SEEDS)
def test_adaptive_avg_pool2d_equals_jnp_means_over_torch_windows(h, w, oh, ow, impl, seed):
    def windows(out, size):   # torch's adaptive windows [floor(i H / O), ceil((i + 1) H / O))
        return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]

    def reference(x):
        rows = [jnp.stack([x[..., r0:r1, c0:c1].mean(axis=(-2, -1)) for c0, c1 in windows(ow, w)], -1)
                for r0, r1 in windows(oh, h)]
        return jnp.stack(rows, -2)
    x = leaf(make_input((2, 3, h, w), seed, torch.float64, "contiguous", "normal"))
    check_vjp(lambda x: layers.adaptive_avg_pool2d(x, (oh, ow), impl=impl), reference, [x], seed + 1,
              f"adaptive_avg_pool2d/{impl}")


# -------------------------------------------------------------------------- batch_norm


@st.composite
def bn_case(draw):
    rank = draw(st.sampled_from([2, 3, 4]))
    c = draw(st.integers(1, 3))
    shape = (draw(st.integers(2, 4)), c) + tuple(draw(st.integers(1, 5)) for _ in range(rank - 2))
    return dict(shape=shape, train=draw(st.booleans()), affine=draw(st.booleans()),
                running=draw(st.booleans()),
                momentum=draw(st.one_of(st.none(), st.sampled_from([0.1, 1.0]), st.floats(0.0, 1.0))),
                eps=draw(st.sampled_from([1e-5, 1e-3, 0.5])))


def jnp_batch_norm(case, running_mean, running_var, count):
    """Batch norm written in jax.numpy from torch.nn.BatchNorm's documentation: batch mean and
    biased variance in training, running update with the unbiased variance."""
    axes = (0,) + tuple(range(2, len(case["shape"])))
    bshape = (1, -1) + (1,) * (len(case["shape"]) - 2)

    def bn(x, w=None, b=None):
        use_batch = case["train"] or not case["running"]
        mean = x.mean(axis=axes) if use_batch else running_mean
        var = x.var(axis=axes) if use_batch else running_var
        y = (x - mean.reshape(bshape)) / jnp.sqrt(var.reshape(bshape) + case["eps"])
        if w is not None:
            y = y * w.reshape(bshape) + b.reshape(bshape)
        return y
    if not (case["train"] and case["running"]):
        return bn, None

    def new_state(x):
        f = case["momentum"] if case["momentum"] is not None else 1.0 / (count + 1)
        return {"running_mean": (1 - f) * running_mean + f * x.mean(axis=axes),
                "running_var": (1 - f) * running_var + f * x.var(axis=axes, ddof=1)}
    return bn, new_state


@FEW
@given(case=bn_case(), impl=IMPLS, seed=SEEDS)
def test_batch_norm_equals_jnp_formula_in_train_and_eval_with_the_running_update(case, impl, seed):
    g = torch.Generator().manual_seed(seed)
    c = case["shape"][1]
    x = leaf(torch.randn(case["shape"], dtype=torch.float64, generator=g) * 2 + 0.5)
    count = int(torch.randint(0, 5, (), generator=g))
    state = {"running_mean": torch.randn(c, dtype=torch.float64, generator=g),
             "running_var": torch.rand(c, dtype=torch.float64, generator=g) + 0.5,
             "num_batches_tracked": torch.tensor(count)} if case["running"] else {}
    params = ([leaf(torch.randn(c, dtype=torch.float64, generator=g)) for _ in range(2)]
              if case["affine"] else [])
    bn, new_state = jnp_batch_norm(case, *(as_jax(state[k]) for k in ("running_mean", "running_var"))
                                   if state else (None, None), count)
    out = {}

    def ours(x, w=None, b=None):
        y, out["state"] = layers.batch_norm({"weight": w, "bias": b} if w is not None else {}, state,
                                            x, train=case["train"], momentum=case["momentum"],
                                            eps=case["eps"], impl=impl)
        return y
    check_vjp(ours, bn, [x] + params, seed + 1, f"batch_norm/{impl}")
    if new_state is None:   # eval, or no running statistics: the state comes back unchanged
        assert out["state"] is state or all(torch.equal(out["state"][k], state[k]) for k in state)
        return
    want = new_state(as_jax(x))
    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(out["state"][k], as_torch(want[k]), **TOL, msg=k)
    assert int(out["state"]["num_batches_tracked"]) == count + 1


# ------------------------------------------------------------- linear, relu, log_softmax


@FEW
@given(batch=st.lists(st.integers(1, 3), max_size=2), d_in=st.integers(1, 6), d_out=st.integers(1, 6),
       bias=st.booleans(), impl=IMPLS, seed=SEEDS)
def test_linear_equals_lax_dot_general(batch, d_in, d_out, bias, impl, seed):
    g = torch.Generator().manual_seed(seed)
    x = leaf(torch.randn(*batch, d_in, dtype=torch.float64, generator=g))
    args = [x, leaf(torch.randn(d_out, d_in, dtype=torch.float64, generator=g))]
    args += [leaf(torch.randn(d_out, dtype=torch.float64, generator=g))] if bias else []

    def reference(x, w, b=None):
        y = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST)
        return y if b is None else y + b

    def ours(x, w, b=None):
        return layers.linear({"weight": w} if b is None else {"weight": w, "bias": b}, x, impl=impl)
    check_vjp(ours, reference, args, seed + 1, f"linear/{impl}")


@FEW
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), values=st.sampled_from(["normal", "ints"]),
       impl=IMPLS, seed=SEEDS)
def test_relu_equals_jax_nn_relu_with_zero_gradient_at_zero(shape, values, impl, seed):
    x = leaf(make_input(tuple(shape), seed, torch.float64, "contiguous", values))
    check_vjp(lambda x: layers.relu(x, impl=impl), jax.nn.relu, [x], seed + 1, f"relu/{impl}")


@FEW
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data(), scale=st.sampled_from([1.0, 30.0]),
       impl=IMPLS, seed=SEEDS)
def test_log_softmax_equals_jax_nn_log_softmax(shape, data, scale, impl, seed):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = leaf(make_input(tuple(shape), seed, torch.float64, "contiguous", "normal", scale=scale))
    check_vjp(lambda x: layers.log_softmax(x, dim, impl=impl),
              lambda x: jax.nn.log_softmax(x, axis=dim), [x], seed + 1, f"log_softmax/{impl}")


# ----------------------------------------------------------------------- cross_entropy


@st.composite
def ce_case(draw):
    classes = draw(st.integers(2, 5))
    shape = (draw(st.integers(1, 4)), classes) + ((draw(st.integers(1, 3)),) if draw(st.booleans()) else ())
    return dict(shape=shape, classes=classes, probabilities=draw(st.booleans()),
                weighted=draw(st.booleans()), smoothing=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
                ignore_index=draw(st.sampled_from([-100, 0, 1])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])))


def optax_cross_entropy(case, target, weight):
    """torch's cross-entropy through optax's losses: class weights and label smoothing are one
    weighted, smoothed target ``w * smooth_labels(q, eps)``; ignored elements are masked out and
    leave the weighted mean's denominator, as torch documents."""
    k, eps = case["classes"], case["smoothing"]
    w = jnp.ones(k) if weight is None else weight

    def ce(logits):
        z = jnp.moveaxis(logits, 1, -1)                          # classes last, as optax wants
        if case["probabilities"]:
            per = optax.softmax_cross_entropy(z, w * optax.smooth_labels(jnp.moveaxis(target, 1, -1), eps))
            count = per.size
        else:
            valid = target != case["ignore_index"]
            t = jnp.where(valid, target, 0)
            if eps == 0 and weight is None:
                per = optax.softmax_cross_entropy_with_integer_labels(z, t)
            else:
                per = optax.softmax_cross_entropy(z, w * optax.smooth_labels(jax.nn.one_hot(t, k), eps))
            per = jnp.where(valid, per, 0.0)
            count = jnp.where(valid, w[t], 0.0).sum()
        if case["reduction"] == "none":
            return per
        return per.sum() / count if case["reduction"] == "mean" else per.sum()
    return ce


@FEW
@given(case=ce_case(), impl=IMPLS, seed=SEEDS)
def test_cross_entropy_equals_optax_losses_with_smoothing_weights_and_ignore_index(case, impl, seed):
    g = torch.Generator().manual_seed(seed)
    logits = leaf(torch.randn(case["shape"], dtype=torch.float64, generator=g) * 3)
    if case["probabilities"]:
        target = torch.softmax(torch.randn(case["shape"], dtype=torch.float64, generator=g) * 2, 1)
        hyper = {}
    else:
        index_shape = case["shape"][:1] + case["shape"][2:]
        target = torch.randint(0, case["classes"], index_shape, generator=g)
        ignored = torch.rand(index_shape, generator=g) < 0.3
        target = torch.where(ignored, torch.tensor(case["ignore_index"]), target)
        if case["reduction"] == "mean":
            assume(bool((target != case["ignore_index"]).any()))   # else torch's mean is 0 / 0
        hyper = dict(ignore_index=case["ignore_index"])
    weight = torch.rand(case["classes"], dtype=torch.float64, generator=g) + 0.2 if case["weighted"] else None
    ce = optax_cross_entropy(case, as_jax(target), None if weight is None else as_jax(weight))
    check_vjp(lambda z: layers.cross_entropy(z, target, weight=weight, reduction=case["reduction"],
                                             label_smoothing=case["smoothing"], impl=impl, **hyper),
              ce, [logits], seed + 1, f"cross_entropy/{impl}")


# ------------------------------------------------------------ the key hash, and dropout

# layers.random's constants, written out: they are part of the checkpoint format (a key's draws).
MUL1, MUL2, GOLDEN = 0x7FEB352D, 0x2C1B3C6D, 0x9E3779B9
SPLIT, FOLD, SEED = 0x243F6A88, 0x85A308D3, 0x13198A2E


def u32(x):
    return jnp.asarray(x, dtype=jnp.uint32)


def mix32(x):
    """The 32-bit finaliser in uint32 arithmetic, where products wrap modulo 2**32 by themselves
    (torch's version masks int64 products instead)."""
    x = x ^ (x >> 16)
    x = x * u32(MUL1)
    x = x ^ (x >> 15)
    x = x * u32(MUL2)
    return x ^ (x >> 16)


def jhash(k0, k1, counter):
    x = mix32(counter ^ k0)
    x = mix32(x ^ k1)
    return mix32(x ^ k0 ^ u32(GOLDEN))


def jkey(seed):
    """key(seed): the seed's two 32-bit halves hashed (seed taken modulo 2**64, in Python)."""
    seed %= 2**64
    return jhash(u32((seed & 0xFFFFFFFF) ^ SEED), u32(seed >> 32), jnp.arange(2, dtype=jnp.uint32))


def jsplit(key, num):
    return jhash(key[0] ^ u32(SPLIT), key[1], jnp.arange(2 * num, dtype=jnp.uint32).reshape(num, 2))


def jfold_in(key, data):
    k0 = jhash(key[0] ^ u32(FOLD), key[1], data)      # data: a uint32 word (modulo 2**32)
    return jhash(k0, key[1] ^ u32(FOLD), jnp.arange(2, dtype=jnp.uint32))


def jbits(key, n):
    return jhash(key[0], key[1], jnp.arange(n, dtype=jnp.uint32))


def jbernoulli16(key, p, shape):
    """Two draws per word, low half then high half, each ``half < round(p * 2**16)``."""
    n = math.prod(shape)
    words = jbits(key, (n + 1) // 2)
    threshold = u32(round(p * 65536.0))
    draws = jnp.stack([(words & u32(0xFFFF)) < threshold, (words >> 16) < threshold], axis=-1)
    return draws.reshape(-1)[:n].reshape(shape)


def same_words(t, a):
    return torch.equal(t, as_torch(a.astype(jnp.int64)))


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(-2**70, 2**70), num=st.integers(1, 4), data=st.integers(0, 2**40),
       n=st.integers(0, 300))
def test_key_split_fold_in_and_bits_are_the_same_words_in_jax_numpy(seed, num, data, n):
    @jax.jit   # one compilation per example, not one per primitive
    def words(key, data):
        return jsplit(key, num), jfold_in(key, data), jbits(key, n)
    k, jk = jr.key(seed), jkey(seed)
    assert same_words(k, jk)
    split, folded, bits = words(jk, u32(data & 0xFFFFFFFF))
    assert same_words(jr.split(k, num), split)
    assert same_words(jr.fold_in(k, data), folded)
    assert same_words(jr.bits(k, (n,)), bits)


@settings(deadline=None, max_examples=15)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       p=st.one_of(st.sampled_from([0.1, 0.5, 0.9]), st.floats(0.0, 0.99)), impl=IMPLS, seed=SEEDS)
def test_dropout_mask_and_output_are_bit_identical_to_the_jax_numpy_hash(shape, p, impl, seed):
    shape, keep = tuple(shape), 1.0 - p
    k = jr.fold_in(jr.key(seed), 7)
    mask = jax.jit(lambda key: jbernoulli16(jfold_in(key, u32(7)), keep, shape))(jkey(seed))
    assert torch.equal(jr.bernoulli(k, keep, shape, resolution_bits=16), as_torch(mask))
    x = leaf(make_input(shape, seed, torch.float64, "contiguous", "normal"))

    def reference(x, keep):
        if p == 0.0:
            return x
        if impl == "fast":
            return x * (mask.astype(x.dtype) * (1.0 / keep))
        return jnp.where(mask, x / keep, 0.0)

    # keep is an argument, not a constant: XLA would turn a division by a constant into a
    # multiplication by its reciprocal, which rounds differently from torch's division.
    @jax.jit
    def both(x, keep, cot):
        y, vjp = jax.vjp(lambda x: reference(x, keep), x)
        return y, vjp(cot)[0]
    y = layers.dropout(x, p=p, train=True, key=k, impl=impl)
    cot = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (g,) = torch.autograd.grad(y, x, cot)
    y_ref, g_ref = both(as_jax(x), jnp.float64(keep), as_jax(cot))
    assert torch.equal(y.detach(), as_torch(y_ref))                            # bit for bit
    assert torch.equal(g, as_torch(g_ref))
