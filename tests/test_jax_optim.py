"""optim against optax: 25-step trajectories in float64, and every known difference asserted.

The optimizers compute torch.optim's algorithms; where optax computes the same thing the whole
trajectory (parameters after every step, with gradients that depend on the parameters) and the
optimizer state agree. Where the two libraries differ by design, a test states the difference and
checks that it is still there, so a change in either library shows up here (docs/jax.md lists
them):

* dampening: optax's sgd / trace have none;
* amsgrad: optax keeps the maximum of the bias-corrected second moment, torch of the raw one;
* clip_by_global_norm: torch divides by ``norm + 1e-6``, optax by ``norm``;
* adamw's default weight decay: 1e-2 in torch (and here), 1e-4 in optax;
* cosine annealing past T_max: optax clamps at the floor, torch follows the cosine back up;
* step counts: optax's are int32 (saturating), ours int64; its exponential_decay and
  linear_schedule compute in float32 at such a count, even with x64 on.

Needs the optional extra ``purenn[jax]``; skipped only when it is absent.
"""
import inspect
import math

import pytest
import torch
from hypothesis import given, settings, target
from hypothesis import strategies as st

import optim
from jax_support import jax_x64  # noqa: F401  (a fixture)
from nets import from_jax, to_jax

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytestmark = pytest.mark.usefixtures("jax_x64")
jnp = jax.numpy

STEPS = 25
# Both sides round each step's handful of float64 operations differently (optax divides the
# moments by the bias corrections, torch folds them into the step size and the denominator), a
# few ulps per step; the test problem contracts (small learning rates on a convex loss), so the
# differences do not grow: measured <= ~5e-16 relative over 25 steps (docs/jax.md). 1e-12 fails on
# any real difference, the smallest of which below (the 1e-6 of clipping) is 1e-7 relative.
TOL = dict(rtol=1e-12, atol=1e-12)
FEW = settings(deadline=None, max_examples=8)


