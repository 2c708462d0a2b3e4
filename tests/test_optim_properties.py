"""Purity, reset, determinism, state as a saveable tree, torch.func, masks, and convergence."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import optim

OPTIMIZERS = {
    "sgd": lambda: optim.sgd(0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "sgd_nesterov": lambda: optim.sgd(optim.cosine_annealing_schedule(0.1, 10), momentum=0.9,
                                      nesterov=True, weight_decay=5e-4, maximize=True,
                                      weight_decay_mask=optim.decay_mask_no_bias_or_norm),
    "adam": lambda: optim.adam(1e-2, weight_decay=1e-2, amsgrad=True),
    "adamw": lambda: optim.adamw(optim.warmup_cosine_schedule(1e-2, 3, 10), amsgrad=True, maximize=True,
                                 weight_decay_mask=optim.decay_mask_no_bias_or_norm),
    "clipped_frozen_adamw": lambda: optim.freeze(
        optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2)),
        lambda p: {k: k.startswith("bn.") for k in p}),
}


def make_tree(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (3, 2, 3, 3), "conv.bias": (3,), "bn.weight": (3,), "bn.bias": (3,), "fc.weight": (4, 27)}
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


def clone_tree(tree):
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def trees_equal(a, b):
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    return sa == sb and all(torch.equal(x, y) for x, y in zip(la, lb))


def run(opt, params, seed, steps):
    state = opt.init(params)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
        params, state = optim.step(opt, grads, state, params)
    return params, state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@settings(deadline=None, max_examples=5)
@given(seed=st.integers(0, 2**31 - 1))
def test_update_and_step_leave_arguments_unchanged_and_are_deterministic(name, seed):
    opt = OPTIMIZERS[name]()
    params, state = run(opt, make_tree(seed), seed, 3)   # a state past the first step
    grads = make_tree(seed + 1)
    copies = clone_tree((grads, state, params))
    u1, s1 = opt.update(grads, state, params)
    u2, s2 = opt.update(grads, state, params)
    p1, t1 = optim.step(opt, grads, state, params)
    p2, t2 = optim.step(opt, grads, state, params)
    assert trees_equal((grads, state, params), copies)
    assert trees_equal(u1, u2) and trees_equal(s1, s2)
    assert trees_equal(p1, p2) and trees_equal(t1, t2)
    assert trees_equal(s1, t1)   # update and the fused step agree on the new state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_init_fully_resets_the_state(name):
    opt = OPTIMIZERS[name]()
    params = make_tree(0)
    fresh = opt.init(params)
    _, state = run(opt, params, 1, 4)
    assert trees_equal(opt.init(params), fresh)
    assert optim.current_step(fresh) == 0 and optim.current_step(state) == 4
    # A second run from init repeats the first exactly (no hidden first-call flag).
    assert trees_equal(run(opt, params, 1, 4), run(opt, params, 1, 4))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_leaves_are_tensors_and_round_trip_through_a_template(name):
    opt = OPTIMIZERS[name]()
    params = make_tree(0)
    _, state = run(opt, params, 2, 3)
    leaves, spec = pytree.tree_flatten(state)
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    # What a checkpoint does: save the leaves, restore them into the tree init produces.
    template_leaves, template_spec = pytree.tree_flatten(opt.init(params))
    assert template_spec == spec and [x.shape for x in template_leaves] == [x.shape for x in leaves]
    restored = pytree.tree_unflatten([x.clone() for x in leaves], template_spec)
    grads = make_tree(9)
    assert trees_equal(optim.step(opt, grads, restored, params), optim.step(opt, grads, state, params))


def test_current_lr_reads_the_rate_of_the_next_update():
    sched = optim.step_decay_schedule(0.1, 2, 0.5)
    opt = optim.sgd(sched, momentum=0.9)
    params = make_tree(0)
    state = opt.init(params)
    for t in range(6):
        assert optim.current_lr(state) == sched(t)
        params, state = optim.step(opt, make_tree(t + 1), state, params)


def test_frozen_leaves_keep_their_values_and_get_no_state():
    params = make_tree(0)
    opt = optim.freeze(optim.adamw(0.1, weight_decay=0.5), {k: k.startswith("bn.") for k in params})
    new, state = run(opt, params, 3, 5)
    for k in params:
        assert torch.equal(new[k], params[k]) == k.startswith("bn.")
    adam_state = state.inner_states["trainable"][-1]
    assert set(adam_state.mu) == {"conv.weight", "conv.bias", "fc.weight"}


def test_zeroing_a_gradient_is_not_freezing():
    # Adam with a zero gradient still moves a parameter through momentum and weight decay.
    params = make_tree(0)
    opt = optim.adamw(0.1, weight_decay=0.5)
    state = opt.init(params)
    params1, state = optim.step(opt, make_tree(1), state, params)
    zero_bn = {k: (torch.zeros_like(v) if k.startswith("bn.") else v) for k, v in make_tree(2).items()}
    params2, _ = optim.step(opt, zero_bn, state, params1)
    assert not torch.equal(params2["bn.weight"], params1["bn.weight"])


def test_decay_mask_no_bias_or_norm_marks_biases_and_1d_weights():
    assert optim.decay_mask_no_bias_or_norm(make_tree(0)) == {
        "conv.weight": True, "conv.bias": False, "bn.weight": False, "bn.bias": False, "fc.weight": True}


def test_decay_mask_reads_a_leafs_own_key_or_the_last_dotted_part_of_it_whatever_its_rank():
    # the name decides for tensors of any rank (a 2-D relative-position bias is not decayed); the
    # rank decides for 1-D tensors whatever their name; a root tensor has no key
    w2, w1 = torch.ones(2, 3), torch.ones(3)
    tree = {"features.0.bias": w2, "attn.rel_bias": w2, "bias": w2, "features.0.weight": w2, "bias.scale": w2,
            "biased": w2, "bn.weight": w1, "block": {"bias": w2, "kernel": w2, "proj": [w2, w1]}}
    assert optim.decay_mask_no_bias_or_norm(tree) == {
        "features.0.bias": False, "attn.rel_bias": False, "bias": False, "features.0.weight": True,
        "bias.scale": True, "biased": True, "bn.weight": False,
        "block": {"bias": False, "kernel": True, "proj": [True, False]}}
    assert optim.decay_mask_no_bias_or_norm(w2) is True and optim.decay_mask_no_bias_or_norm(w1) is False


def test_weight_decay_mask_skips_decay_on_masked_leaves():
    params = make_tree(0)
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    opt = optim.sgd(1.0, weight_decay=0.5, weight_decay_mask=optim.decay_mask_no_bias_or_norm)
    updates, _ = opt.update(zero, opt.init(params), params)
    for k, m in optim.decay_mask_no_bias_or_norm(params).items():
        # With a zero gradient the update is -lr * wd * p on decayed leaves, exactly 0 elsewhere.
        torch.testing.assert_close(updates[k], -0.5 * params[k] if m else torch.zeros_like(params[k]), rtol=0, atol=0)


def test_masked_passes_unselected_updates_through_unchanged():
    params = make_tree(0)
    grads = make_tree(1)
    opt = optim.masked(optim.scale_by_learning_rate(0.5), {k: k.startswith("conv.") for k in params})
    updates, state = opt.update(grads, opt.init(params), params)
    for k in params:
        assert torch.equal(updates[k], -0.5 * grads[k] if k.startswith("conv.") else grads[k])
    assert state.inner_state.count.item() == 1


_TREE_MASK = {"conv.weight": True, "conv.bias": False, "bn.weight": False, "bn.bias": False, "fc.weight": True}


@pytest.mark.parametrize("make", [
    lambda: optim.masked(optim.scale_by_learning_rate(0.5), _TREE_MASK),
    lambda: optim.masked(optim.scale_by_learning_rate(0.5), optim.decay_mask_no_bias_or_norm),
    lambda: optim.multi_transform({"decayed": optim.scale_by_learning_rate(0.5), "other": optim.trace(0.9)},
                                  {k: "decayed" if d else "other" for k, d in _TREE_MASK.items()}),
    lambda: optim.multi_transform({"decayed": optim.scale_by_learning_rate(0.5), "other": optim.trace(0.9)},
                                  lambda p: {k: "decayed" if d else "other"
                                             for k, d in optim.decay_mask_no_bias_or_norm(p).items()}),
], ids=["masked tree", "masked callable", "multi_transform tree", "multi_transform callable"])
def test_a_mask_or_labels_are_resolved_on_the_updates_when_no_params_are_given(make):
    # Stages that need no params (as optax.masked): without them the mask or labels are resolved
    # on the updates, which have params' structure, and each inner stage gets no params, so the
    # result is the one with params given (trace's first step is the gradient itself).
    params, grads = make_tree(0), make_tree(1)
    opt = make()
    with_params, s1 = opt.update(grads, opt.init(params), params)
    without, s2 = opt.update(grads, opt.init(params), None)
    assert trees_equal(with_params, without) and trees_equal(s1, s2)
    decayed = optim.decay_mask_no_bias_or_norm(params)
    for k in params:
        assert torch.equal(without[k], -0.5 * grads[k] if decayed[k] else grads[k])


def test_a_callable_mask_is_applied_to_params_not_to_the_updates():
    # "a callable params -> mask": a mask that reads the parameters' values (here: skip the
    # leaves that are all zero) must see the parameters, whose values the updates do not share.
    params = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}
    grads = {"a": torch.full((3,), 2.0, dtype=torch.float64), "b": torch.full((3,), 4.0, dtype=torch.float64)}
    opt = optim.masked(optim.trace(0.9), lambda p: {k: bool(v.any()) for k, v in p.items()})
    state = opt.init(params)
    assert set(state.inner_state.momentum_buffer) == {"b"}
    for _ in range(2):
        updates, state = opt.update(grads, state, params)
        assert torch.equal(updates["a"], grads["a"])
    assert torch.equal(updates["b"], grads["b"] * 1.9)   # second step: g + 0.9 g


def test_update_accepts_gradients_from_torch_func_grad():
    params = make_tree(0)
    x = torch.randn(5, 27, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss(p):
        return ((x @ p["fc.weight"].T) ** 2).mean() + (p["conv.weight"] ** 2).sum() + p["bn.weight"].sum()
    grads = torch.func.grad(loss)(params)
    opt = optim.adam(1e-2)
    updates, state = opt.update(grads, opt.init(params), params)
    new = optim.apply_updates(params, updates)
    assert loss(new) < loss(params)


def test_update_works_inside_torch_func_grad_for_meta_gradients():
    # The update is built from differentiable torch ops, so a step can be differentiated through.
    params = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    opt = optim.sgd(0.1, momentum=0.9)

    def after_one_step(w):
        p = {"w": w}
        grads = torch.func.grad(lambda q: (q["w"] ** 2).sum())(p)
        new, _ = optim.step(opt, grads, opt.init(p), p)
        return (new["w"] ** 2).sum()
    g = torch.func.grad(after_one_step)(params["w"])
    # new = w - 0.1 * 2w = 0.8 w, loss = 0.64 |w|^2, gradient 1.28 w.
    torch.testing.assert_close(g, 1.28 * params["w"], rtol=1e-14, atol=0)


def rosenbrock(p):
    x, y = p["xy"][0], p["xy"][1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def quadratic(p):
    # An ill-conditioned bowl (condition number 100) centred at c.
    c = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    h = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    return 0.5 * (h * (p["xy"] - c) ** 2).sum()


@pytest.mark.parametrize("fn, start, make, steps, tol", [
    (quadratic, [0.0, 0.0, 0.0], lambda: optim.sgd(0.01, momentum=0.9), 500, 1e-8),
    (quadratic, [0.0, 0.0, 0.0], lambda: optim.sgd(0.01, momentum=0.9, nesterov=True), 500, 1e-8),
    (quadratic, [0.0, 0.0, 0.0], lambda: optim.adam(optim.exponential_schedule(0.1, 0.99)), 1000, 1e-8),
    (quadratic, [0.0, 0.0, 0.0], lambda: optim.adamw(optim.exponential_schedule(0.1, 0.99), weight_decay=0.0), 1000, 1e-8),
    (rosenbrock, [-1.5, 2.0], lambda: optim.sgd(1e-3, momentum=0.9), 5000, 1e-4),
    (rosenbrock, [-1.5, 2.0], lambda: optim.adam(optim.cosine_annealing_schedule(0.05, 5000, 1e-4)), 5000, 1e-4),
    (rosenbrock, [-1.5, 2.0], lambda: optim.adamw(optim.cosine_annealing_schedule(0.05, 5000, 1e-4), weight_decay=0.0, amsgrad=True), 5000, 1e-4),
])
def test_optimizer_minimises(fn, start, make, steps, tol):
    """Loss at the end below ``tol`` (the minimum is 0); the tolerances are what these step counts
    reach with margin: the quadratic converges linearly, Rosenbrock's curved valley slowly."""
    params = {"xy": torch.tensor(start, dtype=torch.float64)}
    opt = make()
    state = opt.init(params)
    grad = torch.func.grad(fn)
    for _ in range(steps):
        params, state = optim.step(opt, grad(params), state, params)
    assert fn(params).item() < tol, fn(params).item()


def test_a_callable_labels_function_is_applied_to_params_not_to_the_updates():
    # "a callable params -> labels": labels that read the parameters' values (here: freeze the
    # leaves that are all zero) must see the parameters, whose values the updates do not share.
    params = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}
    grads = {"a": torch.full((3,), 2.0, dtype=torch.float64), "b": torch.full((3,), 4.0, dtype=torch.float64)}
    opt = optim.multi_transform({"train": optim.trace(0.9), "frozen": optim.set_to_zero()},
                                lambda p: {k: "train" if v.any() else "frozen" for k, v in p.items()})
    state = opt.init(params)
    assert set(state.inner_states["train"].momentum_buffer) == {"b"}
    for _ in range(2):
        updates, state = opt.update(grads, state, params)
        assert torch.equal(updates["a"], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(updates["b"], grads["b"] * 1.9)   # second step: g + 0.9 g
    new, _ = opt.fused_step(grads, state, params)
    assert new["a"] is params["a"]
