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

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per implementation")
    ap.add_argument("--quick", action="store_true", help="a ~1/16-size tree instead of 138M parameters")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--tuned-malloc", action="store_true",
                    help="afterwards, rerun in a child process with glibc's mmap / trim thresholds "
                         "set large (fresh outputs then reuse mapped memory)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads: expected an integer >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = vgg16_shapes(args.quick)
    n = sum(torch.Size(s).numel() for s in shapes.values())
    tuned = all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {n / 1e6:.1f}M parameters in {len(shapes)} tensors, {args.dtype}, {args.reps} reps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, load average {load:.1f} at start"
          + (", " + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items()) if tuned else ""))
    print("| optimizer | implementation | median ms / step | ratio to torch |")
    print("| --- | --- | ---: | ---: |")
    bench("SGD nesterov m=0.9 wd=5e-4",
          optim.sgd(0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
          lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True),
          shapes, dtype, args.reps)
    gc.collect()
    bench("Adam", optim.adam(1e-3), lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
          shapes, dtype, args.reps)
    sys.stdout.flush()
    if args.tuned_malloc and not tuned:
        print()
        child = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--tuned-malloc"]
        subprocess.run([sys.executable, "-m", "experiments.bench_optim", *child],
                       env={**os.environ, **TUNED_MALLOC}, check=True)


if __name__ == "__main__":
    main()