def problem(seed):
    """Params shaped like a small net's (conv weight and bias, a norm weight, a linear weight),
    and targets and curvatures for the gradient below."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"features.0.weight": (3, 2, 2, 2), "features.0.bias": (3,),
              "features.1.weight": (3,), "classifier.weight": (2, 4)}
    params = {k: torch.randn(s, dtype=torch.float64, generator=g) for k, s in shapes.items()}
    targets = {k: torch.randn(s, dtype=torch.float64, generator=g) for k, s in shapes.items()}
    curvature = {k: torch.rand(s, dtype=torch.float64, generator=g) + 0.1 for k, s in shapes.items()}
    return params, targets, curvature


def gradient(p, t, c):
    """``c (p - t + 0.1 p^3)``, the gradient of a convex loss: it depends on the parameters, so any
    difference in one step feeds the next. The same elementwise products and sums on both sides
    (torch tensors or jax arrays); a negative ``c`` is the gradient of the negated loss."""
    return c * ((p - t) + 0.1 * (p * p * p))


def torch_trajectory(opt, params, targets, curvature, steps=STEPS):
    """Parameters after each step (``update`` + ``apply_updates``), and the final state."""
    state, path = opt.init(params), []
    for _ in range(steps):
        grads = {k: gradient(params[k], targets[k], curvature[k]) for k in params}
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        path.append(params)
    return path, state


def optax_trajectory(opt, params, targets, curvature, steps=STEPS):
    """The same with optax, one jitted step; params come in through ``nets.to_jax``."""
    params, targets, curvature = to_jax(({k: v.clone() for k, v in params.items()}, targets, curvature))

    @jax.jit
    def step(params, state):
        grads = jax.tree_util.tree_map(gradient, params, targets, curvature)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state
    state, path = opt.init(params), []
    for _ in range(steps):
        params, state = step(params, state)
        path.append(params)
    return path, state


def trajectory_errors(ours, theirs):
    """Per step, the largest |difference| / (1 + |value|) over all leaves."""
    return [max(float(((a[k] - from_jax(b[k])).abs() / (1 + from_jax(b[k]).abs())).max()) for k in a)
            for a, b in zip(ours, theirs)]


def assert_same_trajectory(ours, theirs, label):
    errors = trajectory_errors(ours, theirs)
    target(max(errors), label=label)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for k in a:
            torch.testing.assert_close(a[k], from_jax(b[k]), **TOL, msg=f"{label}: {k} after step {step + 1}")


# --------------------------------------------------------------------- schedules


def in_float64(schedule):
    """An optax schedule evaluated at a float64 step: optax passes its int32 count, in which
    exponential_decay and linear_schedule compute in float32 (a known difference, below)."""
    return lambda count: schedule(jnp.asarray(count, dtype=jnp.float64))


@st.composite
def schedules(draw, peak):
    """(ours, optax's) for one schedule both libraries have, with the same values on steps 0..25."""
    kind = draw(st.sampled_from(["constant", "step", "exponential", "multistep", "cosine", "linear"]))
    if kind == "constant":
        return peak, peak
    if kind == "step":
        size, gamma = draw(st.integers(1, 10)), draw(st.floats(0.1, 0.9))
        return (optim.step_decay_schedule(peak, size, gamma),
                in_float64(optax.exponential_decay(peak, size, gamma, staircase=True)))
    if kind == "exponential":
        gamma = draw(st.floats(0.8, 0.99))
        return optim.exponential_schedule(peak, gamma), in_float64(optax.exponential_decay(peak, 1, gamma))
    if kind == "multistep":
        milestones = sorted(draw(st.sets(st.integers(1, STEPS), min_size=1, max_size=3)))
        gamma = draw(st.floats(0.1, 0.9))
        return (optim.multistep_schedule(peak, milestones, gamma),
                optax.piecewise_constant_schedule(peak, {m: gamma for m in milestones}))
    if kind == "cosine":     # T_max >= the steps run: past T_max they differ (a known difference)
        t_max, floor = draw(st.integers(STEPS, 3 * STEPS)), draw(st.sampled_from([0.0, 0.1]))
        return (optim.cosine_annealing_schedule(peak, t_max, floor * peak),
                optax.cosine_decay_schedule(peak, t_max, alpha=floor))
    start, end, total = draw(st.floats(0.1, 1.0)), draw(st.floats(0.0, 1.0)), draw(st.integers(1, 30))
    return (optim.linear_schedule(peak, start, end, total),
            in_float64(optax.linear_schedule(peak * start, peak * end, total)))


# ----------------------------------------------------------------- matching cases


@FEW
@given(lr=st.floats(1e-3, 0.2), momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]), nesterov=st.booleans(),
       weight_decay=st.sampled_from([0.0, 1e-3, 0.05]), masked=st.booleans(), maximize=st.booleans(),
       data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_sgd_heavy_ball_nesterov_l2_decay_masks_and_schedules_follow_optax(
        lr, momentum, nesterov, weight_decay, masked, maximize, data, seed):
    nesterov = nesterov and momentum > 0
    ours_lr, optax_lr = data.draw(schedules(lr))
    params, targets, curvature = problem(seed)
    mask = optim.decay_mask_no_bias_or_norm(params) if masked else None
    ours = optim.sgd(ours_lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                     maximize=maximize, weight_decay_mask=mask)
    stages = [optax.scale(-1.0)] if maximize else []
    if weight_decay:
        stages.append(optax.add_decayed_weights(weight_decay, mask=mask))
    theirs = optax.chain(*stages, optax.sgd(optax_lr, momentum=momentum or None, nesterov=nesterov))
    if maximize:   # ascend the negated loss: the same path as descending the loss
        curvature = {k: -c for k, c in curvature.items()}
    path, state = torch_trajectory(ours, params, targets, curvature)
    path_ref, state_ref = optax_trajectory(theirs, params, targets, curvature)
    assert_same_trajectory(path, path_ref, "sgd")
    if momentum:   # the momentum buffer is optax's trace
        ours_trace = next(s for s in state if isinstance(s, optim.TraceState)).momentum_buffer
        theirs_trace = next(s for s in jax.tree_util.tree_leaves(
            state_ref, is_leaf=lambda s: isinstance(s, optax.TraceState))
            if isinstance(s, optax.TraceState)).trace
        for k in ours_trace:
            torch.testing.assert_close(ours_trace[k], from_jax(theirs_trace[k]), **TOL)


