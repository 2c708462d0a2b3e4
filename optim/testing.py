"""Property-based checks of a pure optimizer against torch.optim: a public testing library.

:func:`check_optimizer` runs twin trajectories: a pure ``GradientTransformation`` and a
``torch.optim`` optimizer built from the same drawn hyperparameters, on a drawn parameter tree
(assorted shapes, float32 and float64 leaves), with a drawn learning-rate schedule (ours and
``torch.optim.lr_scheduler``'s), an optional weight-decay mask (torch: a second param group with
``weight_decay=0``) and optional frozen parameters (torch: their grad is None). After every step
both ``update`` + ``apply_updates`` and the fused ``optim.step`` must equal torch's parameters
within :func:`tolerance`, which grows with the number of steps, and frozen parameters must not
move. :func:`check_tensor_hyperparameters` checks that K members with 0-d tensor hyperparameters,
trained by one ``torch.func.vmap``-ed run, give the bits of K runs with Python numbers.

    import torch, optim
    from optim.testing import check_optimizer, sgd_hyperparameters

    check_optimizer(lambda lr, mask, **hp: optim.sgd(lr, weight_decay_mask=mask, **hp),
                    lambda groups, lr, **hp: torch.optim.SGD(groups, lr=lr, foreach=True, **hp),
                    sgd_hyperparameters(), max_examples=10)
"""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.func import vmap

import optim

__all__ = [
    "SHAPES", "adam_hyperparameters", "check_optimizer", "check_tensor_hyperparameters",
    "make_schedules", "parameter_trees", "schedules", "sgd_hyperparameters", "tolerance",
]

#: The leaves a drawn parameter tree picks from (a small conv net's ``state_dict`` names).
SHAPES = {"features.0.weight": (4, 3, 3, 3), "features.0.bias": (4,), "features.1.weight": (4,),
          "features.1.bias": (4,), "classifier.weight": (5, 36), "classifier.bias": (5,),
          "head.scale": ()}


@st.composite
def parameter_trees(draw, shapes=SHAPES):
    """A flat state_dict-like tree: a random subset (>= 2) of ``shapes``, each leaf float32 or
    float64, values N(0, 1)."""
    names = draw(st.lists(st.sampled_from(sorted(shapes)), min_size=2, max_size=len(shapes), unique=True))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtypes = draw(st.lists(st.sampled_from([torch.float32, torch.float64]), min_size=len(names),
                           max_size=len(names)))
    return {n: torch.randn(shapes[n], generator=g, dtype=torch.float64).to(dt)
            for n, dt in zip(sorted(names, key=list(shapes).index), dtypes)}


