"""layers._members: under vmap, a convolution whose input and weight both carry the member
dimension runs as one convolution per member; values and gradients equal torch's own vmap rule
(the grouped convolution) and the per-member loop written by hand."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.func import grad, vmap

import layers
from layers._members import _MemberConv2d, is_batched

D = torch.float64
# float64; the member loop and torch's grouped convolution add the same products in different
# orders (oneDNN's blocking), over at most 4 * 3 * 3 = 36 terms per output, so 1e-10 is generous.
TOL = dict(rtol=1e-10, atol=1e-10)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


@st.composite
def cases(draw):
    k, n = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2]))
    c, o = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    size = draw(st.integers(5, 7))   # >= the dilated kernel (2 * (3 - 1) + 1)
    padding = draw(st.sampled_from([0, 1, (1, 0), "same"]))
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2]))
    bias = draw(st.sampled_from(["batched", "shared", None]))
    return dict(k=k, n=n, c=c, o=o, kh=kh, kw=kw, size=size, padding=padding, stride=stride,
                dilation=dilation, groups=groups, bias=bias, seed=draw(st.integers(0, 2**16)))


def tensors(case):
    g = torch.Generator().manual_seed(case["seed"])
    r = lambda *s: torch.randn(s, generator=g, dtype=D)   # noqa: E731
    x = r(case["k"], case["n"], case["c"], case["size"], case["size"])
    w = r(case["k"], case["o"], case["c"] // case["groups"], case["kh"], case["kw"])
    b = {"batched": r(case["k"], case["o"]), "shared": r(case["o"]), None: None}[case["bias"]]
    return x, w, b


def conv_args(case):
    return dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                groups=case["groups"])


@settings(max_examples=25)
@given(case=cases())
def test_member_loop_equals_per_member_conv_and_torchs_rule_with_gradients(case):
    x, w, b = tensors(case)
    kw = conv_args(case)
    b_dim = 0 if case["bias"] == "batched" else None

    def ours(x, w, b):
        params = {"weight": w} if b is None else {"weight": w, "bias": b}
        return layers.conv2d(params, x, impl="fast", **kw)

    def torchs(x, w, b):
        return F.conv2d(x, w, b, **kw)

    def loss(conv, x, w, b):
        y = vmap(conv, in_dims=(0, 0, b_dim))(x, w, b)
        return (y * y.detach().cos()).sum()

    y_ours = vmap(ours, in_dims=(0, 0, b_dim))(x, w, b)
    by_hand = torch.stack([F.conv2d(x[i], w[i], None if b is None else (b[i] if b_dim == 0 else b),
                                    **kw) for i in range(case["k"])])
    torch.testing.assert_close(y_ours, by_hand, **TOL)
    torch.testing.assert_close(y_ours, vmap(torchs, in_dims=(0, 0, b_dim))(x, w, b), **TOL)
    argnums = (1, 2, 3) if b is not None else (1, 2)
    for g_ours, g_torch in zip(grad(loss, argnums=argnums)(ours, x, w, b),
                               grad(loss, argnums=argnums)(torchs, x, w, b)):
        torch.testing.assert_close(g_ours, g_torch, **TOL)


def test_the_member_loop_runs_only_when_input_and_weight_are_both_batched(monkeypatch):
    calls = []
    real = _MemberConv2d.vmap
    monkeypatch.setattr(_MemberConv2d, "vmap", staticmethod(
        lambda *a, **k: calls.append(1) or real(*a, **k)))
    x, w = torch.randn(2, 3, 2, 5, 5, dtype=D), torch.randn(2, 4, 2, 3, 3, dtype=D)
    conv = lambda x, w: layers.conv2d({"weight": w}, x, impl="fast")   # noqa: E731
    vmap(conv, in_dims=(None, 0))(x[0], w)          # shared input: torch's rule, one conv
    vmap(conv, in_dims=(0, None))(x, w[0])          # shared weight (per-sample): torch's rule
    assert calls == []
    vmap(conv)(x, w)
    assert calls == [1]
    # per-sample gradients of a member loop: grad inside vmap sees unbatched tensors
    vmap(grad(lambda x, w: conv(x, w).sum(), argnums=1))(x, w)
    assert calls == [1]
    assert not is_batched(x) and not is_batched(None)


def test_under_torch_compile_no_tensor_counts_as_member_batched(monkeypatch):
    # dynamo cannot trace the introspection, and a compiled graph takes torch's own rule: while
    # compiling, is_batched is False even for a vmapped tensor (and the member rules stay out)
    seen = []
    vmap(lambda t: seen.append(is_batched(t)) or t)(torch.ones(2, 3))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    vmap(lambda t: seen.append(is_batched(t)) or t)(torch.ones(2, 3))
    assert seen == [True, False] and not is_batched(torch.ones(2))


def test_under_autocast_the_member_loop_keeps_the_dtype_of_torchs_rule_and_batch_norm_follows():
    # torch's vmap rule runs a convolution outside autocast; the member loop must too, or its
    # bfloat16 output breaks the batch norm that follows (a bf16 ensemble step used to fail so)
    k = 2
    x, w = torch.randn(k, 4, 3, 8, 8), torch.randn(k, 5, 3, 3, 3)
    bn = {"weight": torch.ones(k, 5), "bias": torch.zeros(k, 5)}
    stats = {"running_mean": torch.zeros(k, 5), "running_var": torch.ones(k, 5),
             "num_batches_tracked": torch.zeros(k, dtype=torch.int64)}

    def block(x, w, p, s, conv):
        return layers.batch_norm(p, s, conv(x, w), train=True)[0]

    ours = lambda x, w: layers.conv2d({"weight": w}, x, padding=1, impl="fast")   # noqa: E731
    torchs = lambda x, w: F.conv2d(x, w, padding=1)                              # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours = vmap(partial(block, conv=ours))(x, w, bn, stats)
        y_torch = vmap(partial(block, conv=torchs))(x, w, bn, stats)
    assert y_ours.dtype == y_torch.dtype
    torch.testing.assert_close(y_ours, y_torch)


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), bias=st.booleans(), groups=st.sampled_from([1, 2]),
       stride=st.sampled_from([(1, 1), (2, 1)]), padding=st.sampled_from([(0, 0), (1, 0)]),
       dilation=st.sampled_from([(1, 1), (1, 2)]), needs=st.sampled_from([(True, True), (True, False), (False, True)]))
def test_member_conv_function_outside_vmap_is_f_conv2d_forward_and_backward(
        seed, bias, groups, stride, padding, dilation, needs):
    # member_conv2d only calls it under vmap; called directly, its own forward and backward must
    # still be F.conv2d's (its docstring's contract).
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2 * groups, 5, 6, generator=g, dtype=D).requires_grad_(needs[0])
    w = torch.randn(2 * groups, 2, 2, 3, generator=g, dtype=D).requires_grad_(needs[1])
    b = torch.randn(2 * groups, generator=g, dtype=D).requires_grad_(True) if bias else None
    conf = (stride, padding, dilation, groups)
    y = _MemberConv2d.apply(x, w, b, *conf)
    ref = F.conv2d(x, w, b, *conf)
    assert torch.equal(y, ref)
    dy = torch.randn(y.shape, generator=g, dtype=D)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    for got, want in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(ref, inputs, dy)):
        torch.testing.assert_close(got, want, **TOL)


def test_member_conv_function_backward_on_meta_gives_the_bias_gradient_its_shape():
    # aten.convolution_backward shapes the bias gradient from bias_sizes on the meta device
    # (elsewhere it sums grad and ignores them): the Function must pass the bias's (C_out,).
    x = torch.randn(2, 4, 5, 6, device="meta", requires_grad=True)
    w = torch.randn(4, 2, 2, 3, device="meta", requires_grad=True)
    b = torch.randn(4, device="meta", requires_grad=True)
    y = _MemberConv2d.apply(x, w, b, (1, 1), (0, 0), (1, 1), 2)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones(y.shape, device="meta"))
    assert (gx.shape, gw.shape, gb.shape) == (x.shape, w.shape, b.shape)


def test_members_of_unbatched_images_take_the_loop_rule_and_equal_f_conv2d_per_member():
    # (C, H, W) per member: the grouped channels-last rule needs 4-D member inputs, so the
    # Function's vmap rule falls back to one F.conv2d per member.
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(3, 4, 7, 6, generator=g, dtype=D)
    ws = torch.randn(3, 6, 2, 2, 3, generator=g, dtype=D)
    bs = torch.randn(3, 6, generator=g, dtype=D)
    conf = ((2, 1), (1, 0), (1, 2), 2)
    got = vmap(lambda x, w, b: layers._members.member_conv2d(x, w, b, *conf))(xs, ws, bs)
    want = torch.stack([F.conv2d(x, w, b, *conf) for x, w, b in zip(xs, ws, bs)])
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("bias", ["batched", "shared", None])
def test_the_loop_rule_takes_batched_shared_or_no_bias_and_runs_outside_autocast(bias):
    g = torch.Generator().manual_seed(1)
    xs, ws = torch.randn(3, 4, 7, 6, generator=g), torch.randn(3, 6, 4, 2, 3, generator=g)
    b = {"batched": torch.randn(3, 6, generator=g), "shared": torch.randn(6, generator=g), None: None}[bias]
    b_dim = 0 if bias == "batched" else None
    conf = ((2, 1), (1, 0), (1, 2), 1)
    conv = lambda x, w, b: layers._members.member_conv2d(x, w, b, *conf)   # noqa: E731
    want = torch.stack([F.conv2d(x, w, None if b is None else (b[i] if b_dim == 0 else b), *conf)
                        for i, (x, w) in enumerate(zip(xs, ws))])
    torch.testing.assert_close(vmap(conv, in_dims=(0, 0, b_dim))(xs, ws, b), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # as torch's vmap rule: the inputs' dtype
        assert vmap(conv, in_dims=(0, 0, b_dim))(xs, ws, b).dtype == torch.float32


def test_the_grouped_rule_puts_each_members_bias_on_its_own_outputs():
    g = torch.Generator().manual_seed(2)
    xs, ws, bs = (torch.randn(3, 2, 4, 5, 5, generator=g, dtype=D), torch.randn(3, 4, 4, 3, 3, generator=g, dtype=D),
                  torch.randn(3, 4, generator=g, dtype=D))
    got = vmap(lambda x, w, b: layers._members.member_conv2d(x, w, b, 1, 1, 1, 1))(xs, ws, bs)
    want = torch.stack([F.conv2d(x, w, b, 1, 1, 1, 1) for x, w, b in zip(xs, ws, bs)])
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("in_dims", [(None, 0, 0), (0, None, None), (0, 0, None)])
def test_the_functions_vmap_rule_takes_any_batched_inputs_and_equals_a_loop(in_dims):
    # member_conv2d calls it with both batched; called directly, every other in_dims must work
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(3, 2, 4, 5, 5, generator=g, dtype=D), torch.randn(3, 6, 4, 3, 3, generator=g, dtype=D), \
        torch.randn(3, 6, generator=g, dtype=D)
    conf = ((1, 1), (1, 1), (1, 1), 1)
    args = [t if d == 0 else t[0] for t, d in zip((x, w, b), in_dims)]
    got = vmap(lambda x, w, b: _MemberConv2d.apply(x, w, b, *conf), in_dims=in_dims)(*args)
    pick = lambda t, d, i: t[i] if d == 0 else t   # noqa: E731
    want = torch.stack([F.conv2d(*(pick(t, d, i) for t, d in zip(args, in_dims)), *conf) for i in range(3)])
    torch.testing.assert_close(got, want, **TOL)


def test_members_of_batched_images_run_one_grouped_convolution_not_one_per_member(monkeypatch):
    # the point of the rule (module docstring): K members' (N, C, H, W) inputs, one F.conv2d
    calls = []
    real = F.conv2d
    monkeypatch.setattr(layers._members.F, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    xs, ws = torch.randn(3, 2, 4, 5, 5, dtype=D), torch.randn(3, 6, 4, 3, 3, dtype=D)
    vmap(lambda x, w: layers._members.member_conv2d(x, w, None, 1, 1, 1, 1))(xs, ws)
    assert len(calls) == 1


# ---- max pooling over members: bit-identical to pooling each member alone ----------------------

@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dilation = draw(st.sampled_from([1, 2]))
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    return dict(k=draw(st.integers(1, 4)), n=draw(st.integers(1, 3)), c=draw(st.integers(1, 5)),
                size=draw(st.integers(5, 8)), kernel=(kh, kw), padding=padding,
                stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))), dilation=(dilation, dilation),
                ceil_mode=draw(st.booleans()), member_dim=draw(st.sampled_from([0, 1, 2])),
                channels_last=draw(st.booleans()), ties=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
                seed=draw(st.integers(0, 2**16)))


def pool_input(case):
    """``(K, N, C, H, W)`` members' activations, as a view with the member dimension at
    ``member_dim`` and, if asked, each member's images channels-last; small integers make ties."""
    g = torch.Generator().manual_seed(case["seed"])
    shape = (case["k"], case["n"], case["c"], case["size"], case["size"])
    x = (torch.randint(-2, 3, shape, generator=g) if case["ties"] else torch.randn(shape, generator=g))
    x = x.to(case["dtype"]).movedim(0, case["member_dim"])
    if case["channels_last"]:   # (N, K*C, H, W) channels-last, as a member convolution's output
        x = x.movedim(case["member_dim"], 1).flatten(1, 2).contiguous(memory_format=torch.channels_last)
        x = x.unflatten(1, (case["k"], case["c"])).movedim(1, case["member_dim"])
    return x