@FEW
@given(lr=st.floats(1e-4, 0.05), b1=st.sampled_from([0.0, 0.8, 0.9]), b2=st.sampled_from([0.9, 0.99, 0.999]),
       eps=st.sampled_from([1e-8, 1e-3]), decay=st.sampled_from(["none", "l2", "decoupled"]),
       weight_decay=st.sampled_from([1e-3, 0.1]), masked=st.booleans(), data=st.data(),
       seed=st.integers(0, 2**31 - 1))
def test_adam_with_l2_or_decoupled_decay_follows_optax(lr, b1, b2, eps, decay, weight_decay, masked, data, seed):
    ours_lr, optax_lr = data.draw(schedules(lr))
    params, targets, curvature = problem(seed)
    mask = optim.decay_mask_no_bias_or_norm(params) if masked else None
    if decay == "decoupled":
        ours = optim.adamw(ours_lr, (b1, b2), eps, weight_decay, weight_decay_mask=mask)
        theirs = optax.adamw(optax_lr, b1, b2, eps, weight_decay=weight_decay, mask=mask)
    elif decay == "l2":
        ours = optim.adam(ours_lr, (b1, b2), eps, weight_decay, weight_decay_mask=mask)
        theirs = optax.chain(optax.add_decayed_weights(weight_decay, mask=mask), optax.adam(optax_lr, b1, b2, eps))
    else:
        ours, theirs = optim.adam(ours_lr, (b1, b2), eps), optax.adam(optax_lr, b1, b2, eps)
    path, state = torch_trajectory(ours, params, targets, curvature)
    path_ref, state_ref = optax_trajectory(theirs, params, targets, curvature)
    assert_same_trajectory(path, path_ref, f"adam/{decay}")
    # The moments are optax's mu and nu.
    ours_adam = next(s for s in state if isinstance(s, optim.ScaleByAdamState))
    theirs_adam = next(s for s in jax.tree_util.tree_leaves(
        state_ref, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState))
    for k in params:
        torch.testing.assert_close(ours_adam.mu[k], from_jax(theirs_adam.mu[k]), **TOL)
        torch.testing.assert_close(ours_adam.nu[k], from_jax(theirs_adam.nu[k]), **TOL)


# ------------------------------------------------------------- known differences


def first_divergence(ours, theirs, threshold=1e-9):
    """The 1-based step after which the trajectories first differ by more than ``threshold``."""
    return next((i + 1 for i, e in enumerate(trajectory_errors(ours, theirs)) if e > threshold), None)


def test_known_difference_dampening_optax_sgd_has_none():
    assert "dampening" not in inspect.signature(optax.sgd).parameters
    assert "dampening" not in inspect.signature(optax.trace).parameters
    params, targets, curvature = problem(0)
    path, _ = torch_trajectory(optim.sgd(0.05, momentum=0.9, dampening=0.5), params, targets, curvature)
    path_ref, _ = optax_trajectory(optax.sgd(0.05, momentum=0.9), params, targets, curvature)
    # torch does not dampen the first step (the buffer starts as the gradient): they part at step 2.
    assert first_divergence(path, path_ref) == 2


def test_known_difference_amsgrad_optax_takes_the_maximum_of_the_bias_corrected_moment():
    params, targets, curvature = problem(1)
    path, _ = torch_trajectory(optim.adam(0.05, amsgrad=True), params, targets, curvature)
    path_ref, _ = optax_trajectory(optax.amsgrad(0.05), params, targets, curvature)
    # Step 1 agrees (one moment: both maxima are it). From step 2, optax's bias-corrected nu_1 =
    # g_1^2 towers over torch's raw (1 - beta2) g_1^2 while the gradients shrink.
    assert first_divergence(path, path_ref) == 2
    path_adam, _ = optax_trajectory(optax.adam(0.05), params, targets, curvature)
    assert first_divergence(path, path_adam) is not None   # and ours is not plain adam either