@st.composite
def schedules(draw, base_lr, steps=20):
    """``(kind, kwargs)``: a schedule kind and its hyperparameters, built by :func:`make_schedules`
    (``"none"``: the constant ``base_lr``)."""
    kind = draw(st.sampled_from(["none", "step", "multistep", "exponential", "cosine", "linear",
                                 "onecycle", "warmup_cosine"]))
    if kind == "step":
        return kind, dict(step_size=draw(st.integers(1, 8)), gamma=draw(st.floats(0.1, 1.0)))
    if kind == "multistep":
        return kind, dict(milestones=draw(st.lists(st.integers(1, steps), max_size=4)),
                          gamma=draw(st.floats(0.1, 1.0)))
    if kind == "exponential":
        return kind, dict(gamma=draw(st.floats(0.8, 1.0)))
    if kind == "cosine":
        return kind, dict(T_max=draw(st.integers(1, 2 * steps)), eta_min=draw(st.floats(0, base_lr)))
    if kind == "linear":
        return kind, dict(start_factor=draw(st.floats(0.01, 1.0)), end_factor=draw(st.floats(0.0, 1.0)),
                          total_iters=draw(st.integers(1, steps)))
    if kind == "onecycle":
        return kind, dict(total_steps=draw(st.integers(steps, 2 * steps)),
                          pct_start=draw(st.floats(0.1, 0.9)),
                          anneal_strategy=draw(st.sampled_from(["cos", "linear"])),
                          three_phase=draw(st.booleans()))
    if kind == "warmup_cosine":
        return kind, dict(warmup=draw(st.integers(1, max(steps // 2, 1))), T_max=draw(st.integers(1, steps)),
                          start_factor=draw(st.floats(0.01, 1.0)))
    return kind, {}


def make_schedules(kind, kw, base_lr, torch_opt):
    """Our lr (a float or a schedule) and the torch scheduler driving ``torch_opt`` (or None)."""
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
    if kind == "warmup_cosine":
        warm = S.LinearLR(torch_opt, start_factor=kw["start_factor"], total_iters=kw["warmup"])
        cos = S.CosineAnnealingLR(torch_opt, T_max=kw["T_max"])
        return (optim.warmup_cosine_schedule(base_lr, kw["warmup"], kw["T_max"], kw["start_factor"]),
                S.SequentialLR(torch_opt, [warm, cos], milestones=[kw["warmup"]]))
    raise ValueError(f"make_schedules: expected a kind drawn by schedules(), got {kind!r}")


def tolerance(dtype, steps):
    """``(rtol, atol)`` for parameters after ``steps`` steps: ``10 * steps * eps(dtype)``.

    The fused step runs torch's foreach operations one for one and is expected bit-identical up
    to the learning rate itself, which purenn's schedules compute in closed form (torch
    multiplies recursively, a few ulps of float64 apart). update + apply_updates rounds the
    lr-scaled update before adding it (torch uses one fused multiply-add), one ulp of the
    parameter per step; the errors add up over steps, and momentum / Adam's normalisation pass
    them on with gain <~ 10. The same absolute floor covers values near 0.
    """
    t = 10 * steps * torch.finfo(dtype).eps
    return t, t


def sgd_hyperparameters():
    """``dict(lr, momentum, dampening, weight_decay, nesterov, maximize)`` over torch.optim.SGD's
    whole valid range (lr 0 too; no subnormal rates)."""
    @st.composite
    def draw_sgd(draw):
        lr = draw(st.one_of(st.just(0.0), st.floats(1e-6, 0.5)))
        momentum = draw(st.sampled_from([0.0, None]))
        momentum = draw(st.floats(0.0, 0.999)) if momentum is None else momentum
        nesterov = momentum > 0 and draw(st.booleans())
        dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
        return dict(lr=lr, momentum=momentum, dampening=dampening,
                    weight_decay=draw(st.one_of(st.just(0.0), st.floats(1e-6, 0.5))),
                    nesterov=nesterov, maximize=draw(st.booleans()))
    return draw_sgd()


def adam_hyperparameters():
    """``dict(lr, betas, eps, weight_decay, amsgrad, maximize)`` over torch.optim.Adam's range."""
    return st.fixed_dictionaries(dict(
        lr=st.one_of(st.just(0.0), st.floats(1e-6, 0.1)),
        betas=st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.9999)),
        eps=st.one_of(st.just(1e-8), st.just(0.0), st.floats(1e-10, 0.1)),
        weight_decay=st.one_of(st.just(0.0), st.floats(1e-6, 0.5)),
        amsgrad=st.booleans(), maximize=st.booleans()))


def _trajectory(data, make_ours, make_torch, hyper, steps):
    base_lr = hyper.pop("lr")
    params = data.draw(parameter_trees(), label="params")
    names = list(params)
    decay_mask = data.draw(st.sampled_from([None, "fn", "tree"]), label="decay_mask")
    frozen = data.draw(st.lists(st.sampled_from(names), max_size=len(names) - 1, unique=True), label="frozen")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    kind, kw = data.draw(schedules(base_lr, steps), label="schedule")

    no_decay = ({n for n, m in optim.decay_mask_no_bias_or_norm(params).items() if not m}
                if decay_mask else set())
    tparams = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    groups = [{"params": [tparams[n] for n in names if n not in no_decay]}]
    if no_decay:
        groups.append({"params": [tparams[n] for n in names if n in no_decay], "weight_decay": 0.0})
    topt = make_torch([gr for gr in groups if gr["params"]], base_lr, **hyper)
    lr, tsched = make_schedules(kind, kw, base_lr, topt)
    mask = {"fn": optim.decay_mask_no_bias_or_norm,
            "tree": optim.decay_mask_no_bias_or_norm(params), None: None}[decay_mask]
    opt = make_ours(lr, mask, **hyper)
    if frozen:
        opt = optim.freeze(opt, {n: n in frozen for n in names})

    state_u = state_f = opt.init(params)
    p_u = p_f = params
    g = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
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
                assert torch.equal(p_f[n], params[n]) and torch.equal(p_u[n], params[n]), \
                    f"step {t}: frozen parameter {n!r} moved"
        assert math.isclose(optim.current_lr(state_f), topt.param_groups[0]["lr"], rel_tol=1e-12,
                            abs_tol=1e-12 * base_lr), \
            f"step {t}: learning rate {optim.current_lr(state_f)}, torch's {topt.param_groups[0]['lr']}"
        assert optim.current_step(state_f) == t, f"step {t}: current_step {optim.current_step(state_f)}"


def _phases(shrink):
    return tuple(p for p in Phase if shrink or p not in (Phase.shrink, Phase.explain))


def check_optimizer(make_ours, make_torch, hyperparameters, *, max_examples=20, steps=20, shrink=True):
    """Twin trajectories of ``make_ours(lr, weight_decay_mask, **hp)`` (lr: a float or a
    schedule; mask: None, a callable or a tree) and ``make_torch(param_groups, lr, **hp)`` over
    ``steps`` steps, for ``hp`` drawn from ``hyperparameters`` (a strategy of dicts with ``"lr"``).
    Hypothesis prints the shrunk draws (``shrink=False``: the first failing ones, faster) and a
    ``@reproduce_failure`` line on failure."""
    @settings(max_examples=max_examples, deadline=None, print_blob=True, database=None,
              phases=_phases(shrink), suppress_health_check=[HealthCheck.too_slow])
    @given(hyper=hyperparameters, data=st.data())
    def check_trajectory(hyper, data):
        _trajectory(data, make_ours, make_torch, dict(hyper), steps)

    check_trajectory()


def _train(make, params, grads, hyper):
    opt = make(*hyper)
    p, s = params, opt.init(params)
    for g in grads:
        p, s = optim.step(opt, g, s, p)
    return p, s


def check_tensor_hyperparameters(make, hyperparameters, *, max_examples=10, members=(1, 4), steps=4,
                                 shrink=True):
    """K members (K drawn from ``members``) trained by one ``vmap``-ed run of ``make(*h)`` with
    0-d float64 tensor hyperparameters ``h`` give the bits of K runs with the Python numbers.

    ``hyperparameters``: a strategy of tuples of floats, the positional arguments of ``make``
    (for instance ``(lr, momentum, weight_decay)``, or a schedule's peak). Every member's step
    count must also be ``steps``. ``shrink=False``: report the first failing draw (faster).
    """
    @settings(max_examples=max_examples, deadline=None, print_blob=True, database=None,
              phases=_phases(shrink), suppress_health_check=[HealthCheck.too_slow])
    @given(hypers=st.lists(hyperparameters, min_size=members[0], max_size=members[1]),
           params=parameter_trees(), seed=st.integers(0, 2**31 - 1))
    def check_members(hypers, params, seed):
        g = torch.Generator().manual_seed(seed)
        grads = [{k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
                 for _ in range(steps)]
        runs = [_train(make, params, grads, h)[0] for h in hypers]
        columns = [torch.tensor(c, dtype=torch.float64) for c in zip(*hypers)]
        batched, state = vmap(lambda *h: _train(make, params, grads, h))(*columns)
        for i, single in enumerate(runs):
            for k, v in single.items():
                assert torch.equal(batched[k][i], v), (
                    f"member {i} ({hypers[i]}), {k!r}: the tensor hyperparameters gave other bits "
                    f"than the Python numbers (largest difference {(batched[k][i] - v).abs().max().item():.3g})")
        counts = [leaf for leaf in torch.utils._pytree.tree_leaves(state)
                  if isinstance(leaf, torch.Tensor) and leaf.dtype == torch.int64]
        assert counts and all(torch.equal(c, torch.full((len(hypers),), steps)) for c in counts), \
            f"step counts {counts}, expected {steps} for each of {len(hypers)} members"

    check_members()