@settings(deadline=None, max_examples=30)
@given(case=pool_cases())
def test_member_max_pool_gives_each_members_own_pooling_and_gradient_bit_for_bit(case):
    # A max picks one input value and its gradient goes to that one input: no arithmetic that
    # could round differently, so the comparison is exact (torch.equal), ties included.
    x, md = pool_input(case), case["member_dim"]
    conf = (case["kernel"], case["stride"], case["padding"], case["dilation"], case["ceil_mode"])
    pool = lambda t: layers.max_pool2d(t, *conf, impl="fast")   # noqa: E731
    y, vjp = torch.func.vjp(vmap(pool, in_dims=md), x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(case["seed"])).to(y.dtype)
    (dx,) = vjp(dy)
    members = x.movedim(md, 0)
    want = torch.stack([F.max_pool2d(m, *conf) for m in members])
    want_dx = torch.stack([torch.func.vjp(lambda t: F.max_pool2d(t, *conf), m)[1](d)[0]
                           for m, d in zip(members, dy)]).movedim(0, md)
    assert y.dtype == want.dtype and torch.equal(y, want)
    assert dx.shape == x.shape and torch.equal(dx, want_dx)


def _inputs_of(monkeypatch, op):
    """The first argument of every call of ``torch.ops.aten.<op>`` from layers._members."""
    seen, real = [], getattr(torch.ops.aten, op)
    monkeypatch.setattr(layers._members.torch.ops.aten, op, lambda x, *a: seen.append(x) or real(x, *a),
                        raising=False)
    return seen


