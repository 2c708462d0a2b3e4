"""Benchmark: a CIFAR model's training step on 1 process or, under torchrun, N data-parallel
processes; images/s and the share of each step spent communicating (docs/distributed.md).

The command line only; the measurement is :mod:`experiments.cifar.parallel_speed`.

    python -m experiments.bench_distributed --model b --threads 2
    torchrun --standalone --nproc_per_node 2 -m experiments.bench_distributed --model b
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .cifar.parallel_speed import measure
from .cifar.config import recipe
from .train import distributed
from .train.commands import refusal


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_distributed",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["a", "b", "c"], default="b")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--batch-size", type=int, help="global batch (default: the fast recipe's, 512)")
    ap.add_argument("--fp32", action="store_true", help="no bf16, no channels_last (default: the "
                                                        "recipe's bf16 + channels_last)")
    ap.add_argument("--sync-bn", action="store_true", help="batch statistics of the global batch")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's / torchrun's)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps: expected a whole number >= 1, got {args.steps}")
    changes = dict(device="cpu", sync_bn=args.sync_bn)
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    if args.fp32:
        changes.update(bf16=False, channels_last=False)
    try:
        cfg = recipe(f"cifar_model_{args.model}", "fast").replace(**changes)
    except ValueError as err:   # SettingsError: --batch-size 0
        return refusal(err)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        parallel = distributed.start(cfg)
    except (ValueError, distributed.StartError) as err:
        return refusal(err)
    try:
        out = measure(cfg, args.steps, parallel)
        if parallel is not None:
            parallel.all_ok(True)
    finally:
        distributed.stop(parallel)
    if parallel is None or parallel.writes:
        out.update(model=args.model, bf16=cfg.bf16, channels_last=cfg.channels_last,
                   sync_bn=args.sync_bn)
        print(json.dumps(out), file=sys.stdout)
    return distributed.exit_now(parallel, 0)   # under torchrun: no interpreter teardown


if __name__ == "__main__":
    sys.exit(main())
