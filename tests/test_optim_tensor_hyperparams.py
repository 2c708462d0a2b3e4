"""Tensor hyperparameters (optax's inject_hyperparams): every hyperparameter may be a 0-d tensor,
batched under ``torch.func.vmap``, and nothing on that path reads a value on the host.

The property: K members trained by one vmapped optimizer step equal K runs with Python-number
hyperparameters. Equality is bit for bit: the tensor path runs the same elementwise kernels with
the same values (a tensor scalar is cast to the leaf's dtype as torch casts a Python scalar; a
tensor ``alpha`` becomes the single-rounding ``addcmul``; a tensor addcdiv ``value`` is folded in
torch's own order of operations), so there is no rounding to allow for.
"""
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.func import vmap

import optim
from optim.testing import check_tensor_hyperparameters

SEEDS = st.integers(0, 2**31 - 1)
F64 = dict(dtype=torch.float64)


def _problem(seed, steps=4):
    g = torch.Generator().manual_seed(seed)
    params = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
              "fc.weight": torch.randn(2, 36, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(steps)]
    return params, grads


def _train(make, params, grads, *hypers):
    opt = make(*hypers)
    p, s = params, opt.init(params)
    for g in grads:
        p, s = optim.step(opt, g, s, p)
    return p, s


def _assert_members_equal(batched, runs):
    for i, single in enumerate(runs):
        for k, v in single.items():
            assert torch.equal(batched[k][i], v), (i, k)


MAKERS = {
    "sgd": lambda lr, mom, wd: optim.sgd(lr, momentum=mom, weight_decay=wd),
    "nesterov": lambda lr, mom, wd: optim.sgd(lr, momentum=mom, nesterov=True, weight_decay=wd),
    "adam": lambda lr, mom, wd: optim.adam(lr, weight_decay=wd),
    "adamw": lambda lr, mom, wd: optim.adamw(lr, weight_decay=wd),
}


HYPERS = st.tuples(st.floats(1e-4, 0.5), st.floats(0.05, 0.99), st.floats(0, 1e-2))


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_vmapped_members_equal_runs_with_number_hyperparameters(kind):
    """lr, momentum and weight decay as tensors: 1-4 members, 4 steps, the same bits."""
    check_tensor_hyperparameters(MAKERS[kind], HYPERS, max_examples=3)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_tensor_betas_give_the_bits_of_python_numbers(name):
    """docs/sweeps.md's claim for both betas (a tensor second beta was 2e-8 off before: Python
    over a tensor is a reciprocal and a multiply in torch, and addcmul's value was folded in
    another order than torch's kernel)."""
    ours = optim.adam if name == "adam" else optim.adamw
    check_tensor_hyperparameters(
        lambda lr, b1, b2, wd: ours(lr, betas=(b1, b2), weight_decay=wd, amsgrad=True),
        st.tuples(st.floats(1e-4, 0.1), st.floats(0.0, 0.999), st.floats(0.0, 0.9999), st.floats(0, 1e-2)),
        max_examples=10)


PEAKED = {
    "cosine": lambda peak: optim.cosine_annealing_schedule(peak, 10, 1e-4),
    "one_cycle": lambda peak: optim.one_cycle_schedule(peak, 12, three_phase=True),
    "warmup_cosine": lambda peak: optim.warmup_cosine_schedule(peak, 2, 8),
    "triangular": lambda peak: optim.triangular_schedule(peak, 12),
}


@pytest.mark.parametrize("schedule", sorted(PEAKED))
def test_a_member_has_its_own_peak_rate_under_a_schedule(schedule):
    """A schedule's peak as a tensor (cosine_annealing_schedule(torch.tensor(...), 10) and the
    others): each member of the vmapped run gets the bits of its own Python-number schedule."""
    make_schedule = PEAKED[schedule]
    check_tensor_hyperparameters(
        lambda peak, mom: optim.sgd(make_schedule(peak), momentum=mom, nesterov=True),
        st.tuples(st.floats(1e-3, 0.5), st.floats(0.05, 0.99)), max_examples=2)
    check_tensor_hyperparameters(lambda peak: optim.adamw(make_schedule(peak), weight_decay=0.1),
                                 st.tuples(st.floats(1e-4, 0.1)), max_examples=2)


