"""Trajectory parity: optim.sgd / adam / adamw against torch.optim (foreach=True), step by step.

Each example draws a parameter tree (assorted shapes, float32 and float64 leaves), the
optimizer's hyperparameters over their whole valid range, a learning-rate schedule (built twice:
ours and torch.optim.lr_scheduler's), an optional weight-decay mask (torch: a second param group
with weight_decay=0) and an optional set of frozen parameters (torch: their grad is None). Both
``update`` + ``apply_updates`` and the fused ``optim.step`` are checked after every step.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optim

STEPS = 20
SHAPES = {"features.0.weight": (4, 3, 3, 3), "features.0.bias": (4,), "features.1.weight": (4,),
          "features.1.bias": (4,), "classifier.weight": (5, 36), "classifier.bias": (5,),
          "head.scale": ()}
F32_EPS = torch.finfo(torch.float32).eps
F64_EPS = torch.finfo(torch.float64).eps


@st.composite
def trees(draw):
    """A flat state_dict-like tree: a random subset of SHAPES, each leaf float32 or float64."""
    names = draw(st.lists(st.sampled_from(sorted(SHAPES)), min_size=2, max_size=len(SHAPES), unique=True))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    dtypes = draw(st.lists(st.sampled_from([torch.float32, torch.float64]), min_size=len(names),
                           max_size=len(names)))
    return {n: torch.randn(SHAPES[n], generator=g, dtype=torch.float64).to(dt)
            for n, dt in zip(sorted(names, key=list(SHAPES).index), dtypes)}


@st.composite
def schedules(draw, base_lr):
    """(kind, kwargs): a schedule drawn with its hyperparameters, built by make_schedules."""
    kind = draw(st.sampled_from(["none", "step", "multistep", "exponential", "cosine", "linear",
                                 "onecycle", "warmup_cosine"]))
    if kind == "step":
        return kind, dict(step_size=draw(st.integers(1, 8)), gamma=draw(st.floats(0.1, 1.0)))
    if kind == "multistep":
        return kind, dict(milestones=draw(st.lists(st.integers(1, STEPS), max_size=4)),
                          gamma=draw(st.floats(0.1, 1.0)))
    if kind == "exponential":
        return kind, dict(gamma=draw(st.floats(0.8, 1.0)))
    if kind == "cosine":
        return kind, dict(T_max=draw(st.integers(1, 2 * STEPS)), eta_min=draw(st.floats(0, base_lr)))
    if kind == "linear":
        return kind, dict(start_factor=draw(st.floats(0.01, 1.0)), end_factor=draw(st.floats(0.0, 1.0)),
                          total_iters=draw(st.integers(1, STEPS)))
    if kind == "onecycle":
        return kind, dict(total_steps=draw(st.integers(STEPS, 2 * STEPS)),
                          pct_start=draw(st.floats(0.1, 0.9)),
                          anneal_strategy=draw(st.sampled_from(["cos", "linear"])),
                          three_phase=draw(st.booleans()))
    if kind == "warmup_cosine":
        return kind, dict(warmup=draw(st.integers(1, STEPS // 2)), T_max=draw(st.integers(1, STEPS)),
                          start_factor=draw(st.floats(0.01, 1.0)))
    return kind, {}


def make_schedules(kind, kw, base_lr, torch_opt):
    """Our lr (float or schedule) and the torch scheduler driving torch_opt (or None)."""
    S = torch.optim.lr_scheduler
    if kind == "none":
        return base_lr, None
    if kind == "step":
        return optim.step_decay_schedule(base_lr, **kw), S.StepLR(torch_opt, **kw)
    if kind == "multistep":
        return optim.multistep_schedule(base_lr, **kw), S.MultiStepLR(torch_opt, **kw)
    if kind == "exponential":
        return optim.exponential_schedule(base_lr, **kw), S.ExponentialLR(torch_opt, **kw)
    if kind == "cosine":
        return optim.cosine_annealing_schedule(base_lr, **kw), S.CosineAnnealingLR(torch_opt, **kw)
    if kind == "linear":
        return optim.linear_schedule(base_lr, **kw), S.LinearLR(torch_opt, **kw)
    if kind == "onecycle":
        return (optim.one_cycle_schedule(base_lr, **kw),
                S.OneCycleLR(torch_opt, max_lr=base_lr, cycle_momentum=False, **kw))
    warm = S.LinearLR(torch_opt, start_factor=kw["start_factor"], total_iters=kw["warmup"])
    cos = S.CosineAnnealingLR(torch_opt, T_max=kw["T_max"])
    return (optim.warmup_cosine_schedule(base_lr, kw["warmup"], kw["T_max"], kw["start_factor"]),
            S.SequentialLR(torch_opt, [warm, cos], milestones=[kw["warmup"]]))


def tolerance(dtype, steps):
    """(rtol, atol) for comparing parameters after ``steps`` steps.

    The fused step runs torch's foreach operations one for one and is expected bit-identical up
    to the learning rate itself, which our schedules compute in closed form (torch multiplies
    recursively, a few ulps of float64 apart). update + apply_updates rounds the lr-scaled update
    before adding it (torch uses one fused multiply-add), one ulp of the parameter per step; the
    errors add up over steps, and momentum / Adam's normalisation pass them on with gain <~ 10.
    So: 10 * steps ulps of the dtype, relative, with the same absolute floor for values near 0.
    """
    eps = F32_EPS if dtype == torch.float32 else F64_EPS
    return 10 * steps * eps, 10 * steps * eps


def run_parity(data, make_ours, make_torch, base_lr):
    params = data.draw(trees())
    names = list(params)
    decay_mask = data.draw(st.sampled_from([None, "fn", "tree"]))
    frozen = data.draw(st.lists(st.sampled_from(names), max_size=len(names) - 1, unique=True))
    seed = data.draw(st.integers(0, 2**31 - 1))
    kind, kw = data.draw(schedules(base_lr))

    no_decay = {n for n, m in optim.decay_mask_no_bias_or_norm(params).items() if not m} if decay_mask else set()
    tparams = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    groups = [{"params": [tparams[n] for n in names if n not in no_decay]}]
    if no_decay:
        groups.append({"params": [tparams[n] for n in names if n in no_decay], "weight_decay": 0.0})
    groups = [gr for gr in groups if gr["params"]]
    topt = make_torch(groups)
    lr, tsched = make_schedules(kind, kw, base_lr, topt)

    mask = {"fn": optim.decay_mask_no_bias_or_norm,
            "tree": optim.decay_mask_no_bias_or_norm(params), None: None}[decay_mask]
    opt = make_ours(lr, mask)
    if frozen:
        opt = optim.freeze(opt, {n: n in frozen for n in names})

    state_u = state_f = opt.init(params)
    p_u = p_f = params
    g = torch.Generator().manual_seed(seed)
    for t in range(1, STEPS + 1):
        grads = {n: (torch.randn(p.shape, generator=g, dtype=torch.float64) + 0.1 * p.double()).to(p.dtype)
                 for n, p in params.items()}
        for n in names:
            tparams[n].grad = None if n in frozen else grads[n].clone()
        topt.step()
        if tsched is not None:
            tsched.step()
        updates, state_u = opt.update(grads, state_u, p_u)
        p_u = optim.apply_updates(p_u, updates)
        p_f, state_f = optim.step(opt, grads, state_f, p_f)
        for n in names:
            expected = tparams[n].detach()
            rtol, atol = tolerance(expected.dtype, t)
            torch.testing.assert_close(p_f[n], expected, rtol=rtol, atol=atol,
                                       msg=lambda m: f"fused step {t}, {n}: {m}")
            torch.testing.assert_close(p_u[n], expected, rtol=rtol, atol=atol,
                                       msg=lambda m: f"update+apply step {t}, {n}: {m}")
            if n in frozen:
                assert torch.equal(p_f[n], params[n]) and torch.equal(p_u[n], params[n])
        assert math.isclose(optim.current_lr(state_f), topt.param_groups[0]["lr"], rel_tol=1e-12, abs_tol=1e-12 * base_lr)
        assert optim.current_step(state_f) == t


@settings(deadline=None, max_examples=25)
@given(data=st.data())
def test_sgd_trajectory_equals_torch_sgd(data):
    lr = data.draw(st.one_of(st.just(0.0), st.floats(1e-6, 0.5)))   # (no subnormal rates)
    momentum = data.draw(st.sampled_from([0.0, None]))
    momentum = data.draw(st.floats(0.0, 0.999)) if momentum is None else momentum
    nesterov = momentum > 0 and data.draw(st.booleans())
    dampening = 0.0 if nesterov else data.draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
    weight_decay = data.draw(st.one_of(st.just(0.0), st.floats(1e-6, 0.5)))
    maximize = data.draw(st.booleans())
    kw = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize)
    run_parity(data,
               lambda lr, mask: optim.sgd(lr, weight_decay_mask=mask, **kw),
               lambda groups: torch.optim.SGD(groups, lr=lr, foreach=True, **kw), lr)


@pytest.mark.parametrize("name", ["adam", "adamw"])
@settings(deadline=None, max_examples=20)
@given(data=st.data())
def test_adam_trajectory_equals_torch_adam(name, data):
    lr = data.draw(st.one_of(st.just(0.0), st.floats(1e-6, 0.1)))
    betas = (data.draw(st.floats(0.0, 0.999)), data.draw(st.floats(0.0, 0.9999)))
    eps = data.draw(st.one_of(st.just(1e-8), st.just(0.0), st.floats(1e-10, 0.1)))
    weight_decay = data.draw(st.one_of(st.just(0.0), st.floats(1e-6, 0.5)))
    amsgrad, maximize = data.draw(st.booleans()), data.draw(st.booleans())
    kw = dict(betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    ours = optim.adam if name == "adam" else optim.adamw
    theirs = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    run_parity(data,
               lambda lr, mask: ours(lr, weight_decay_mask=mask, **kw),
               lambda groups: theirs(groups, lr=lr, foreach=True, **kw), lr)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("make_ours, make_torch", [
    (lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)),
    (lambda: optim.adamw(1e-2, weight_decay=0.1, amsgrad=True),
     lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=True)),
    (lambda: optim.sgd(0.05, momentum=0.9, nesterov=True),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, foreach=True)),
    (lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, maximize=True),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                               maximize=True, foreach=True)),
    (lambda: optim.adam(1e-2, weight_decay=1e-2, amsgrad=True, maximize=True),
     lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True, maximize=True, foreach=True)),
])
def test_fused_step_is_bit_identical_to_torch_foreach_step_in_float64(make_ours, make_torch, donate):
    g = torch.Generator().manual_seed(0)
    params = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    tparams = [torch.nn.Parameter(p.clone()) for p in params.values()]
    opt, topt = make_ours(), make_torch(tparams)
    state = opt.init(params)
    for _ in range(30):
        grads = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        for tp, gr in zip(tparams, grads.values()):
            tp.grad = gr.clone()
        topt.step()
        params, state = optim.step(opt, grads, state, params, donate=donate)
    for ours, theirs in zip(params.values(), tparams):
        assert torch.equal(ours, theirs.detach())
