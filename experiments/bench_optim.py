"""Benchmark: one optimizer step of ours against torch.optim (foreach=True) on VGG16-shaped trees.

The command line only; the study itself is :mod:`experiments.benchmarks.optimizers`.

    python -m experiments.bench_optim [--reps 7] [--quick] [--dtype float32|float64] [--threads N]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import subprocess
import sys

import torch

import optim

from .benchmarks.optimizers import TUNED_MALLOC, bench, vgg16_shapes


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
