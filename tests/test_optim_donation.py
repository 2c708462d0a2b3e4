"""Buffer donation: ``optim.step(..., donate=True)`` equals the pure step bit for bit, writes the
new values into the donated tensors and returns them, never writes grads, and refuses (ValueError)
what it cannot write into safely."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import optim
from trees import leaf_paths

SHAPES = {"features.0.weight": (4, 3, 3, 3), "features.0.bias": (4,), "features.1.weight": (4,),
          "features.1.bias": (4,), "classifier.weight": (5, 36), "classifier.bias": (5,),
          "head.scale": ()}
STEPS = 6   # past the first step (momentum's clone) and through a schedule's first changes
INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


def bits(x):
    """The tensor's bit pattern (so -0.0 != 0.0 and NaN payloads count), for exact comparison."""
    return x.view(INT_OF[x.dtype]) if x.dtype in INT_OF else x


def assert_bit_identical(a, b, what):
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb, what
    for path, x, y in zip(leaf_paths(a), la, lb):
        assert x.dtype == y.dtype and torch.equal(bits(x), bits(y)), f"{what}: differs at '{path}'"


def clone_tree(tree):
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


@st.composite
def trees(draw):
    """A flat state_dict-like tree: a random subset of SHAPES, each leaf float32 or float64."""
    names = draw(st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, max_size=len(SHAPES), unique=True))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtypes = draw(st.lists(st.sampled_from([torch.float32, torch.float64]), min_size=len(names),
                           max_size=len(names)))
    return {n: torch.randn(SHAPES[n], generator=g, dtype=torch.float64).to(dt)
            for n, dt in zip(sorted(names, key=list(SHAPES).index), dtypes)}


@st.composite
def learning_rates(draw, base):
    kind = draw(st.sampled_from(["float", "step", "cosine", "warmup_cosine"]))
    if kind == "step":
        return optim.step_decay_schedule(base, draw(st.integers(1, 3)), draw(st.floats(0.1, 1.0)))
    if kind == "cosine":
        return optim.cosine_annealing_schedule(base, draw(st.integers(1, 2 * STEPS)))
    if kind == "warmup_cosine":
        return optim.warmup_cosine_schedule(base, draw(st.integers(1, 3)), draw(st.integers(1, STEPS)))
    return base


@st.composite
def optimizers(draw, params):
    """sgd / adam / adamw over their options (nesterov, dampening, amsgrad, maximize, weight
    decay with or without a mask, schedules), optionally behind clipping and with frozen leaves."""
    kind = draw(st.sampled_from(["sgd", "adam", "adamw"]))
    mask = draw(st.sampled_from([None, optim.decay_mask_no_bias_or_norm]))
    weight_decay = draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.5)))
    maximize = draw(st.booleans())
    if kind == "sgd":
        lr = draw(learning_rates(draw(st.floats(1e-3, 0.5))))
        momentum = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.99)))
        nesterov = momentum > 0 and draw(st.booleans())
        dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
        opt = optim.sgd(lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, weight_decay_mask=mask)
    else:
        lr = draw(learning_rates(draw(st.floats(1e-4, 0.1))))
        make = optim.adam if kind == "adam" else optim.adamw
        opt = make(lr, betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.0, 0.999))),
                   eps=draw(st.sampled_from([1e-8, 0.0, 1e-3])), weight_decay=weight_decay,
                   amsgrad=draw(st.booleans()), maximize=maximize, weight_decay_mask=mask)
    if draw(st.booleans()):
        opt = optim.chain(optim.clip_by_global_norm(draw(st.floats(0.1, 10.0))), opt)
    frozen = draw(st.lists(st.sampled_from(sorted(params)), max_size=len(params), unique=True))
    if frozen:
        opt = optim.freeze(opt, {n: n in frozen for n in params})
    return opt