def _member_conv_output(side):
    """A member convolution's output ``(N=2, K*C=12, side, side)`` channels-last, and the same
    values as the members' view ``(K=3, N, C=4, side, side)``."""
    conv_out = torch.randn(2, 3 * 4, side, side).contiguous(memory_format=torch.channels_last)
    return conv_out, conv_out.unflatten(1, (3, 4)).movedim(1, 0)


def test_member_max_pool_runs_one_pooling_of_the_members_side_by_side_channels_last(monkeypatch):
    # the point of the rule (module docstring): one pooling over (N, K*C, H, W) channels-last,
    # no copy of a member convolution's output, and the result a view with the members at 1
    seen = _inputs_of(monkeypatch, "max_pool2d_with_indices")
    conv_out, xs = _member_conv_output(side=6)
    y = vmap(lambda t: layers.max_pool2d(t, 2, impl="fast"))(xs)
    assert len(seen) == 1 and seen[0].shape == (2, 12, 6, 6)
    assert seen[0].data_ptr() == conv_out.data_ptr()     # the convolution's output, not a copy
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert y.shape == (3, 2, 4, 3, 3)


def test_member_max_pool_of_one_image_per_member_pools_the_members_as_a_batch():
    # (C, H, W) per member: the members are the batch of one pooling, members first
    x = torch.randn(3, 4, 7, 6, dtype=D)
    conf = ((2, 3), (1, 2), (1, 1), (1, 1), True)
    got = vmap(lambda t: layers._members.member_max_pool2d(t, *conf), in_dims=1)(x.movedim(0, 1))
    assert torch.equal(got, torch.stack([F.max_pool2d(m, *conf) for m in x]))


