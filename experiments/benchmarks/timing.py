"""Timing helpers of the speed benchmark: clocks that wait for the device, interleaved rounds,
the machine's matmul peak and a description of the machine.

Interleaving: ``interleaved({"a": fa, "b": fb}, rounds)`` calls ``fa, fb, fa, fb, ...`` and keeps
every call's seconds, so a burst of background load (other processes sharing the cores) slows
every candidate alike instead of whichever happened to run at that moment; medians then drop the
outliers.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Mapping

import torch

__all__ = ["sync", "timed", "interleaved", "median", "matmul", "matmul_peak", "machine_info"]


def sync(device: torch.device | str) -> None:
    """Wait until every queued kernel on ``device`` has finished (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds ``fn()`` takes, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: Mapping[str, Callable[[], object]], rounds: int,
                device: torch.device | str) -> dict[str, list[float]]:
    """``{name: [seconds of round 1, round 2, ...]}``, calling the functions in turn each round.

    Round ``r`` starts at function ``r mod k`` (k functions) and goes round the list, so over
    ``k`` rounds every function runs once in every position: none always follows the same
    neighbour (whose leftover cache state or memory it would inherit).
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"interleaved: expected rounds a positive int, got {rounds!r}")
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            times[name].append(timed(fns[name], device))
    return times


def median(xs) -> float:
    """The median of a non-empty sequence of numbers."""
    xs = list(xs)
    if not xs:
        raise ValueError("median: expected at least one value, got none")
    return statistics.median(xs)


def matmul(dtype: torch.dtype, device: torch.device | str, n: int = 2048) -> Callable[[], object]:
    """A zero-argument function running one ``n x n @ n x n`` matmul in ``dtype`` (``2 n^3``
    FLOPs), warmed up once; inputs are fixed random matrices."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"matmul: expected a positive int n, got {n!r}")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a, b, out=out)
    return lambda: torch.mm(a, b, out=out)


def matmul_peak(dtype: torch.dtype, device: torch.device | str, *, n: int = 2048,
                reps: int = 5) -> float:
    """The best FLOP/s of ``reps`` square ``n x n @ n x n`` matmuls in ``dtype`` (``2 n^3`` FLOPs
    each), after one untimed warm-up: the practical peak this machine reaches for ``dtype``.
    """
    if not isinstance(reps, int) or reps < 1:
        raise ValueError(f"matmul_peak: expected a positive int reps, got {reps!r}")
    run = matmul(dtype, device, n)
    best = min(timed(run, device) for _ in range(reps))
    return 2.0 * n ** 3 / best


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info(device: torch.device | str) -> dict[str, str]:
    """What the numbers were measured on: device, CPU model and cores, ISA, torch version."""
    device = torch.device(device)
    flags = _cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "isa": ", ".join(isa) or "unknown",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if hasattr(torch.backends, "cpu"):
        info["torch cpu capability"] = torch.backends.cpu.get_cpu_capability()
    return info