def run_pure_and_donated(opt, params, seed, steps=STEPS):
    """Step the pure and the donated path side by side from equal starts, checking after every
    step: bit-identical results, donated tensors returned (only counters and rates are new),
    gradients untouched."""
    p_pure, s_pure = params, opt.init(params)
    p_don = clone_tree(params)
    s_don = opt.init(p_don)
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        grads = {n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                 for n, p in params.items()}
        grads_copy = clone_tree(grads)
        p_pure, s_pure = optim.step(opt, grads, s_pure, p_pure)
        old_ids = {id(x) for x in pytree.tree_leaves((p_don, s_don))}
        p_don, s_don = optim.step(opt, grads, s_don, p_don, donate=True)
        assert_bit_identical(grads, grads_copy, f"grads after step {t}")
        assert_bit_identical((p_don, s_don), (p_pure, s_pure), f"donated vs pure, step {t}")
        assert all(id(x) in old_ids for x in pytree.tree_leaves(p_don))
        for path, x in zip(leaf_paths(s_don), pytree.tree_leaves(s_don)):
            assert id(x) in old_ids or path.split("/")[-1] in ("count", "lr"), path
    return p_pure, s_pure


@settings(deadline=None, max_examples=150)
@given(data=st.data())
def test_donated_step_is_bit_identical_to_pure_step_and_returns_the_donated_tensors(data):
    params = data.draw(trees())
    opt = data.draw(optimizers(params))
    run_pure_and_donated(opt, params, data.draw(st.integers(0, 2**31 - 1)))


def _by_bias(params):
    return {k: "bias" if k.endswith("bias") else "weight" for k in params}


# Chains where some leaves reach a stage as the caller's own gradients or as the optimizer state
# (momentum without Nesterov hands on its buffer) and others as temporaries of the step: only the
# temporaries may be overwritten (negate and clipping do it in place).
MIXED_OWNERSHIP = {
    "multi_transform_momentum_then_negate": lambda: optim.chain(
        optim.multi_transform({"bias": optim.trace(0.9), "weight": optim.scale_by_learning_rate(2.0)}, _by_bias),
        optim.negate(), optim.scale_by_learning_rate(0.1)),
    "masked_momentum_then_clip": lambda: optim.chain(
        optim.negate(), optim.masked(optim.trace(0.9), optim.decay_mask_no_bias_or_norm),
        optim.clip_by_global_norm(1.0), optim.scale_by_learning_rate(0.1)),
    "sgd_nesterov_masked_decay": lambda: optim.sgd(
        0.1, momentum=0.9, nesterov=True, weight_decay=0.1,
        weight_decay_mask=optim.decay_mask_no_bias_or_norm),
    "sgd_nesterov_masked_decay_max": lambda: optim.sgd(
        0.1, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True,
        weight_decay_mask=optim.decay_mask_no_bias_or_norm),
    "adam_masked_l2": lambda: optim.adam(
        1e-2, weight_decay=0.1, weight_decay_mask=optim.decay_mask_no_bias_or_norm),
    "masked_scale_then_lr": lambda: optim.chain(
        optim.masked(optim.scale_by_learning_rate(2.0), optim.decay_mask_no_bias_or_norm),
        optim.scale_by_learning_rate(0.1)),
    "frozen_inside_chain": lambda: optim.chain(
        optim.freeze(optim.scale_by_learning_rate(2.0), lambda p: {k: k.endswith("bias") for k in p}),
        optim.trace(0.9, nesterov=True), optim.scale_by_learning_rate(0.1)),
}


@pytest.mark.parametrize("name", sorted(MIXED_OWNERSHIP))
def test_donated_step_writes_only_its_own_temporaries_when_a_mask_passes_grads_through(name):
    g = torch.Generator().manual_seed(4)
    params = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    run_pure_and_donated(MIXED_OWNERSHIP[name](), params, seed=5)




def test_donated_nesterov_step_never_writes_grads_although_torch_writes_its_grads():
    params = {"w": torch.ones(3, dtype=torch.float64)}
    grads = {"w": torch.ones(3, dtype=torch.float64)}
    opt = optim.sgd(0.1, momentum=0.9, nesterov=True)   # no decay: g reaches trace as given
    state = opt.init(params)
    for _ in range(2):
        params, state = optim.step(opt, grads, state, params, donate=True)
    assert torch.equal(grads["w"], torch.ones(3, dtype=torch.float64))
    # torch.optim.SGD's foreach Nesterov step adds the buffer into p.grad in place.
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    p.grad = torch.ones(3, dtype=torch.float64)
    topt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    topt.step()
    assert not torch.equal(p.grad, torch.ones(3, dtype=torch.float64))