def test_member_max_pool_outside_vmap_and_its_function_are_f_max_pool2d_forward_and_backward():
    x = torch.randn(2, 3, 7, 7, dtype=D, requires_grad=True)
    conf = ((3, 2), (2, 2), (1, 0), (2, 1), True)   # ceil_mode adds a last column (4, not 3)
    assert F.max_pool2d(x, *conf[:4], ceil_mode=False).shape[-1] != F.max_pool2d(x, *conf).shape[-1]
    y = layers._members.member_max_pool2d(x, *conf)
    y2, idx = layers._members._MemberMaxPool2d.apply(x, *conf)
    want = F.max_pool2d(x, *conf)
    dy = torch.randn(want.shape, dtype=D)
    assert torch.equal(y, want) and torch.equal(y2, want) and not idx.requires_grad
    (g,), (g2,), (gw,) = (torch.autograd.grad(t, x, dy) for t in (y, y2, want))
    assert torch.equal(g, gw) and torch.equal(g2, gw)


# ---- batch norm over members: each member's own batch norm, one call for all -------------------

@st.composite
def bn_cases(draw):
    return dict(k=draw(st.integers(1, 4)), n=draw(st.integers(2, 4)), c=draw(st.integers(1, 5)),
                shape=draw(st.sampled_from([(), (5,), (4, 3)])),   # (N, C), (N, C, L), (N, C, H, W)
                member_dim=draw(st.sampled_from([0, 1])), channels_last=draw(st.booleans()),
                affine=draw(st.booleans()), stats=draw(st.booleans()), train=draw(st.booleans()),
                momentum=draw(st.sampled_from([0.1, 0.4, None])), seed=draw(st.integers(0, 2**16)))


