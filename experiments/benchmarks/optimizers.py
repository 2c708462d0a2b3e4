"""Benchmark: one optimizer step of ours against torch.optim (foreach=True) on VGG16-shaped trees.

    python -m experiments.bench_optim [--reps 7] [--quick] [--dtype float32|float64] [--threads N]
                                      [--tuned-malloc]

Builds a parameter tree with torchvision's vgg16 shapes (13 conv weights / biases and 3 linear
layers, 138M parameters; ``--quick`` divides the channel counts by 4, about 1/16 of the tree) and
random gradients. For SGD (Nesterov, momentum 0.9, weight decay 5e-4) and Adam it times,
interleaved in one process (each repetition runs every implementation once, in a rotating
order), the median of:

    torch.optim foreach:    opt.step()   (grads already in .grad; updates params in place)
    ours, update + apply:   updates, state = opt.update(...); params = optim.apply_updates(...)
    ours, fused step:       params, state = optim.step(opt, grads, state, params)
    ours, donated step:     params, state = optim.step(opt, grads, state, params, donate=True)

and prints each one's ratio to torch. Each keeps its own trajectory, as a training loop would;
the donated and the fused trajectories are checked against torch's at the end (bit-identical).
The donated step is the like-for-like comparison with torch.optim's in-place step; the pure
paths allocate fresh outputs every step.

``--threads 1`` is the setting for a shared, oversubscribed machine: there torch's OpenMP threads
wait on each other at every barrier, which inflated every time here 10-40x and drowned the
differences between implementations.

``--tuned-malloc`` then runs the same benchmark again in a child process with glibc's
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set large, so freed blocks stay mapped
and fresh outputs are not page-faulted in (a note on where the pure paths' time goes, not a
recommended default).
"""
from __future__ import annotations

import gc
import statistics
import time

import torch

import optim

TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}
REFERENCE = "torch.optim foreach (in place)"


def vgg16_shapes(quick: bool) -> dict[str, tuple[int, ...]]:
    """torchvision vgg16's state_dict shapes (built on the meta device: no memory, no init)."""
    import torchvision
    with torch.device("meta"):
        model = torchvision.models.vgg16(weights=None)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if quick:
        shapes = {k: tuple(max(1, d // 4) if i < 2 else d for i, d in enumerate(s)) for k, s in shapes.items()}
    return shapes


def make_tree(shapes, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


def bench(name, ours, theirs, shapes, dtype, reps, warmup=2):
    """Print one table row per implementation: median seconds per step and the ratio to torch."""
    params = make_tree(shapes, dtype, 0)
    grads = make_tree(shapes, dtype, 1, scale=1e-3)   # only read, by all four
    tparams = [p.clone().requires_grad_(True) for p in params.values()]
    for tp, g in zip(tparams, grads.values()):
        tp.grad = g
    topt = theirs(tparams)
    clone = lambda tree: {k: v.clone() for k, v in tree.items()}
    traj = {"unfused": [clone(params), None], "fused": [clone(params), None], "donated": [params, None]}
    for t in traj.values():
        t[1] = ours.init(t[0])

    def run_unfused():
        p, s = traj["unfused"]
        updates, s = ours.update(grads, s, p)
        traj["unfused"] = [optim.apply_updates(p, updates), s]

    def run_fused():
        p, s = traj["fused"]
        traj["fused"] = list(optim.step(ours, grads, s, p))

    def run_donated():
        p, s = traj["donated"]
        traj["donated"] = list(optim.step(ours, grads, s, p, donate=True))

    runs = {REFERENCE: topt.step,
            "ours pure: update + apply_updates": run_unfused,
            "ours pure: fused step": run_fused,
            "ours donated: step(donate=True)": run_donated}
    times = {label: [] for label in runs}
    labels = list(runs)
    with torch.no_grad():
        for i in range(warmup + reps):
            for label in labels[i % len(labels):] + labels[:i % len(labels)]:
                gc.collect()
                t0 = time.perf_counter()
                runs[label]()
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[label].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    for label, m in med.items():
        print(f"| {name} | {label} | {m * 1e3:9.1f} | {m / med[REFERENCE]:5.2f} |")
    # The fused and donated trajectories are torch's, operation for operation.
    for which in ("fused", "donated"):
        err = max((a - b.detach()).abs().max().item() for a, b in zip(traj[which][0].values(), tparams))
        print(f"|  | (max abs difference {which} vs torch after {warmup + reps} steps: {err:.1e}) | | |")