def test_donated_step_writes_into_the_same_memory_every_step():
    params = {"w": torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
    opt = optim.adamw(1e-2, amsgrad=True)
    state = opt.init(params)
    addresses = {x.data_ptr() for x in pytree.tree_leaves((params, state)) if x.ndim}
    for t in range(4):
        grads = {"w": torch.full((5, 4), float(t + 1), dtype=torch.float64)}
        params, state = optim.step(opt, grads, state, params, donate=True)
        assert {x.data_ptr() for x in pytree.tree_leaves((params, state)) if x.ndim} == addresses


class Halve:
    """A user's transformation with only ``init`` and ``update`` (no fused or donated form)."""

    @staticmethod
    def make():
        return optim.GradientTransformation(
            lambda params: optim.EmptyState(),
            lambda updates, state, params=None: (pytree.tree_map(lambda u: u / 2, updates), state))


@pytest.mark.parametrize("make", [
    lambda: optim.chain(Halve.make(), optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    lambda: optim.chain(optim.sgd(0.1, momentum=0.9), Halve.make()),
    lambda: optim.chain(optim.adam(0.1), Halve.make(), optim.scale_by_learning_rate(0.5)),
    lambda: optim.masked(optim.adamw(0.1, weight_decay=0.3), {"a": True, "b": False}),
    Halve.make,
])
def test_donation_falls_back_to_update_for_stages_without_a_donated_form(make):
    g = torch.Generator().manual_seed(1)
    params = {"a": torch.randn(3, 2, generator=g, dtype=torch.float64),
              "b": torch.randn(4, generator=g, dtype=torch.float64)}
    run_pure_and_donated(make(), params, seed=2)


def test_donated_params_may_be_disjoint_views_of_one_storage():
    flat = torch.randn(10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params = {"a": flat[:4].view(2, 2), "b": flat[4:]}
    pure = {k: v.clone() for k, v in params.items()}
    opt = optim.sgd(0.1, momentum=0.9)
    grads = {"a": torch.ones(2, 2, dtype=torch.float64), "b": torch.ones(6, dtype=torch.float64)}
    new, _ = optim.step(opt, grads, opt.init(params), params, donate=True)
    expected, _ = optim.step(opt, grads, opt.init(pure), pure)
    assert_bit_identical(new, expected, "views")
    assert torch.equal(flat, torch.cat([expected["a"].flatten(), expected["b"]]))


def _tree(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, generator=g, dtype=torch.float64),
            "b": torch.randn(n, generator=g, dtype=torch.float64)}


def _requires_grad_state():
    opt = optim.sgd(0.1, momentum=0.9)
    params = _tree()
    state = opt.init(params)
    state[0].momentum_buffer["b"].requires_grad_(True)
    return opt, _tree(1), state, params


def _shared(tree, key, other):
    tree = dict(tree)
    tree[key] = tree[other]
    return tree


def _overlapping_views():
    base = torch.randn(6, dtype=torch.float64)
    return {"a": base[:4], "b": base[2:]}


@pytest.mark.parametrize("case, match", [
    (lambda: (optim.sgd(0.1), _tree(1), optim.sgd(0.1).init(_tree()),
              {"a": torch.zeros(3, dtype=torch.float64, requires_grad=True), "b": torch.zeros(3, dtype=torch.float64)}),
     r"^step: donate=True expected tensors that do not require grad, got one in params at 'a': "
     r"differentiating through the step needs the old values \(use donate=False\)$"),
    (_requires_grad_state,
     r"^step: donate=True expected tensors that do not require grad, got one in state at "
     r"'0/momentum_buffer/b': differentiating through the step needs the old values \(use donate=False\)$"),
    (lambda: (optim.sgd(0.1), _tree(1), optim.sgd(0.1).init(_tree()), _shared(_tree(), "b", "a")),
     r"step: donate=True expected donated tensors that share no memory with each other or with "
     r"grads, got params at 'b' overlapping params at 'a'"),
    (lambda: (optim.sgd(0.1), {"a": torch.ones(4, dtype=torch.float64), "b": torch.ones(4, dtype=torch.float64)},
              optim.sgd(0.1).init(_overlapping_views()), _overlapping_views()),
     r"got params at 'b' overlapping params at 'a'"),
])
def test_donation_refuses_autograd_tensors_and_shared_memory(case, match):
    opt, grads, state, params = case()
    with pytest.raises(ValueError, match=match):
        optim.step(opt, grads, state, params, donate=True)


def test_donation_refuses_params_that_share_memory_with_grads():
    params = _tree()
    opt = optim.sgd(0.1, momentum=0.9)
    grads = {"a": params["a"], "b": torch.ones(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"got (params at 'a' overlapping grads at 'a'|grads at 'a' "
                                         r"overlapping params at 'a')"):
        optim.step(opt, grads, opt.init(params), params, donate=True)
    kept = params["a"].clone()
    optim.step(opt, grads, opt.init(params), params)   # the pure step takes it
    assert torch.equal(params["a"], kept)


def test_donation_refuses_torch_func_wrapped_tensors():
    opt = optim.sgd(0.1, momentum=0.9)

    def loss_after_step(w):
        p = {"w": w}
        new, _ = optim.step(opt, {"w": torch.ones_like(w)}, opt.init(p), p, donate=True)
        return new["w"].sum()
    with pytest.raises(ValueError, match=r"^step: donate=True expected plain tensors, got a "
                                         r"torch.func-wrapped tensor in grads at 'w': inside "
                                         r"torch.func transforms the step must be pure \(donate=False\)$"):
        torch.func.grad(loss_after_step)(torch.ones(3, dtype=torch.float64))


def test_donate_must_be_a_bool():
    opt = optim.sgd(0.1)
    with pytest.raises(TypeError, match=r"step: expected donate to be a bool, got str"):
        optim.step(opt, _tree(1), opt.init(_tree()), _tree(), donate="yes")


def test_update_and_apply_updates_stay_pure_next_to_donation():
    params = _tree()
    opt = optim.adamw(0.1, amsgrad=True)
    state = opt.init(params)
    copies = clone_tree((params, state))
    updates, _ = opt.update(_tree(1), state, params)
    optim.apply_updates(params, updates)
    assert_bit_identical((params, state), copies, "update + apply_updates arguments")


@pytest.mark.parametrize("make", [
    Halve.make, lambda: optim.chain(optim.sgd(0.1, momentum=0.9), Halve.make()),
    lambda: optim.sgd(0.1, momentum=0.9), lambda: optim.adam(0.1),
])
def test_donated_step_returns_the_donated_params_tree_itself_and_the_pure_step_a_new_one(make):
    opt, params, grads = make(), _tree(), _tree(1)
    new, _ = optim.step(opt, grads, opt.init(params), params, donate=True)
    assert new is params
    new, _ = optim.step(opt, grads, opt.init(params), params)
    assert new is not params


def _byte_range(x):
    """``[first byte, last byte + 1)`` of the elements of ``x``, by visiting every index."""
    import itertools
    offsets = [sum(i * s for i, s in zip(index, x.stride()))
               for index in itertools.product(*(range(n) for n in x.shape))]
    return (x.data_ptr() + min(offsets) * x.element_size(),
            x.data_ptr() + (max(offsets) + 1) * x.element_size())


@settings(max_examples=30)
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.int8]),
       size=st.lists(st.integers(1, 4), min_size=0, max_size=3),
       strides=st.lists(st.integers(0, 5), min_size=3, max_size=3),
       offset=st.integers(0, 3), permute=st.randoms(use_true_random=False))