@settings(deadline=None, max_examples=30)
@given(case=bn_cases())
def test_member_batch_norm_gives_each_members_own_batch_norm_state_and_gradients(case):
    # float64: the side-by-side call sums each channel's values in another order than the
    # member's own call (layout, blocking), a few ulp of a sum over at most 4 * 12 values
    g = torch.Generator().manual_seed(case["seed"])
    k, n, c = case["k"], case["n"], case["c"]
    r = lambda *s: torch.randn(s, generator=g, dtype=D)   # noqa: E731
    x = r(k, n, c, *case["shape"])
    if case["channels_last"] and len(case["shape"]) == 2:   # as a member convolution's output
        x = x.movedim(0, 1).flatten(1, 2).contiguous(memory_format=torch.channels_last).unflatten(1, (k, c)).movedim(1, 0)
    x = x.movedim(0, case["member_dim"])
    params = {"weight": r(k, c), "bias": r(k, c)} if case["affine"] else {}
    state = ({"running_mean": r(k, c), "running_var": r(k, c).abs() + 0.5,
              "num_batches_tracked": torch.arange(k) + 3} if case["stats"] else {})
    bn = partial(layers.batch_norm, train=case["train"], momentum=case["momentum"], eps=1e-3, impl="fast")

    def members_bn(p, x):   # the new state is an aux output: it has no gradient
        return vmap(bn, in_dims=(0, 0, case["member_dim"]))(p, state, x)
    y, vjp, new = torch.func.vjp(members_bn, params, x, has_aux=True)
    dy = r(*y.shape)
    dp, dx = vjp(dy)
    members = x.movedim(case["member_dim"], 0)
    for i in range(k):
        p_i = {name: t[i].clone().requires_grad_() for name, t in params.items()}
        s_i = {name: t[i] for name, t in state.items()}
        x_i = members[i].clone().requires_grad_()
        y_i, new_i = bn(p_i, s_i, x_i)
        grads = torch.autograd.grad(y_i, [x_i, *p_i.values()], dy[i])
        torch.testing.assert_close(y[i], y_i, **TOL)
        torch.testing.assert_close(dx.movedim(case["member_dim"], 0)[i], grads[0], **TOL)
        for (name, _), gp in zip(p_i.items(), grads[1:]):
            torch.testing.assert_close(dp[name][i], gp, **TOL)
        assert new_i.keys() == new.keys()
        for name in new_i:
            torch.testing.assert_close(new[name][i], new_i[name], **TOL)
    for name, t in state.items():   # nothing passed in is written into
        assert t.data_ptr() != new[name].data_ptr() or not case["train"]