def test_known_difference_clip_by_global_norm_torch_adds_1e_6_to_the_norm():
    params, targets, curvature = problem(2)
    grads = {k: gradient(params[k], targets[k], curvature[k]) * 10 for k in params}
    norm = float(torch.sqrt(sum((g * g).sum() for g in grads.values())))
    max_norm = norm / 3
    ours, _ = optim.clip_by_global_norm(max_norm).update(grads, optim.clip_by_global_norm(max_norm).init(params))
    theirs, _ = optax.clip_by_global_norm(max_norm).update(to_jax(grads), optax.EmptyState())
    for k in grads:
        want = from_jax(theirs[k]) * (norm / (norm + 1e-6))   # optax's, re-scaled to torch's divisor
        torch.testing.assert_close(ours[k], want, **TOL)
        assert not torch.allclose(ours[k], from_jax(theirs[k]), rtol=1e-9, atol=0)
    # Below the threshold both leave the gradients alone.
    ours, _ = optim.clip_by_global_norm(2 * norm).update(grads, ())
    theirs, _ = optax.clip_by_global_norm(2 * norm).update(to_jax(grads), optax.EmptyState())
    for k in grads:
        assert torch.equal(ours[k], grads[k]) and torch.equal(from_jax(theirs[k]), grads[k])


def test_known_difference_adamw_default_weight_decay_is_1e_2_in_torch_and_1e_4_in_optax():
    assert inspect.signature(optim.adamw).parameters["weight_decay"].default == 1e-2
    assert inspect.signature(torch.optim.AdamW).parameters["weight_decay"].default == 1e-2
    assert inspect.signature(optax.adamw).parameters["weight_decay"].default == 1e-4


def test_known_difference_cosine_past_t_max_optax_clamps_torch_cycles():
    t_max, peak, floor = 10, 0.1, 0.01
    ours = optim.cosine_annealing_schedule(peak, t_max, floor)
    theirs = optax.cosine_decay_schedule(peak, t_max, alpha=floor / peak)
    for t in range(t_max + 1):
        assert math.isclose(ours(t), float(theirs(t)), rel_tol=1e-14)
    for t in range(t_max + 1, 2 * t_max):
        assert math.isclose(float(theirs(t)), floor, rel_tol=1e-14)          # optax: held at the floor
        assert ours(t) > floor + 1e-6                                          # torch: back up the cosine
    assert math.isclose(ours(2 * t_max), peak, rel_tol=1e-14)                  # a full period: the peak again


@pytest.mark.parametrize("name", ["exponential_decay", "linear_schedule"])
def test_known_difference_optax_schedules_round_to_float32_at_its_int32_step_count(name):
    ours, theirs = {
        "exponential_decay": (optim.exponential_schedule(0.1, 0.9), optax.exponential_decay(0.1, 1, 0.9)),
        "linear_schedule": (optim.linear_schedule(0.1, 0.3, 1.0, 7), optax.linear_schedule(0.03, 0.1, 7)),
    }[name]
    at_count = [theirs(jnp.asarray(t, dtype=jnp.int32)) for t in range(1, 6)]
    assert all(v.dtype == jnp.float32 for v in at_count)                      # even with x64 on
    assert max(abs(float(v) - ours(t)) / ours(t) for t, v in enumerate(at_count, 1)) > 1e-9
    for t in range(1, 6):                                                   # at a float64 step: equal
        assert math.isclose(float(in_float64(theirs)(t)), ours(t), rel_tol=1e-14)


def test_known_difference_optax_counts_steps_in_int32_and_saturates():
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    ours = optim.adam(1e-3).init(params)
    theirs = optax.adam(1e-3).init(to_jax(params))
    assert next(s for s in ours if isinstance(s, optim.ScaleByAdamState)).count.dtype == torch.int64
    assert theirs[0].count.dtype == jnp.int32            # even with jax_enable_x64 on
    top = jnp.asarray(2**31 - 1, dtype=jnp.int32)
    assert int(optax.safe_int32_increment(top)) == 2**31 - 1