def test_memory_span_of_any_view_is_the_byte_range_of_its_elements(dtype, size, strides, offset, permute):
    from optim.base import _memory_span
    stride = strides[:len(size)]
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    view = torch.zeros(needed + 2, dtype=dtype).as_strided(size, stride, offset)
    order = list(range(len(size)))
    permute.shuffle(order)
    for x in (view, view.permute(order), view[..., ::2] if size else view):
        assert _memory_span(x) == _byte_range(x), (x.shape, x.stride())
    m = torch.zeros(4, 6, dtype=dtype)
    for x in (m.T, m[1:3, ::2], m[:, 2], m.T[::3], m[2:3, 4:5]):
        assert _memory_span(x) == _byte_range(x), (x.shape, x.stride())


class OnAnotherDevice(torch.Tensor):
    """A CPU tensor that says it lives on ``cuda:0``: addresses on different devices are not
    comparable, so its memory must not count as overlapping CPU memory at the same address
    (what two real devices would show, testable on a CPU-only machine)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def _donation_catalog():
    """Tensors around one 8-element storage: adjacent and overlapping slices, a one-element
    slice, transposed and strided views (whose spans cover the gaps between their elements),
    an empty view and a meta tensor (no memory), an alias of ``buf[0:4]`` on another device,
    and a fresh tensor."""
    buf = torch.arange(8, dtype=torch.float64)
    return buf, {
        "lo": buf[0:4], "hi": buf[4:8], "mid": buf[3:5], "first": buf[0:1],
        "transposed": buf.view(4, 2).T, "evens": buf[::2], "tail": buf[5:],
        "empty": buf.as_strided((3, 0), (1, 1), 2), "meta": torch.empty(4, device="meta"),
        "elsewhere": buf[0:4].as_subclass(OnAnotherDevice), "fresh": torch.ones(3),
    }


def _refused_pairs(trees):
    """Every pair of leaves (by where) that donation must refuse: on one device, both holding
    memory, at least one donated (grads are only read), and their spans (first to last byte,
    found by visiting every element) intersecting."""
    spans = []
    for name, tree in trees.items():
        for key, x in tree.items():
            if isinstance(x, torch.Tensor) and x.numel() and x.device.type != "meta":
                spans.append((f"{name} at '{key}'", name != "grads", str(x.device), _byte_range(x)))
    return {frozenset((a[0], b[0])) for i, a in enumerate(spans) for b in spans[i + 1:]
            if (a[1] or b[1]) and a[2] == b[2] and a[3][0] < b[3][1] and b[3][0] < a[3][1]}


def test_donation_is_refused_exactly_when_two_spans_on_one_device_overlap_and_one_is_donated():
    _, catalog = _donation_catalog()
    buf = catalog["lo"]._base
    # leaves that hold no memory (skipped), put in front of the pair in every tree; the grads
    # also get a slice on another device lying between the CPU slices' starts
    fillers = {"0": 1.5, "1": catalog["empty"], "2": torch.empty(2, 3, device="meta")}
    grad_fillers = {**fillers, "3": buf[1:2].as_subclass(OnAnotherDevice)}
    names = ("grads", "state", "params")
    checked = refused = 0
    for (k1, x1), (k2, x2) in [(a, b) for a in catalog.items() for b in catalog.items()]:
        for t1 in names:
            for t2 in names:
                for with_fillers in (False, True):
                    trees = {n: dict(grad_fillers if n == "grads" else fillers) if with_fillers else {}
                             for n in names}
                    trees[t1]["x"] = x1
                    trees[t2]["y"] = x2
                    expected = _refused_pairs(trees)
                    try:
                        optim.base.check_donation(trees["grads"], trees["state"], trees["params"])
                    except ValueError as e:
                        got = str(e)
                        prefix = ("step: donate=True expected donated tensors that share no memory "
                                  "with each other or with grads, got ")
                        assert got.startswith(prefix), got
                        first, second = got[len(prefix):].split(" overlapping ")
                        assert frozenset((first, second)) in expected, (k1, k2, t1, t2, got)
                        refused += 1
                    else:
                        assert not expected, (k1, k2, t1, t2, with_fillers, expected)
                    checked += 1
    assert refused and refused < checked


@pytest.mark.parametrize("grads, state, params, named", [
    # equal starts: the leaf listed later (grads, then state, then params) is named first
    ({}, {"s": slice(0, 4)}, {"p": slice(0, 2)}, "params at 'p' overlapping state at 's'"),
    ({}, {"s": slice(0, 2)}, {"p": slice(0, 4)}, "params at 'p' overlapping state at 's'"),
    # otherwise the later-starting one, overlapping the earlier one that reaches furthest,
    # the earliest-starting among equals
    ({}, {"s": slice(0, 8)}, {"p": slice(2, 4)}, "params at 'p' overlapping state at 's'"),
    ({}, {"s": slice(2, 4)}, {"p": slice(0, 8)}, "state at 's' overlapping params at 'p'"),
    ({"g1": slice(0, 4), "g2": slice(2, 4)}, {}, {"p": slice(3, 4)},
     "params at 'p' overlapping grads at 'g1'"),
    ({"g1": slice(0, 3), "g2": slice(1, 4)}, {}, {"p": slice(3, 5)},
     "params at 'p' overlapping grads at 'g2'"),
])
def test_a_refused_donation_names_the_later_starting_tensor_and_the_furthest_reaching_earlier_one(
        grads, state, params, named):
    buf = torch.zeros(8, dtype=torch.float64)
    trees = [{k: buf[v] for k, v in t.items()} for t in (grads, state, params)]
    with pytest.raises(ValueError, match=r"^step: donate=True expected donated tensors that share no "
                                         r"memory with each other or with grads, got " + named + "$"):
        optim.base.check_donation(*trees)


@pytest.mark.parametrize("selected", [set(), {"w"}, {"w", "b"}], ids=["none", "some", "all"])
@pytest.mark.parametrize("updates_owned", [False, True])
def test_masked_donated_update_hands_on_temporaries_exactly_when_no_leaf_is_the_callers(selected, updates_owned):
    # The masked stage's updates are temporaries of the step (the third result, what lets the
    # next stage of a chain write into them) iff the transformed leaves are (scale's are new
    # tensors, or the owned inputs written into) and the passed-through leaves came in owned.
    updates = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([[12.0]], dtype=torch.float64)}
    before = clone_tree(updates)
    opt = optim.masked(optim.scale_by_learning_rate(0.5), {k: k in selected for k in updates})
    pure, _ = opt.update(before, opt.init(before))
    out, _, owned = opt.donated_update(updates, opt.init(before), None, updates_owned)
    assert_bit_identical(out, pure, "donated_update vs update")
    callers = any(out[k].untyped_storage().data_ptr() == updates[k].untyped_storage().data_ptr()
                  for k in updates)
    assert owned is (updates_owned or not callers)
    assert owned is (updates_owned or selected == {"w", "b"})


@pytest.mark.parametrize("owned", [False, True])
def test_weight_decay_adds_wd_times_params_and_passes_the_updates_through_at_zero(owned):
    # u = g + wd * p, written into g only when g are this step's temporaries (owned); at wd = 0
    # (a Python zero) the updates come back themselves, as owned as they came
    p = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    for wd in (0.0, 1.0, 0.25):
        g = {"a": torch.tensor([0.25, 4.0]), "b": torch.tensor([-1.0])}
        before = {k: v.clone() for k, v in g.items()}
        stage = optim.add_decayed_weights(wd)
        out, _, out_owned = stage.donated_update(g, stage.init(p), p, owned)
        want = {k: before[k] + wd * p[k] for k in p}
        assert all(torch.equal(out[k], want[k]) for k in p)
        if wd == 0.0:
            assert out is g and out_owned == owned
        else:
            assert out_owned is True and (out is g) == owned
            assert all((out[k] is g[k]) == owned for k in p)
            if not owned:
                assert all(torch.equal(g[k], before[k]) for k in p)
    empty = optim.add_decayed_weights(0.5)
    assert empty.donated_update({}, empty.init({}), {}, owned)[0] == {}


def _pure_identity():
    # a user's stage with only init and update: its outputs are not known to be temporaries
    return optim.GradientTransformation(lambda p: (), lambda u, s, p=None: (u, s))


@pytest.mark.parametrize("labels", [
    {"w": "scale", "b": "scale"}, {"w": "scale", "b": "pure"}, {"w": "pure", "b": "pure"}],
    ids=["all_scaled", "mixed", "none_scaled"])
@pytest.mark.parametrize("updates_owned", [False, True])
def test_multi_transform_donated_update_is_owned_exactly_when_every_nonempty_part_is(labels, updates_owned):
    # The updates are temporaries of the step (the third result) iff every label that has
    # leaves hands on temporaries: scale's outputs are; a user's pure update's are not. A label
    # without leaves does not count.
    updates = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([[12.0]], dtype=torch.float64)}
    before = clone_tree(updates)
    opt = optim.multi_transform({"scale": optim.scale_by_learning_rate(0.5), "pure": _pure_identity()},
                                labels)
    pure, _ = opt.update(before, opt.init(before))
    out, _, owned = opt.donated_update(updates, opt.init(before), None, updates_owned)
    assert_bit_identical(out, pure, "donated_update vs update")
    assert owned is ("pure" not in labels.values())


@pytest.mark.parametrize("owned", [False, True])
def test_set_to_zero_hands_on_new_zeros_and_its_fused_step_the_params_themselves(owned):
    zero = optim.set_to_zero()
    g = {"a": torch.tensor([0.25, -4.0]), "b": torch.tensor([[1.0]], dtype=torch.float64)}
    p = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5]], dtype=torch.float64)}
    out, state, out_owned = zero.donated_update(g, zero.init(p), p, owned)
    assert out_owned is True and all(out[k] is not g[k] for k in g)
    assert_bit_identical(out, {k: torch.zeros_like(v) for k, v in g.items()}, "set_to_zero")
    assert zero.fused_step is not None
    for donate in (False, True):
        new, _ = optim.step(zero, g, state, p, donate=donate)
        assert new is p


def test_multi_transform_has_a_fused_step_that_hands_frozen_params_back_themselves():
    # fused=True: each label's own fused step runs, so set_to_zero's leaves are the very tensors
    # given (not p + 0), and the others equal update + apply_updates bit for bit
    p = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5]], dtype=torch.float64)}
    g = {"w": torch.tensor([0.25, 4.0]), "b": torch.tensor([[-1.0]], dtype=torch.float64)}
    opt = optim.multi_transform({"train": optim.sgd(0.1, momentum=0.9), "frozen": optim.set_to_zero()},
                                {"w": "train", "b": "frozen"})
    assert opt.fused_step is not None
    state = opt.init(p)
    updates, want_state = opt.update(g, state, p)
    new, new_state = optim.step(opt, g, state, p)
    assert new["b"] is p["b"]
    assert_bit_identical(new, optim.apply_updates(p, updates), "fused step vs update")
    assert_bit_identical(new_state, want_state, "fused step state vs update")


@pytest.mark.parametrize("owned", [False, True])
def test_negate_writes_into_owned_updates_only_and_always_hands_on_temporaries(owned):
    g = {"a": torch.tensor([0.25, -4.0]), "b": torch.tensor([-1.0])}
    before = {k: v.clone() for k, v in g.items()}
    stage = optim.negate()
    out, _, out_owned = stage.donated_update(g, stage.init(g), None, owned)
    assert all(torch.equal(out[k], -before[k]) for k in g) and out_owned is True
    assert (out is g) == owned and all((out[k] is g[k]) == owned for k in g)
    if not owned:
        assert all(torch.equal(g[k], before[k]) for k in g)


@pytest.mark.parametrize("owned", [False, True])
@pytest.mark.parametrize("make", [lambda: optim.scale_by_learning_rate(0.5), lambda: optim.trace(0.9, nesterov=True)],
                         ids=["lr", "nesterov"])
def test_a_donated_update_writes_into_owned_updates_only_and_hands_on_temporaries(make, owned):
    p = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    stage = make()
    state = stage.init(p)
    for _ in range(2):   # the second nesterov step reads its momentum buffer
        g = {"a": torch.tensor([0.25, 4.0]), "b": torch.tensor([-1.0])}
        before = {k: v.clone() for k, v in g.items()}
        want, _ = stage.update(before, state, p)
        out, state, out_owned = stage.donated_update(g, state, p, owned)
        assert all(torch.equal(out[k], want[k]) for k in p) and out_owned is True
        assert (out is g) == owned
        if not owned:
            assert all(torch.equal(g[k], before[k]) for k in p)


def test_a_donated_momentum_step_keeps_its_state_containers_and_an_empty_step_counts_once():
    p = {"a": torch.tensor([1.0, -2.0])}
    stage = optim.trace(0.9)
    state = stage.init(p)
    buffers = state.momentum_buffer
    for _ in range(2):
        _, state, _ = stage.donated_update({"a": torch.ones(2)}, state, p, True)
        assert state.momentum_buffer is buffers   # written into, as the donated step promises
    empty = optim.trace(0.9)
    s = empty.init({})
    for _ in range(3):
        _, s = empty.update({}, s, {})
    assert optim.current_step(s) == 3


def test_a_donated_amsgrad_step_writes_its_maximum_into_the_state_it_was_given():
    p = {"a": torch.tensor([1.0, -2.0])}
    stage = optim.scale_by_adam(0.1, amsgrad=True)
    state = stage.init(p)
    containers = (state.mu, state.nu, state.nu_max)
    for _ in range(2):
        _, state, _ = stage.donated_update({"a": torch.ones(2)}, state, p, True)
        assert (state.mu, state.nu, state.nu_max) == containers and all(
            a is b for a, b in zip((state.mu, state.nu, state.nu_max), containers))


def test_an_adam_step_over_no_leaves_counts_once_moves_its_rate_and_hands_back_what_it_was_given():
    schedule = optim.linear_schedule(1.0, 0.25, 1.0, 4)
    for weight_decay in (0.0, 0.1):
        stage = optim.scale_by_adam(schedule, weight_decay=weight_decay)
        state = stage.init({})
        for k in range(1, 4):
            updates = {}
            out, state = stage.update(updates, state, {})
            assert out is updates and optim.current_step(state) == k and optim.current_lr(state) == schedule(k)
        params = {}
        assert stage.fused_step({}, state, params)[0] is params


@pytest.mark.parametrize("owned", [False, True])
def test_a_chain_hands_each_stage_the_ownership_the_last_one_gave_and_needs_no_params(owned):
    g = {"a": torch.tensor([0.25, -4.0])}
    before = {k: v.clone() for k, v in g.items()}
    chain = optim.chain(optim.negate(), optim.scale_by_learning_rate(-2.0), optim.negate())
    out, _ = chain.update(g, chain.init(g))   # no params: none of its stages needs them
    assert torch.equal(out["a"], 2.0 * before["a"])
    out, _, out_owned = chain.donated_update(g, chain.init(g), None, owned)
    # the first stage hands on temporaries, so every later one writes into them: one tree throughout
    assert torch.equal(out["a"], 2.0 * before["a"]) and out_owned is True and (out is g) == owned
    adam = optim.scale_by_adam(0.1)
    assert adam.donated_update(g, adam.init(g), g, owned)[2] is True
    assert adam.donated_update({}, adam.init({}), {}, owned)[2] is True


def _recording(seen):
    """A stage that records whether it was told its updates are this step's temporaries."""
    def kernel(updates, state, params, mode):
        seen.append(mode.updates_owned)
        return updates, state, mode.updates_owned
    return optim.base.transformation(lambda p: (), kernel)


def test_a_chain_tells_each_stage_whether_the_stage_before_handed_on_temporaries():
    g = {"a": torch.ones(2)}
    for first, owned, told in ((optim.negate(), False, True), (_pure_identity(), False, False),
                               (_pure_identity(), True, False)):
        seen = []
        chain = optim.chain(first, _recording(seen))
        chain.donated_update(g, chain.init(g), None, owned)
        assert seen == [told]


def test_a_counter_and_a_rate_are_kept_as_int64_and_float64_whatever_came():
    # a state loaded from elsewhere (an int32 counter) or a float32 tensor rate: the state holds
    # torch.optim's dtypes again after a step
    p = {"a": torch.ones(2)}
    stage = optim.scale_by_learning_rate(torch.tensor(0.5, dtype=torch.float32))
    state = stage.init(p)
    assert state.lr.dtype == torch.float64
    _, state = stage.update(p, state._replace(count=torch.tensor(3, dtype=torch.int32)), p)
    assert state.count.dtype == torch.int64 and int(state.count) == 4 and state.lr.dtype == torch.float64