def test_member_batch_norm_runs_one_batch_norm_of_the_members_side_by_side(monkeypatch):
    seen = _inputs_of(monkeypatch, "native_batch_norm")
    conv_out, xs = _member_conv_output(side=5)
    params = {"weight": torch.ones(3, 4), "bias": torch.zeros(3, 4)}
    state = {"running_mean": torch.zeros(3, 4), "running_var": torch.ones(3, 4),
             "num_batches_tracked": torch.zeros(3, dtype=torch.long)}
    y, new = vmap(lambda p, s, x: layers.batch_norm(p, s, x, train=True, impl="fast"))(params, state, xs)
    assert len(seen) == 1 and seen[0].shape == (2, 12, 5, 5) and seen[0].data_ptr() == conv_out.data_ptr()
    assert y.shape == xs.shape and new["running_mean"].shape == (3, 4)
    assert torch.equal(state["running_mean"], torch.zeros(3, 4))   # the caller's buffers untouched


@pytest.mark.parametrize("train", [True, False])
def test_member_batch_norm_function_outside_vmap_is_f_batch_norm_forward_and_backward(train):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(4, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=D, requires_grad=True)
    rm, rv = torch.randn(4, generator=g, dtype=D), torch.rand(4, generator=g, dtype=D) + 0.5
    y, new_m, new_v, _, _ = layers._members._MemberBatchNorm.apply(x, w, b, rm, rv, train, 0.3, 1e-4)
    m2, v2 = rm.clone(), rv.clone()
    want = F.batch_norm(x, m2, v2, w, b, train, 0.3, 1e-4)
    dy = torch.randn(want.shape, generator=g, dtype=D)
    assert torch.equal(y, want) and torch.equal(new_m, m2) and torch.equal(new_v, v2)
    assert train or (new_m.data_ptr() == rm.data_ptr() and new_v.data_ptr() == rv.data_ptr())   # eval copies nothing
    for got, ref in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(want, (x, w, b), dy)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_member_max_pool_rule_gives_each_members_indices_as_f_max_pool2d(channels_last):
    # the Function's second output, the indices, must come back per member too (member_max_pool2d
    # drops them, a caller of the Function may not): K members of (N, C, H, W), and of (C, H, W)
    g = torch.Generator().manual_seed(5)
    for shape in ((3, 2, 4, 7, 7), (3, 4, 7, 7)):
        x = torch.randn(shape, generator=g, dtype=D)
        if channels_last and len(shape) == 5:
            x = x.movedim(0, 1).flatten(1, 2).contiguous(memory_format=torch.channels_last).unflatten(1, (3, 4)).movedim(1, 0)
        conf = ((2, 2), (2, 2), (0, 0), (1, 1), True)
        y, idx = vmap(lambda t: layers._members._MemberMaxPool2d.apply(t, *conf))(x)
        want = [F.max_pool2d(m, *conf[:4], ceil_mode=True, return_indices=True) for m in x]
        assert torch.equal(y, torch.stack([w[0] for w in want]))
        assert torch.equal(idx, torch.stack([w[1] for w in want]))


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, False), (True, False, True), (False, True, True)])
@pytest.mark.parametrize("affine", [True, False])
def test_member_batch_norm_function_gives_exactly_the_gradients_asked_for(needs, affine):
    # the backward's output mask: a gradient for each input that needs one, None for the others
    # (and for an absent weight and bias), as F.batch_norm's
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=D).requires_grad_(needs[0])
    w = torch.randn(4, generator=g, dtype=D).requires_grad_(needs[1]) if affine else None
    b = torch.randn(4, generator=g, dtype=D).requires_grad_(needs[2]) if affine else None
    if not any(t is not None and t.requires_grad for t in (x, w, b)):
        return
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    y = layers._members._MemberBatchNorm.apply(x, w, b, torch.zeros(4, dtype=D), torch.ones(4, dtype=D), True, 0.1, 1e-5)[0]
    want = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    dy = torch.randn(y.shape, generator=g, dtype=D)
    for got, ref in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(want, inputs, dy)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_member_batch_norm_statistics_are_not_differentiable_and_outside_vmap_it_is_f_batch_norm(monkeypatch):
    # the running statistics (and the saved batch statistics) carry no gradient; outside vmap,
    # and for an unbatched input, member_batch_norm is F.batch_norm on copies, not the Function
    x = torch.randn(3, 4, 5, 5, dtype=D, requires_grad=True)
    w, b = torch.ones(4, dtype=D, requires_grad=True), torch.zeros(4, dtype=D, requires_grad=True)
    outs = layers._members._MemberBatchNorm.apply(x, w, b, torch.zeros(4, dtype=D), torch.ones(4, dtype=D), True, 0.1, 1e-5)
    assert outs[0].requires_grad and not any(t.requires_grad for t in outs[1:])
    monkeypatch.setattr(layers._members._MemberBatchNorm, "apply", staticmethod(lambda *a: 1 / 0))
    y, m, v = layers._members.member_batch_norm(x, torch.zeros(4, dtype=D), torch.ones(4, dtype=D), w, b, True, 0.1, 1e-5)
    assert torch.equal(y, F.batch_norm(x, torch.zeros(4, dtype=D), torch.ones(4, dtype=D), w, b, True, 0.1, 1e-5))
    assert not m.requires_grad and not v.requires_grad


def test_member_batch_norm_refuses_evaluation_without_running_statistics_naming_itself():
    # as F.batch_norm refuses it; the rule's aten.native_batch_norm would crash the process
    xs = torch.randn(2, 3, 4, 5, 5)
    for x in (xs[0], ):
        with pytest.raises(ValueError, match=r"^member_batch_norm: expected running_mean and running_var "
                                             r"in evaluation mode \(training=False\), got NoneType and NoneType$"):
            layers._members.member_batch_norm(x, None, None, None, None, False, 0.1, 1e-5)
    stat = torch.zeros(3)
    for mean, var, names in ((stat, None, "Tensor and NoneType"), (None, stat, "NoneType and Tensor")):
        with pytest.raises(ValueError, match=r"^member_batch_norm: expected running_mean and running_var "
                                             rf"in evaluation mode \(training=False\), got {names}$"):
            layers._members.member_batch_norm(xs[0], mean, var, None, None, False, 0.1, 1e-5)
    with pytest.raises(ValueError, match="member_batch_norm: expected running_mean"):
        vmap(lambda t: layers._members.member_batch_norm(t, None, None, None, None, False, 0.1, 1e-5))(xs)
