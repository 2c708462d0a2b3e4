"""Learning-rate schedules: pure functions ``step -> lr`` (step = updates done so far, from 0).

Each equals the learning rate torch.optim.lr_scheduler puts in the optimizer after ``step``
calls of ``scheduler.step()`` (``get_last_lr()``), written in closed form (torch's
``_get_closed_form_lr``) instead of torch's recursive multiplications, so values agree to a few
ulps rather than bit for bit.

    constant_schedule(v)(t)                    = v
    step_decay_schedule(v, s, g)(t)            = v * g ** (t // s)                  StepLR
    multistep_schedule(v, ms, g)(t)            = v * g ** #{m in ms : m <= t}        MultiStepLR
    exponential_schedule(v, g)(t)              = v * g ** t                         ExponentialLR
    cosine_annealing_schedule(v, T, eta_min)(t) = eta_min + (v - eta_min)(1 + cos(pi t / T)) / 2
                                                                                    CosineAnnealingLR
    linear_schedule(v, f0, f1, T)(t)           = v * (f0 + (f1 - f0) * min(t, T) / T)  LinearLR
    one_cycle_schedule(max_lr, T, ...)                                              OneCycleLR
    join_schedules([s0, s1, ...], [b1, ...])(t) = s_i(t - b_i) for b_i <= t < b_{i+1}  SequentialLR
    warmup_cosine_schedule(...)                = join(linear warm-up, cosine)
    triangular_schedule(v, T, p, f0, f1)(t)    = v * (f0 + (1 - f0) t / w) for t < w = int(p T),
                                                 then v * (1 + (f1 - 1)(t - w) / (T - w))  LambdaLR

The initial or peak value (``init_value``, ``max_lr``, ``peak_value``) may be a 0-d floating
tensor, a member's own rate under ``vmap``: the schedule then returns a 0-d float64 tensor with
the bits of the Python-number schedule (the same float64 operations in the same order;
tests/test_optim_tensor_hyperparams.py checks it under vmap).

Every schedule also takes the step as a 0-d int64 tensor (a member's count under ``vmap``) and
then returns a 0-d float64 tensor computed on the device with the same formula, branches
written as ``torch.where``: nothing is read on the host, so the schedule runs inside
``torch.func.vmap`` (docs/sweeps.md). Values agree with the integer step to a few ulps.
"""
from __future__ import annotations

import bisect
import math
from numbers import Integral, Real
from typing import Callable, Sequence

import torch

Schedule = Callable[[int], float]


