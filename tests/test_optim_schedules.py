"""Schedules: each value over N steps equals torch.optim.lr_scheduler's get_last_lr()."""
import math

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optim

N = 60
S = torch.optim.lr_scheduler


def torch_values(base_lr, make, n=N):
    """lr of steps 0..n-1 as torch reports it after 0, 1, ..., n-1 calls of scheduler.step()."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = make(opt)
    values = []
    for t in range(n):
        values.append(sched.get_last_lr()[0])
        if t < n - 1:
            opt.step()
            sched.step()
    return values


def assert_schedule_matches(ours, theirs, base_lr):
    # torch updates recursively (lr *= factor each step) while ours is closed form: a few ulps of
    # float64 per step, so 1e-12 relative to the base rate after N = 60 steps is ample.
    for t, expected in enumerate(theirs):
        assert math.isclose(ours(t), expected, rel_tol=1e-12, abs_tol=1e-12 * base_lr), (t, ours(t), expected)


lrs = st.floats(1e-4, 10.0)


@settings(deadline=None, max_examples=30)
@given(base=lrs, step_size=st.integers(1, 20), gamma=st.floats(0.01, 1.0))
def test_step_decay_schedule_equals_steplr(base, step_size, gamma):
    assert_schedule_matches(optim.step_decay_schedule(base, step_size, gamma),
                            torch_values(base, lambda o: S.StepLR(o, step_size, gamma)), base)


@settings(deadline=None, max_examples=30)
@given(base=lrs, milestones=st.lists(st.integers(1, N), max_size=6), gamma=st.floats(0.01, 1.0))
def test_multistep_schedule_equals_multisteplr_including_repeated_milestones(base, milestones, gamma):
    assert_schedule_matches(optim.multistep_schedule(base, milestones, gamma),
                            torch_values(base, lambda o: S.MultiStepLR(o, milestones, gamma)), base)


@settings(deadline=None, max_examples=30)
@given(base=lrs, gamma=st.floats(0.5, 1.0))
def test_exponential_schedule_equals_exponentiallr(base, gamma):
    assert_schedule_matches(optim.exponential_schedule(base, gamma),
                            torch_values(base, lambda o: S.ExponentialLR(o, gamma)), base)


@settings(deadline=None, max_examples=30)
@given(base=lrs, T_max=st.integers(1, N), eta_frac=st.floats(0.0, 1.0))
def test_cosine_annealing_schedule_equals_cosineannealinglr_past_t_max(base, T_max, eta_frac):
    eta_min = base * eta_frac
    assert_schedule_matches(optim.cosine_annealing_schedule(base, T_max, eta_min),
                            torch_values(base, lambda o: S.CosineAnnealingLR(o, T_max, eta_min)), base)


@settings(deadline=None, max_examples=30)
@given(base=lrs, start=st.floats(0.01, 1.0), end=st.floats(0.0, 1.0), total=st.integers(1, N))
def test_linear_schedule_equals_linearlr(base, start, end, total):
    assert_schedule_matches(optim.linear_schedule(base, start, end, total),
                            torch_values(base, lambda o: S.LinearLR(o, start, end, total)), base)


@settings(deadline=None, max_examples=40)
@given(max_lr=lrs, total=st.integers(N, 2 * N), pct=st.floats(0.05, 0.95),
       strategy=st.sampled_from(["cos", "linear"]), three_phase=st.booleans(),
       div=st.floats(1.0, 100.0), final_div=st.floats(1.0, 1e5))
def test_one_cycle_schedule_equals_onecyclelr(max_lr, total, pct, strategy, three_phase, div, final_div):
    ours = optim.one_cycle_schedule(max_lr, total, pct, strategy, div, final_div, three_phase)
    theirs = torch_values(max_lr, lambda o: S.OneCycleLR(
        o, max_lr, total_steps=total, pct_start=pct, anneal_strategy=strategy, div_factor=div,
        final_div_factor=final_div, three_phase=three_phase, cycle_momentum=False), n=total + 1)
    assert_schedule_matches(ours, theirs, max_lr)


def test_one_cycle_schedule_past_total_steps_is_an_error_as_in_torch():
    with pytest.raises(ValueError, match=r"one_cycle_schedule: stepped 11 times, expected at most total_steps=10"):
        optim.one_cycle_schedule(1.0, 10)(11)


@settings(deadline=None, max_examples=30)
@given(base=lrs, warmup=st.integers(1, 20), T_max=st.integers(1, N), start=st.floats(0.01, 1.0),
       eta_frac=st.floats(0.0, 1.0))
def test_warmup_cosine_equals_sequentiallr_of_linearlr_and_cosineannealinglr(base, warmup, T_max, start, eta_frac):
    eta_min = base * eta_frac

    def make(o):
        return S.SequentialLR(o, [S.LinearLR(o, start, 1.0, warmup), S.CosineAnnealingLR(o, T_max, eta_min)],
                              milestones=[warmup])
    assert_schedule_matches(optim.warmup_cosine_schedule(base, warmup, T_max, start, eta_min),
                            torch_values(base, make), base)


@settings(deadline=None, max_examples=30)
@given(base=lrs, b1=st.integers(1, 20), b2=st.integers(1, 20), gamma=st.floats(0.5, 1.0))
def test_join_schedules_restarts_each_schedule_at_its_boundary_like_sequentiallr(base, b1, b2, gamma):
    bounds = sorted([b1, b1 + b2])

    def make(o):
        return S.SequentialLR(o, [S.ConstantLR(o, 0.5, total_iters=1000), S.ExponentialLR(o, gamma),
                                  S.StepLR(o, 3, gamma)], milestones=bounds)
    ours = optim.join_schedules([optim.constant_schedule(0.5 * base), optim.exponential_schedule(base, gamma),
                                 optim.step_decay_schedule(base, 3, gamma)], bounds)
    assert_schedule_matches(ours, torch_values(base, make), base)


@pytest.mark.parametrize("make, match", [
    (lambda: optim.step_decay_schedule(1.0, 0), r"step_decay_schedule: expected step_size to be an integer >= 1, got 0"),
    (lambda: optim.cosine_annealing_schedule(1.0, 0), r"cosine_annealing_schedule: expected T_max to be an integer >= 1, got 0"),
    (lambda: optim.linear_schedule(1.0, 0.0), r"linear_schedule: expected start_factor in \(0, 1\], got 0.0"),
    (lambda: optim.linear_schedule(1.0, 0.5, 1.5), r"linear_schedule: expected end_factor in \[0, 1\], got 1.5"),
    (lambda: optim.linear_schedule(1.0, 1.5), r"linear_schedule: expected start_factor in \(0, 1\], got 1.5"),
    (lambda: optim.linear_schedule(1.0, total_iters=0), r"linear_schedule: expected total_iters to be an integer >= 1, got 0"),
    (lambda: optim.one_cycle_schedule(1.0, 10, pct_start=1.5), r"one_cycle_schedule: expected pct_start in \[0, 1\], got 1.5"),
    (lambda: optim.one_cycle_schedule(1.0, 10, anneal_strategy="exp"), r"one_cycle_schedule: expected anneal_strategy 'cos' or 'linear', got 'exp'"),
    (lambda: optim.one_cycle_schedule(1.0, 0), r"one_cycle_schedule: expected total_steps to be an integer >= 1, got 0"),
    (lambda: optim.join_schedules([optim.constant_schedule(1.0)], [3]), r"join_schedules: expected len\(boundaries\) == len\(schedules\) - 1"),
    (lambda: optim.join_schedules([optim.constant_schedule(1.0)] * 3, [5, 2]), r"join_schedules: expected increasing boundaries, got \[5, 2\]"),
    (lambda: optim.constant_schedule(1.0)(-1), r"constant_schedule: expected the step to be an integer >= 0, got -1"),
])
def test_invalid_schedule_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_non_numeric_schedule_value_raises_type_error():
    with pytest.raises(TypeError, match=r"exponential_schedule: expected gamma to be a real number, got str"):
        optim.exponential_schedule(1.0, "0.9")


@pytest.mark.parametrize("total,pct,three_phase", [(10, 0.1, False), (5, 0.2, True), (2, 0.5, False)])
def test_one_cycle_with_an_empty_phase_is_a_clear_error_not_a_zero_division(total, pct, three_phase):
    with pytest.raises(ValueError, match="expected no phase of zero steps"):
        optim.one_cycle_schedule(1.0, total, pct_start=pct, three_phase=three_phase)


@settings(deadline=None, max_examples=20)
@given(peak=st.floats(1e-3, 1.0), total=st.integers(1, 200), fraction=st.sampled_from([0.0, 0.1, 0.23, 0.5, 0.99]))
def test_triangular_schedule_rises_from_a_fifth_to_the_peak_at_int_fraction_t_and_falls_to_seven_percent(
        peak, total, fraction):
    # airbench's defaults: start_factor 0.2, end_factor 0.07, the peak at w = int(peak_fraction * T)
    s = optim.triangular_schedule(peak, total, fraction)
    w = int(total * fraction)
    for t in sorted({0, max(w - 1, 0), w, (w + total) // 2, total, total + 5}):
        want = (peak * (0.2 * (1 - t / w) + t / w) if t < w else
                peak * ((1 - (min(t, total) - w) / (total - w)) + 0.07 * (min(t, total) - w) / (total - w)))
        assert math.isclose(s(t), want, rel_tol=1e-12), t
        assert math.isclose(float(s(torch.tensor(t))), want, rel_tol=1e-12), t   # the tensor-step path
    assert math.isclose(s(total), 0.07 * peak, rel_tol=1e-12)
    if w > 0:
        assert math.isclose(s(0), 0.2 * peak, rel_tol=1e-12) and math.isclose(s(w), peak, rel_tol=1e-12)


def test_triangular_schedule_refuses_bad_arguments_naming_itself_and_the_argument():
    T = optim.triangular_schedule
    T(0.1, 1, 0.0, 0.0, 0.0)   # the boundaries that are allowed: one step, peak at 0, zero factors
    for call, error, match in [
        (lambda: T("0.1", 10), TypeError, r"triangular_schedule: expected peak_value to be a real number"),
        (lambda: T(0.1, 0), ValueError, r"triangular_schedule: expected total_steps to be an integer >= 1, got 0"),
        (lambda: T(0.1, 10, "a"), TypeError, r"triangular_schedule: expected peak_fraction to be a real number"),
        (lambda: T(0.1, 10, 0.2, "a"), TypeError, r"triangular_schedule: expected start_factor to be a real number"),
        (lambda: T(0.1, 10, 0.2, 0.2, "a"), TypeError, r"triangular_schedule: expected end_factor to be a real number"),
        (lambda: T(0.1, 10, 1.0), ValueError, r"triangular_schedule: expected peak_fraction in \[0, 1\), got 1.0"),
        (lambda: T(0.1, 10, -0.1), ValueError, r"triangular_schedule: expected peak_fraction in \[0, 1\), got -0.1"),
        (lambda: T(0.1, 10, 0.2, -0.5), ValueError, r"triangular_schedule: expected start_factor >= 0, got -0.5"),
        (lambda: T(0.1, 10, 0.2, 0.2, -0.5), ValueError, r"triangular_schedule: expected end_factor >= 0, got -0.5"),
        (lambda: T(0.1, 10)(-1), ValueError, r"triangular_schedule: expected the step to be an integer >= 0, got -1"),
    ]:
        with pytest.raises(error, match="^" + match):
            call()


@pytest.mark.parametrize("max_lr, total, kwargs", [
    (0.3, 50, {}),                                             # torch's defaults: two phases, cos, 25, 1e4
    (0.3, 20, {"pct_start": 0.0}),                             # the bounds of pct_start: both allowed
    (0.3, 20, {"pct_start": 0.0, "three_phase": True}),
    (0.3, 20, {"pct_start": 1.0, "three_phase": True}),
    # phase ends 14 and 28 fall on steps: there (initial - max_lr) * 1 + max_lr != initial in
    # float64, so only the phase that ends at the step gives torch's bits
    (0.1, 60, {"pct_start": 0.25, "anneal_strategy": "linear", "div_factor": 10.0,
               "final_div_factor": 100.0, "three_phase": True}),
    (0.3, 60, {"pct_start": 0.25, "anneal_strategy": "linear", "div_factor": 10.0, "final_div_factor": 100.0}),
])
def test_one_cycle_schedule_gives_the_bits_of_onecyclelr_at_every_step_including_phase_ends(max_lr, total, kwargs):
    # torch's OneCycleLR is closed form too (each lr from initial_lr, max_lr and min_lr with the
    # same float64 operations in the same order): no tolerance
    ours = optim.one_cycle_schedule(max_lr, total, **kwargs)
    theirs = torch_values(max_lr, lambda o: S.OneCycleLR(o, max_lr, total_steps=total, cycle_momentum=False,
                                                         **kwargs), n=total + 1)
    assert [ours(t) for t in range(total + 1)] == theirs


def test_one_cycle_schedule_refuses_bad_arguments_naming_itself_and_the_argument():
    O = optim.one_cycle_schedule
    for call, error, match in [
        (lambda: O("0.1", 10), TypeError, r"one_cycle_schedule: expected max_lr to be a real number, got str$"),
        (lambda: O(0.1, 10, "a"), TypeError, r"one_cycle_schedule: expected pct_start to be a real number, got str$"),
        (lambda: O(0.1, 10, div_factor="a"), TypeError,
         r"one_cycle_schedule: expected div_factor to be a real number, got str$"),
        (lambda: O(0.1, 10, final_div_factor="a"), TypeError,
         r"one_cycle_schedule: expected final_div_factor to be a real number, got str$"),
        (lambda: O(0.1, 10, pct_start=-0.1), ValueError, r"one_cycle_schedule: expected pct_start in \[0, 1\], got -0.1$"),
        (lambda: O(0.1, 10)(-1), ValueError, r"one_cycle_schedule: expected the step to be an integer >= 0, got -1$"),
        # every phase end, as floats rounded to 6 places (the last one is total_steps - 1)
        (lambda: O(0.1, 10, pct_start=0.1), ValueError,
         r"one_cycle_schedule: expected no phase of zero steps \(torch's OneCycleLR divides by each phase's "
         r"length\), got phase ends \[0\.0, 9\] from pct_start=0\.1, total_steps=10$"),
        (lambda: O(0.1, 5, pct_start=0.6, three_phase=True), ValueError,
         r"one_cycle_schedule: expected no phase of zero steps \(torch's OneCycleLR divides by each phase's "
         r"length\), got phase ends \[2\.0, 4\.0, 4\] from pct_start=0\.6, total_steps=5$"),
    ]:
        with pytest.raises(error, match="^" + match):
            call()


@settings(deadline=None, max_examples=20)
@given(base=lrs, milestones=st.lists(st.integers(0, N), max_size=6))
def test_multistep_schedule_defaults_and_a_milestone_at_step_0_equal_multisteplr(base, milestones):
    # torch's default gamma is 0.1, and a milestone 0 already decays the rate of step 0
    milestones = [0] + milestones
    assert_schedule_matches(optim.multistep_schedule(base, milestones),
                            torch_values(base, lambda o: S.MultiStepLR(o, milestones)), base)


def test_multistep_schedule_refuses_bad_arguments_naming_itself_and_the_argument():
    M = optim.multistep_schedule
    for call, error, match in [
        (lambda: M("0.1", [2]), TypeError, r"multistep_schedule: expected init_value to be a real number, got str$"),
        (lambda: M(0.1, [2], "a"), TypeError, r"multistep_schedule: expected gamma to be a real number, got str$"),
        (lambda: M(0.1, [2, -1]), ValueError, r"multistep_schedule: expected each milestone to be an integer >= 0, got -1$"),
        (lambda: M(0.1, [2.5]), ValueError, r"multistep_schedule: expected each milestone to be an integer >= 0, got 2.5$"),
        (lambda: M(0.1, [2])(-1), ValueError, r"multistep_schedule: expected the step to be an integer >= 0, got -1$"),
    ]:
        with pytest.raises(error, match="^" + match):
            call()


def test_join_schedules_refuses_bad_arguments_naming_itself_and_the_argument():
    J, c = optim.join_schedules, optim.constant_schedule(1.0)
    for call, error, match in [
        (lambda: J([c, c], [-1]), ValueError, r"join_schedules: expected each boundary to be an integer >= 0, got -1$"),
        (lambda: J([c, c], [2.5]), ValueError, r"join_schedules: expected each boundary to be an integer >= 0, got 2.5$"),
        (lambda: J([c, 0.5], [3]), TypeError, r"join_schedules: expected schedule 1 to be callable, got float$"),
        (lambda: J([c, c], [3])(-1), ValueError, r"join_schedules: expected the step to be an integer >= 0, got -1$"),
    ]:
        with pytest.raises(error, match="^" + match):
            call()


def test_join_schedules_with_a_boundary_at_step_0_runs_the_next_schedule_from_step_0():
    # the first piece differs from the second at step 0, so a boundary taken as "t > b" shows
    first, second = optim.constant_schedule(3.0), optim.exponential_schedule(1.0, 0.5)
    joined = optim.join_schedules([first, second], [0])
    assert [joined(t) for t in range(5)] == [second(t) for t in range(5)]
    t = torch.arange(5)   # the tensor step selects the same piece
    assert torch.equal(joined(t), torch.tensor([second(i) for i in range(5)], dtype=torch.float64))
    # a later boundary: the step equal to it is already the next piece's step 0, tensor or int
    joined = optim.join_schedules([first, second, first], [2, 4])
    expected = [3.0, 3.0, 1.0, 0.5, 3.0, 3.0]
    assert [joined(t) for t in range(6)] == expected
    assert torch.equal(joined(torch.arange(6)), torch.tensor(expected, dtype=torch.float64))


def test_warmup_cosine_schedule_defaults_start_at_a_thousandth_of_the_peak_and_anneal_to_zero():
    warmup, decay = 5, 10
    ours = optim.warmup_cosine_schedule(2.0, warmup, decay)

    def make(o):
        return S.SequentialLR(o, [S.LinearLR(o, 1e-3, 1.0, warmup), S.CosineAnnealingLR(o, decay)],
                              milestones=[warmup])
    assert_schedule_matches(ours, torch_values(2.0, make, n=warmup + decay + 1), 2.0)
    assert ours(0) == 2e-3 and ours(warmup + decay) == 0.0


# Every schedule with its scale argument's name, built with valid other arguments.
_SCALED = {
    "step_decay_schedule": ("init_value", lambda v: optim.step_decay_schedule(v, 3)),
    "multistep_schedule": ("init_value", lambda v: optim.multistep_schedule(v, [2, 4])),
    "exponential_schedule": ("init_value", lambda v: optim.exponential_schedule(v, 0.9)),
    "cosine_annealing_schedule": ("init_value", lambda v: optim.cosine_annealing_schedule(v, 10)),
    "linear_schedule": ("init_value", lambda v: optim.linear_schedule(v, 0.5, 1.0, 4)),
    "one_cycle_schedule": ("max_lr", lambda v: optim.one_cycle_schedule(v, 10)),
    "triangular_schedule": ("peak_value", lambda v: optim.triangular_schedule(v, 10)),
}


@pytest.mark.parametrize("fn", sorted(_SCALED))
def test_every_schedule_names_itself_and_its_scale_or_step_when_refusing_them(fn):
    name, make = _SCALED[fn]
    with pytest.raises(TypeError, match=rf"^{fn}: expected {name} to be a real number, got str$"):
        make("0.1")
    for bad, what in ((torch.ones(2), "torch.float32 of shape (2,)"), (torch.tensor(1), "torch.int64 of shape ()")):
        with pytest.raises(TypeError, match=rf"^{fn}: expected {name} to be a real number or a 0-d floating "
                                            rf"tensor, got {re.escape(what)}$"):
            make(bad)
    schedule = make(0.1)
    for t in (-1, 1.5, True, torch.tensor(1.0), torch.tensor(True)):
        with pytest.raises(ValueError, match=rf"^{fn}: expected the step to be an integer >= 0, got "
                                             rf"{re.escape(repr(t))}$"):
            schedule(t)
    # an int step gives a Python float; a 0-d float tensor peak is a member's own: the same values
    # as the number, as float64 tensors
    for t in (0, 3, 7):
        assert type(schedule(t)) is float
        assert torch.equal(make(torch.tensor(0.1, dtype=torch.float64))(torch.tensor(t)),
                           torch.tensor(schedule(t), dtype=torch.float64))
        # a float32 peak is taken as its float64 value, not computed in float32
        peak32 = torch.tensor(0.1, dtype=torch.float32)
        assert torch.equal(make(peak32)(torch.tensor(t)), torch.tensor(make(float(peak32))(t), dtype=torch.float64))


def test_every_real_argument_of_a_schedule_is_refused_by_name_and_the_defaults_are_torchs():
    for make, fn, name in (
            (lambda v: optim.step_decay_schedule(0.1, 3, gamma=v), "step_decay_schedule", "gamma"),
            (lambda v: optim.multistep_schedule(0.1, [2], gamma=v), "multistep_schedule", "gamma"),
            (lambda v: optim.exponential_schedule(0.1, v), "exponential_schedule", "gamma"),
            (lambda v: optim.cosine_annealing_schedule(0.1, 10, eta_min=v), "cosine_annealing_schedule", "eta_min"),
            (lambda v: optim.linear_schedule(0.1, start_factor=v), "linear_schedule", "start_factor"),
            (lambda v: optim.linear_schedule(0.1, end_factor=v), "linear_schedule", "end_factor"),
            (lambda v: optim.one_cycle_schedule(0.1, 10, pct_start=v), "one_cycle_schedule", "pct_start"),
            (lambda v: optim.one_cycle_schedule(0.1, 10, div_factor=v), "one_cycle_schedule", "div_factor"),
            (lambda v: optim.one_cycle_schedule(0.1, 10, final_div_factor=v), "one_cycle_schedule", "final_div_factor"),
            (lambda v: optim.triangular_schedule(0.1, 10, peak_fraction=v), "triangular_schedule", "peak_fraction"),
            (lambda v: optim.triangular_schedule(0.1, 10, start_factor=v), "triangular_schedule", "start_factor"),
            (lambda v: optim.triangular_schedule(0.1, 10, end_factor=v), "triangular_schedule", "end_factor"),
            (lambda v: optim.constant_schedule(v), "constant_schedule", "value")):
        for bad, type_name in (("0.5", "str"), (True, "bool"), (None, "NoneType")):
            with pytest.raises(TypeError, match=rf"^{fn}: expected {name} to be a real number, got {type_name}$"):
                make(bad)
    # torch's defaults: StepLR and MultiStepLR gamma 0.1, LinearLR 1/3 -> 1 over 5 steps
    step, linear = optim.step_decay_schedule(1.0, 2), optim.linear_schedule(1.0)
    assert [step(t) for t in (0, 2, 4)] == [1.0, 0.1, 1.0 * 0.1 ** 2]
    assert optim.multistep_schedule(1.0, [1])(1) == 0.1
    assert [linear(t) for t in (0, 5, 6)] == [1.0 / 3, 1.0, 1.0] and linear(4) < 1.0


def test_a_schedule_may_return_any_real_number_which_is_taken_as_a_float():
    import fractions
    g = {"w": torch.tensor([1.0, -3.0])}
    for rate in (fractions.Fraction(1, 2), 1):
        stage = optim.scale_by_learning_rate(lambda t, rate=rate: rate)
        out, _ = stage.update(g, stage.init(g))
        assert torch.equal(out["w"], -float(rate) * g["w"])
        adam, as_float = optim.scale_by_adam(lambda t, rate=rate: rate), optim.scale_by_adam(float(rate))
        assert torch.equal(adam.update(g, adam.init(g), g)[0]["w"], as_float.update(g, as_float.init(g), g)[0]["w"])