def test_every_schedule_peak_takes_a_tensor_with_the_bits_of_the_number():
    for schedule in (lambda v: optim.step_decay_schedule(v, 3, 0.5), lambda v: optim.exponential_schedule(v, 0.9),
                     lambda v: optim.multistep_schedule(v, [2, 5], 0.3), lambda v: optim.linear_schedule(v, 0.2),
                     *PEAKED.values()):
        peaks = [0.1, 0.37, 1e-3]
        got = vmap(lambda v: vmap(schedule(v))(torch.arange(12)))(torch.tensor(peaks, **F64))
        want = torch.tensor([[schedule(p)(t) for t in range(12)] for p in peaks], **F64)
        assert torch.equal(got, want)
    with pytest.raises(TypeError, match=r"cosine_annealing_schedule: expected init_value to be a real "
                                        r"number or a 0-d floating tensor, got torch.int64 of shape \(\)"):
        optim.cosine_annealing_schedule(torch.tensor(1), 10)


@settings(deadline=None, max_examples=6)
@given(seed=SEEDS, kind=st.sampled_from(sorted(MAKERS)), lr=st.floats(1e-4, 0.5),
       mom=st.floats(0.05, 0.99), wd=st.floats(1e-5, 1e-2))
def test_eager_tensor_hyperparameters_equal_numbers(seed, kind, lr, mom, wd):
    params, grads = _problem(seed)
    a = _train(MAKERS[kind], params, grads, lr, mom, wd)[0]
    b = _train(MAKERS[kind], params, grads, *(torch.tensor(x, **F64) for x in (lr, mom, wd)))[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_tensor_momentum_of_zero_equals_plain_sgd():
    # A tensor option keeps its stage: b_t = 0 * b + g = g, the same bits as no momentum stage.
    params, grads = _problem(3)
    a = _train(lambda: optim.sgd(0.1), params, grads)[0]
    b = _train(lambda: optim.sgd(0.1, momentum=torch.tensor(0.0, **F64)), params, grads)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


# Factories, not schedules: a schedule built at import would be built before mutmut activates a
# mutant (docs/testing.md, "Mutation score"), so each test builds its own.
SCHEDULES = {
    "one_cycle_linear": lambda: optim.one_cycle_schedule(0.4, 60, pct_start=0.25, anneal_strategy="linear",
                                                         div_factor=10.0, final_div_factor=100.0),
    "one_cycle_cos": lambda: optim.one_cycle_schedule(0.1, 60, three_phase=True),
    "cosine": lambda: optim.cosine_annealing_schedule(0.1, 20, 1e-3),
    "step": lambda: optim.step_decay_schedule(0.1, 7, 0.5),
    "multistep": lambda: optim.multistep_schedule(0.1, [5, 5, 30], 0.3),
    "exponential": lambda: optim.exponential_schedule(0.1, 0.97),
    "linear": lambda: optim.linear_schedule(0.1, 0.2, 1.0, 15),
    "warmup_cosine": lambda: optim.warmup_cosine_schedule(0.2, 10, 40),
    "constant": lambda: optim.constant_schedule(0.05),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_take_a_tensor_step_and_agree_with_the_integer_step(name):
    schedule = SCHEDULES[name]()
    t = torch.arange(0, 60)
    on_device = vmap(schedule)(t) if name != "constant" else torch.tensor([schedule(i) for i in t], **F64)
    for i in range(60):
        # the same formula in float64 on both sides; torch.cos and math.cos may differ in the
        # last bit, so 4 ulps of the value
        assert math.isclose(float(on_device[i]), schedule(i), rel_tol=4 * 2**-52, abs_tol=1e-300), (i,)


def test_a_schedule_inside_a_vmapped_sgd_step_reads_nothing_on_the_host():
    params, grads = _problem(1)
    schedule = SCHEDULES["one_cycle_linear"]()
    moms = [0.5, 0.9, 0.99]
    make = lambda mom: optim.sgd(schedule, momentum=mom, nesterov=True)   # noqa: E731
    runs = [_train(make, params, grads, m)[0] for m in moms]
    batched, _ = vmap(lambda m: _train(make, params, grads, m))(torch.tensor(moms, **F64))
    _assert_members_equal(batched, runs)


def test_clipping_runs_under_vmap_and_equals_the_unbatched_step():
    params, grads = _problem(2)
    make = lambda lr: optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(lr))   # noqa: E731
    lrs = [0.1, 0.3]
    runs = [_train(make, params, grads, lr)[0] for lr in lrs]
    batched, _ = vmap(lambda lr: _train(make, params, grads, lr))(torch.tensor(lrs, **F64))
    for i, single in enumerate(runs):
        for k, v in single.items():
            # global_norm sums the per-leaf norms in torch's grouped order eagerly and leaf by
            # leaf under vmap: the clip factor may differ in its last bit, 2 ulps of float32
            torch.testing.assert_close(batched[k][i], v, rtol=2.5e-7, atol=1e-7)


def test_tensor_hyperparameters_are_validated_where_they_can_be_read():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        optim.sgd(torch.tensor(-1.0, **F64))
    with pytest.raises(ValueError, match="Invalid momentum"):
        optim.sgd(0.1, momentum=torch.tensor(-0.5, **F64))
    with pytest.raises(TypeError, match="0-d floating tensor"):
        optim.sgd(torch.tensor([0.1, 0.2]))


def test_float32_tensor_betas_give_the_bits_of_their_values_as_python_numbers():
    # _as64 widens a beta to float64 before beta ** t: a float32 tensor beta must not keep
    # float32 bias corrections.
    def run(b1, b2):
        params = {"w": torch.linspace(-1, 1, 12).reshape(3, 4)}
        opt = optim.adam(1e-2, betas=(b1, b2))
        state = opt.init(params)
        for i in range(4):
            updates, state = opt.update({"w": torch.sin(params["w"] * (i + 3))}, state, params)
            params = optim.apply_updates(params, updates)
        return params["w"]

    b1, b2 = torch.tensor(0.9), torch.tensor(0.997)
    assert torch.equal(run(b1, b2), run(float(b1), float(b2)))


@pytest.mark.parametrize("kind", ["sgd", "nesterov", "adam", "adamw", "adam_betas", "adamw_amsgrad_betas"])
def test_donated_steps_with_tensor_hyperparameters_give_the_bits_of_pure_steps_with_numbers(kind):
    # Eagerly, with donation, the tensor-hyperparameter paths of optim.base._leaf_op run in place
    # (addcmul_ for a tensor alpha, addcdiv_ / addcmul_ for a tensor value): the same bits again.
    def make(lr, mom, wd, b1, b2):
        return {"sgd": lambda: optim.sgd(lr, momentum=mom, weight_decay=wd),
                "nesterov": lambda: optim.sgd(lr, momentum=mom, nesterov=True, weight_decay=wd),
                "adam": lambda: optim.adam(lr, weight_decay=wd),
                "adamw": lambda: optim.adamw(lr, weight_decay=wd),
                "adam_betas": lambda: optim.adam(lr, betas=(b1, b2), weight_decay=wd),
                "adamw_amsgrad_betas": lambda: optim.adamw(lr, betas=(b1, b2), weight_decay=wd, amsgrad=True),
                }[kind]()

    numbers = (0.05, 0.9, 1e-2, 0.8, 0.99)
    params, grads = _problem(5)
    pure, donated = make(*numbers), make(*(torch.tensor(x, **F64) for x in numbers))
    p_pure, s_pure = dict(params), pure.init(params)
    p_don, s_don = {k: v.clone() for k, v in params.items()}, donated.init(params)
    for g in grads:
        p_pure, s_pure = optim.step(pure, g, s_pure, p_pure)
        p_don, s_don = optim.step(donated, {k: v.clone() for k, v in g.items()}, s_don, p_don, donate=True)
        assert all(torch.equal(p_pure[k], p_don[k]) for k in p_pure)


@pytest.mark.parametrize("kind", ["sgd", "adam_betas", "adamw_amsgrad_betas"])
def test_a_pure_step_with_tensor_hyperparameters_modifies_none_of_its_arguments(kind):
    h = [torch.tensor(x, **F64) for x in (0.05, 0.9, 1e-2, 0.8, 0.99)]
    opt = {"sgd": lambda: optim.sgd(h[0], momentum=h[1], weight_decay=h[2]),
           "adam_betas": lambda: optim.adam(h[0], betas=(h[3], h[4]), weight_decay=h[2]),
           "adamw_amsgrad_betas": lambda: optim.adamw(h[0], betas=(h[3], h[4]), weight_decay=h[2], amsgrad=True),
           }[kind]()
    params, grads = _problem(6, steps=2)
    state = opt.init(params)
    for g in grads:
        before = [t.clone() for t in torch.utils._pytree.tree_leaves((g, state, params))]
        new_params, new_state = optim.step(opt, g, state, params)
        updates, _ = opt.update(g, state, params)
        after = torch.utils._pytree.tree_leaves((g, state, params))
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        params, state = new_params, new_state


FOREACH_CASES = {   # op, its tensor-list arguments from lists a, b; keywords: each a branch of base._leaf_op
    "add with a float alpha": ("add", lambda a, b: (b,), {"alpha": 0.5}),   # in-place method + keyword
    "maximum": ("maximum", lambda a, b: (b,), {}),                           # no in-place method: out=
    "addcmul without a value": ("addcmul", lambda a, b: (a, b), {}),
    "addcmul with a tensor value": ("addcmul", lambda a, b: (a, b), {"value": torch.tensor(0.3, **F64)}),
    "addcdiv with a float value": ("addcdiv", lambda a, b: (a, [x.abs() + 1 for x in b]), {"value": 0.3}),
}


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("case", sorted(FOREACH_CASES))
def test_foreach_leaf_by_leaf_gives_torch_foreach_bits_and_writes_only_when_in_place(case, in_place):
    # Leaf by leaf (leafwise=True, the tensor path) runs the op of torch's CPU foreach kernel on
    # each tensor, a tensor value as its float64 number: the same bits. In place, the results are
    # the tensors themselves, written into; otherwise the tensors are left as they were.
    from optim.base import foreach

    op, tensor_args, kwargs = FOREACH_CASES[case]
    g = torch.Generator().manual_seed(7)
    ts, a, b = ([torch.randn(s, generator=g) for s in [(3, 2), (4,), (2, 2, 2)]] for _ in range(3))
    args = tensor_args(a, b)
    numbers = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    expected = getattr(torch, f"_foreach_{op}")([t.clone() for t in ts], *args, **numbers)
    before = [t.clone() for t in ts]
    out = foreach(op, ts, *args, in_place=in_place, leafwise=True, **kwargs)
    assert all(torch.equal(o, e) for o, e in zip(out, expected))
    if in_place:
        assert all(o is t for o, t in zip(out, ts))
    else:
        assert all(torch.equal(t, x) for t, x in zip(ts, before))


def test_foreach_under_vmap_writes_into_none_of_its_tensors():
    # Under vmap nothing is donated (a batched tensor may be the caller's own): in_place is ignored.
    from optim.base import foreach

    x = torch.randn(3, 4)
    before = x.clone()
    out = vmap(lambda t: foreach("mul", [t], 2.0, in_place=True)[0])(x)
    assert torch.equal(x, before) and torch.equal(out, before * 2)


@settings(deadline=None, max_examples=20)
@given(max_lr=st.floats(1e-4, 10.0), total=st.integers(8, 80), quarter=st.booleans(), three_phase=st.booleans(),
       div=st.floats(1.0, 100.0), final_div=st.floats(1.0, 1e4))
@example(max_lr=0.1, total=60, quarter=True, three_phase=True, div=10.0, final_div=100.0)
def test_one_cycle_linear_tensor_step_gives_the_bits_of_the_integer_step_at_every_step(
        max_lr, total, quarter, three_phase, div, final_div):
    # Without a cosine both paths run the same float64 operations: the same bits. With pct_start
    # 0.25 of a multiple of 4 steps the phases end on steps, where the phase that ends there is
    # the one to take (the @example: (initial - max_lr) * 1 + max_lr != initial in float64).
    total = 4 * (total // 4) if quarter else total
    s = optim.one_cycle_schedule(max_lr, total, 0.25, "linear", div, final_div, three_phase)
    want = torch.tensor([s(t) for t in range(total + 1)], **F64)
    assert torch.equal(vmap(s)(torch.arange(total + 1)), want)


@pytest.mark.parametrize("name", sorted(set(SCHEDULES) - {"constant"}))
def test_a_tensor_step_gives_a_value_on_its_own_device(name):
    # meta tensors have no values: a schedule that read the step on the host, or built a tensor
    # on another device (the milestones), would fail here as it would on a GPU
    out = SCHEDULES[name]()(torch.tensor(3, device="meta"))
    assert out.device.type == "meta" and out.dtype == torch.float64 and out.dim() == 0


def _counters(state):
    """The ``count`` leaf of every stage's state in a (nested) optimizer state."""
    if hasattr(state, "_fields"):
        own = [state.count] if "count" in state._fields else []
        return own + [c for f in state for c in _counters(f)]
    if isinstance(state, (tuple, list)):
        return [c for f in state for c in _counters(f)]
    return []


@pytest.mark.parametrize("name", ["sgd momentum", "sgd nesterov", "adam", "adamw", "sgd schedule", "adam schedule"])
def test_members_steps_run_on_the_parameters_device_though_init_makes_the_counter_on_the_cpu(name):
    # The meta device stands in for a GPU: init makes the step counter on the CPU, and under vmap the
    # members' counters are a (K,) CPU tensor that a kernel on another device refuses. The steps run,
    # through update and the fused step alike; every leaf they return is on the parameters' device,
    # but the counters, which stay on the host where init made them (no copy back each step).
    K, dev = 3, "meta"
    h = lambda v: torch.full((K,), v, dtype=torch.float64, device=dev)   # noqa: E731
    make, hypers = {
        "sgd momentum": (lambda lr, m: optim.sgd(lr, momentum=m), (h(0.1), h(0.9))),
        "sgd nesterov": (lambda lr, m: optim.sgd(lr, momentum=m, nesterov=True, weight_decay=1e-4), (h(0.1), h(0.9))),
        "adam": (lambda lr, b1, b2: optim.adam(lr, betas=(b1, b2)), (h(1e-3), h(0.9), h(0.999))),
        "adamw": (lambda lr, wd: optim.adamw(lr, weight_decay=wd), (h(1e-3), h(0.01))),
        "sgd schedule": (lambda peak: optim.sgd(optim.cosine_annealing_schedule(peak, 10), momentum=0.9), (h(0.1),)),
        "adam schedule": (lambda peak: optim.adam(optim.cosine_annealing_schedule(peak, 10)), (h(0.1),)),
    }[name]
    params = {"w": torch.zeros(K, 4, device=dev), "b": torch.zeros(K, 2, device=dev)}
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    state = vmap(lambda *a: make(*a[:-1]).init(a[-1]))(*hypers, params)
    for _ in range(2):
        updates, state = vmap(lambda *a: make(*a[:-3]).update(*a[-3:]))(*hypers, grads, state, params)
        new_params, _ = vmap(lambda *a: optim.step(make(*a[:-3]), *a[-3:]))(*hypers, grads, state, params)
        counters = _counters(state)
        assert counters and all(c.device.type == "cpu" and c.dtype == torch.int64 for c in counters)
        rest = [x for x in torch.utils._pytree.tree_leaves((updates, state, new_params))
                if not any(x is c for c in counters)]
        assert {x.device.type for x in rest} == {dev}


@pytest.mark.parametrize("name", ["sgd momentum", "sgd nesterov", "adam", "adam beta2", "adamw", "adamw decay"])
def test_tensor_hyperparameters_never_read_the_step_count_on_the_host(name):
    # Outside vmap too: a stage given a tensor hyperparameter takes the tensor path, which never
    # reads the count (a GPU sync; a stage given numbers reads it, as torch.optim does). A counter on meta, which cannot be read, shows any read (the
    # constructors read a plain tensor's value once, to check it: the hyperparameters stay 0-d CPU
    # tensors, which torch takes next to tensors of any device).
    dev = "meta"
    h = lambda v: torch.tensor(v, dtype=torch.float64)   # noqa: E731
    opt = {"sgd momentum": lambda: optim.sgd(h(0.1), momentum=h(0.9)),
           "sgd nesterov": lambda: optim.sgd(h(0.1), momentum=h(0.9), nesterov=True),
           "adam": lambda: optim.adam(1e-3, betas=(h(0.9), 0.999)),
           "adam beta2": lambda: optim.adam(1e-3, betas=(0.9, h(0.999))),
           "adamw": lambda: optim.adamw(h(1e-3)),
           "adamw decay": lambda: optim.adamw(1e-3, weight_decay=h(0.01))}[name]()
    params = {"w": torch.zeros(4, device=dev)}
    grads = {"w": torch.ones(4, device=dev)}

    def on_meta(state):
        return torch.utils._pytree.tree_map(lambda x: x.to(dev) if isinstance(x, torch.Tensor) else x, state)

    state = on_meta(opt.init(params))
    for _ in range(2):
        updates, state = opt.update(grads, on_meta(state), params)
        new_params, _ = optim.step(opt, grads, on_meta(state), params)
    assert updates["w"].device.type == dev == new_params["w"].device.type


def test_a_tensor_momentum_with_dampening_gives_the_bits_of_the_number():
    # the tensor path's b_t = mu b_{t-1} + (1 - dampening) g, against the scalar path's
    params, grads = _problem(3)
    make = lambda m: optim.sgd(0.1, momentum=m, dampening=0.3)   # noqa: E731
    want, _ = _train(make, params, grads, 0.9)
    got, _ = _train(make, params, grads, torch.tensor(0.9, dtype=torch.float64))
    assert all(torch.equal(got[k], want[k]) for k in params)


@pytest.mark.parametrize("beta1, beta2, steps", [(0.9221264835773715, 0.999, 50), (0.9, 0.5133457276516363, 42)])
def test_tensor_betas_with_a_number_lr_give_the_bits_of_the_numbers_at_the_steps_where_roundings_part(beta1, beta2, steps):
    # Found by search: at step 49, lr / (1 - beta1^t) as a number over a float64 tensor (torch: a
    # reciprocal and a multiply) is a last bit off the division; at step 41, sqrt(1 - beta2^t) is a
    # last bit off pow(x, 0.5). The tensor path must take the division and pow, outside vmap too.
    g = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(3, generator=g, dtype=torch.float64), "b": torch.randn(2, generator=g, dtype=torch.float64)}
    grads = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()} for _ in range(steps)]
    as64 = lambda v: torch.tensor(v, dtype=torch.float64)   # noqa: E731
    for amsgrad in (False, True):
        # the updates, not the parameters: a last bit of the step size vanishes in p + u
        numbers, tensors = (optim.adam(1e-3, betas=b, amsgrad=amsgrad) for b in ((beta1, beta2),
                                                                                   (as64(beta1), as64(beta2))))
        s_n, s_t = numbers.init(params), tensors.init(params)
        for grad in grads:
            (u_n, s_n), (u_t, s_t) = numbers.update(grad, s_n, params), tensors.update(grad, s_t, params)
            assert all(torch.equal(u_t[k], u_n[k]) for k in params)