def _real(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{fn}: expected {name} to be a real number, got {type(value).__name__}")
    return float(value)


def _peak(fn: str, name: str, value):
    """A schedule's scale (its initial or peak value): a real number as a float, or a 0-d
    floating tensor as it is (a member's own peak under ``vmap``; not read on the host)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"{fn}: expected {name} to be a real number or a 0-d floating tensor, "
                            f"got {value.dtype} of shape {tuple(value.shape)}")
        return value.to(torch.float64)
    return _real(fn, name, value)


def _int(fn: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{fn}: expected {name} to be an integer >= {minimum}, got {value!r}")
    return int(value)


def _step(fn: str, t):
    """The step as an int, or a 0-d integer tensor as it is (not checked: its value may not be
    readable on the host)."""
    if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dtype != torch.bool:
        return t
    if isinstance(t, bool) or not isinstance(t, Integral) or t < 0:
        raise ValueError(f"{fn}: expected the step to be an integer >= 0, got {t!r}")
    return int(t)


def _f64(x) -> torch.Tensor:
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)


def _pow(base: float, k):
    """``base ** k``; a tensor ``k`` in float64 (a Python float base against an int64 tensor would
    give float32)."""
    return _f64(base) ** k if isinstance(k, torch.Tensor) else base ** k


def _cos(x):
    return torch.cos(_f64(x)) if isinstance(x, torch.Tensor) else math.cos(x)


def as_schedule(fn: str, lr) -> Schedule:
    """A float lr becomes a constant schedule; a callable is returned as it is; a 0-d tensor lr
    (a member's rate under ``vmap``) becomes ``t -> lr``."""
    if callable(lr):
        return lr
    if isinstance(lr, torch.Tensor):
        if lr.dim() != 0 or not lr.is_floating_point():
            raise TypeError(f"{fn}: expected a tensor lr to be a 0-d floating tensor, got "
                            f"{lr.dtype} of shape {tuple(lr.shape)}")
        return lambda t: lr
    return constant_schedule(_real(fn, "lr (a float or a schedule step -> lr)", lr))


def constant_schedule(value: float) -> Schedule:
    """``t -> value``."""
    value = _real("constant_schedule", "value", value)

    def schedule(t: int) -> float:
        _step("constant_schedule", t)
        return value
    return schedule


def step_decay_schedule(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``t -> init_value * gamma ** (t // step_size)`` (torch StepLR)."""
    init_value = _peak("step_decay_schedule", "init_value", init_value)
    step_size = _int("step_decay_schedule", "step_size", step_size, 1)
    gamma = _real("step_decay_schedule", "gamma", gamma)

    def schedule(t: int) -> float:
        return init_value * _pow(gamma, _step("step_decay_schedule", t) // step_size)
    return schedule


def multistep_schedule(init_value: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``t -> init_value * gamma ** (number of milestones <= t)`` (torch MultiStepLR; a milestone
    listed twice decays twice, as torch's Counter does)."""
    init_value = _peak("multistep_schedule", "init_value", init_value)
    gamma = _real("multistep_schedule", "gamma", gamma)
    ms = sorted(_int("multistep_schedule", "each milestone", m, 0) for m in milestones)

    def schedule(t: int) -> float:
        t = _step("multistep_schedule", t)
        if isinstance(t, torch.Tensor):
            passed = (torch.tensor(ms, dtype=torch.int64, device=t.device) <= t).sum()
            return init_value * _pow(gamma, passed)
        return init_value * gamma ** bisect.bisect_right(ms, t)
    return schedule


def exponential_schedule(init_value: float, gamma: float) -> Schedule:
    """``t -> init_value * gamma ** t`` (torch ExponentialLR)."""
    init_value = _peak("exponential_schedule", "init_value", init_value)
    gamma = _real("exponential_schedule", "gamma", gamma)

    def schedule(t: int) -> float:
        return init_value * _pow(gamma, _step("exponential_schedule", t))
    return schedule


def cosine_annealing_schedule(init_value: float, T_max: int, eta_min: float = 0.0) -> Schedule:
    """``t -> eta_min + (init_value - eta_min) * (1 + cos(pi * t / T_max)) / 2``
    (torch CosineAnnealingLR; like torch it keeps following the cosine past ``T_max``)."""
    init_value = _peak("cosine_annealing_schedule", "init_value", init_value)
    T_max = _int("cosine_annealing_schedule", "T_max", T_max, 1)
    eta_min = _real("cosine_annealing_schedule", "eta_min", eta_min)

    def schedule(t: int) -> float:
        t = _step("cosine_annealing_schedule", t)
        t = _f64(t) if isinstance(t, torch.Tensor) else t   # (an int64 tensor times pi: float32)
        return eta_min + (init_value - eta_min) * (1 + _cos(math.pi * t / T_max)) / 2
    return schedule


def linear_schedule(init_value: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                    total_iters: int = 5) -> Schedule:
    """``t -> init_value * (start_factor + (end_factor - start_factor) * min(t, T) / T)``
    (torch LinearLR; a linear warm-up when ``start_factor < end_factor = 1``)."""
    fn = "linear_schedule"
    init_value = _peak(fn, "init_value", init_value)
    start_factor = _real(fn, "start_factor", start_factor)
    end_factor = _real(fn, "end_factor", end_factor)
    if not 0 < start_factor <= 1:
        raise ValueError(f"{fn}: expected start_factor in (0, 1], got {start_factor}")
    if not 0 <= end_factor <= 1:
        raise ValueError(f"{fn}: expected end_factor in [0, 1], got {end_factor}")
    total_iters = _int(fn, "total_iters", total_iters, 1)

    def schedule(t: int) -> float:
        t = _step(fn, t)
        t = torch.clamp(_f64(t), max=total_iters) if isinstance(t, torch.Tensor) else min(total_iters, t)
        return init_value * (start_factor + (end_factor - start_factor) * t / total_iters)
    return schedule


def one_cycle_schedule(max_lr: float, total_steps: int, pct_start: float = 0.3,
                       anneal_strategy: str = "cos", div_factor: float = 25.0,
                       final_div_factor: float = 1e4, three_phase: bool = False) -> Schedule:
    """The 1cycle policy (torch OneCycleLR's learning rate; momentum cycling is not included).

    initial = max_lr / div_factor, minimum = initial / final_div_factor. Two phases: initial ->
    max_lr over steps [0, pct_start*T - 1], then max_lr -> minimum until T - 1. With
    ``three_phase``: initial -> max_lr -> initial (ending at 2*pct_start*T - 2) -> minimum.
    Each phase anneals with ``cos``: end + (start - end)/2 * (1 + cos(pi * pct)) or ``linear``:
    (end - start) * pct + start, pct being the fraction of the phase done. Like torch, stepping
    past ``total_steps`` is an error.
    """
    fn = "one_cycle_schedule"
    max_lr = _peak(fn, "max_lr", max_lr)
    total_steps = _int(fn, "total_steps", total_steps, 1)
    pct_start = _real(fn, "pct_start", pct_start)
    if not 0 <= pct_start <= 1:
        raise ValueError(f"{fn}: expected pct_start in [0, 1], got {pct_start}")
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"{fn}: expected anneal_strategy 'cos' or 'linear', got {anneal_strategy!r}")
    div_factor = _real(fn, "div_factor", div_factor)
    final_div_factor = _real(fn, "final_div_factor", final_div_factor)
    initial = max_lr / div_factor
    minimum = initial / final_div_factor
    if three_phase:
        phases = [(float(pct_start * total_steps) - 1, initial, max_lr),
                  (float(2 * pct_start * total_steps) - 2, max_lr, initial),
                  (total_steps - 1, initial, minimum)]
    else:
        phases = [(float(pct_start * total_steps) - 1, initial, max_lr),
                  (total_steps - 1, max_lr, minimum)]

    # torch's OneCycleLR divides by each phase's length and fails with ZeroDivisionError on an
    # empty phase (e.g. pct_start * total_steps == 1); say which condition fails instead.
    ends = [0.0] + [end for end, _, _ in phases]
    if any(b == a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"{fn}: expected no phase of zero steps (torch's OneCycleLR divides by "
                         f"each phase's length), got phase ends "
                         f"{[round(e, 6) for e in ends[1:]]} from pct_start={pct_start}, "
                         f"total_steps={total_steps}")

    def anneal(start: float, end: float, pct: float) -> float:
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (_cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def on_device(t: torch.Tensor) -> torch.Tensor:
        """The same phases with ``torch.where``: every phase evaluated, the right one selected."""
        t = _f64(t)
        value, start_step = None, 0.0
        for i, (end_step, start, end) in enumerate(phases):
            here = anneal(start, end, (t - start_step) / (end_step - start_step))
            value = here if value is None else torch.where(t <= start_step, value, here)
            start_step = end_step
        return value

    def schedule(t: int) -> float:
        t = _step(fn, t)
        if isinstance(t, torch.Tensor):
            return on_device(t)
        if t > total_steps:
            raise ValueError(f"{fn}: stepped {t} times, expected at most total_steps={total_steps}")
        start_step = 0.0
        for i, (end_step, start, end) in enumerate(phases):
            if t <= end_step or i == len(phases) - 1:
                return anneal(start, end, (t - start_step) / (end_step - start_step))
            start_step = end_step
        raise AssertionError("unreachable")
    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``t -> schedules[i](t - boundaries[i-1])`` where ``i`` = number of boundaries <= t
    (torch SequentialLR with ``milestones=boundaries``): each schedule restarts from its step 0
    at its boundary."""
    fn = "join_schedules"
    schedules = list(schedules)
    bounds = [_int(fn, "each boundary", b, 0) for b in boundaries]
    if not schedules or len(bounds) != len(schedules) - 1:
        raise ValueError(f"{fn}: expected len(boundaries) == len(schedules) - 1 >= 0, got "
                         f"{len(schedules)} schedules and {len(bounds)} boundaries")
    if bounds != sorted(bounds):
        raise ValueError(f"{fn}: expected increasing boundaries, got {bounds}")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"{fn}: expected schedule {i} to be callable, got {type(s).__name__}")

    def schedule(t: int) -> float:
        t = _step(fn, t)
        if isinstance(t, torch.Tensor):   # every piece on its own clock, the right one selected
            value = _f64(schedules[0](t))
            for b, s in zip(bounds, schedules[1:]):
                value = torch.where(t >= b, _f64(s(torch.clamp(t - b, min=0))), value)
            return value
        i = bisect.bisect_right(bounds, t)
        return schedules[i](t - (bounds[i - 1] if i > 0 else 0))
    return schedule


def warmup_cosine_schedule(peak_value: float, warmup_steps: int, decay_steps: int,
                           start_factor: float = 1e-3, eta_min: float = 0.0) -> Schedule:
    """Linear warm-up from ``start_factor * peak_value`` to ``peak_value`` over ``warmup_steps``,
    then cosine annealing to ``eta_min`` over ``decay_steps`` (torch: SequentialLR of LinearLR and
    CosineAnnealingLR with milestone ``warmup_steps``)."""
    return join_schedules(
        [linear_schedule(peak_value, start_factor, 1.0, warmup_steps),
         cosine_annealing_schedule(peak_value, decay_steps, eta_min)],
        [warmup_steps])


def triangular_schedule(peak_value: float, total_steps: int, peak_fraction: float = 0.23,
                        start_factor: float = 0.2, end_factor: float = 0.07) -> Schedule:
    """airbench's triangle: a linear rise from ``start_factor * peak_value`` to ``peak_value``
    over the first ``w = int(peak_fraction * total_steps)`` steps, then a linear fall to
    ``end_factor * peak_value`` at ``total_steps`` (steps past it keep that value):

        t < w:  v * (f0 (1 - t / w) + t / w)
        t >= w: v * ((1 - u) + f1 u),   u = (min(t, T) - w) / (T - w)

    (torch: ``LambdaLR`` with airbench's ``get_lr``, the same formula, stepped once per update).
    """
    fn = "triangular_schedule"
    peak_value = _peak(fn, "peak_value", peak_value)
    total_steps = _int(fn, "total_steps", total_steps, 1)
    peak_fraction = _real(fn, "peak_fraction", peak_fraction)
    start_factor = _real(fn, "start_factor", start_factor)
    end_factor = _real(fn, "end_factor", end_factor)
    if not 0 <= peak_fraction < 1:
        raise ValueError(f"{fn}: expected peak_fraction in [0, 1), got {peak_fraction}")
    for name, f in (("start_factor", start_factor), ("end_factor", end_factor)):
        if not f >= 0:
            raise ValueError(f"{fn}: expected {name} >= 0, got {f}")
    w = int(total_steps * peak_fraction)

    def schedule(t: int) -> float:
        t = _step(fn, t)
        if isinstance(t, torch.Tensor):
            t = torch.clamp(_f64(t), max=total_steps)
            up = start_factor * (1 - t / max(w, 1)) + t / max(w, 1)
            u = (t - w) / (total_steps - w)
            return peak_value * torch.where(t < w, up, (1 - u) + end_factor * u)
        t = min(t, total_steps)
        if t < w:
            frac = t / w
            return peak_value * (start_factor * (1 - frac) + 1.0 * frac)
        frac = (t - w) / (total_steps - w)
        return peak_value * (1.0 * (1 - frac) + end_factor * frac)
    return schedule
