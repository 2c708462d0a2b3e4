"""The end-to-end peer of ``experiments.sweep``: the same learning-rate sweep as plain torch.nn
models trained one after another, the way the PyTorch CIFAR-10 tutorial trains one.

    python -m experiments.benchmarks.torch_sweep --data-dir ../shared/datasets/cifar10-jpeg \\
        --lr 1e-1,1e-2,1e-3,1e-4,1e-5 --seeds 3 --epochs 10 --out runs/torch-sweep.json

Each (lr, seed) is the tutorial's ``Net`` (:func:`experiments.benchmarks.reference.tutorial_module`,
``torch.manual_seed(seed)`` initialisation), ``torch.optim.SGD(lr, momentum=0.9)``,
``F.cross_entropy``, batch 32 in a shuffled order per epoch, inputs normalised with the
tutorial's (0.5, 0.5); after every epoch the test accuracy, as ``experiments.sweep`` measures it.
The output holds each run's wall time and accuracy and is rewritten after every run, so a rerun
with the same ``--out`` skips the runs it already holds (resumable after a kill).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from nets.checkpoint import atomic_write

from .reference import tutorial_module

__all__ = ["train_one", "main"]


def _normalised(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - 0.5) / 0.5


def train_one(train_images, train_labels, test_images, test_labels, *, lr: float, seed: int,
              epochs: int, batch: int = 32, momentum: float = 0.9) -> dict:
    """Train one tutorial net; ``{"lr", "seed", "seconds", "test_accuracy"}`` (the last epoch's)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    module = tutorial_module(int(train_labels.max()) + 1 if len(train_labels) else 10).train()
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum)
    x_test = _normalised(test_images)
    order_gen = torch.Generator().manual_seed(seed)
    accuracy = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(train_labels), generator=order_gen)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(module(_normalised(train_images[idx])), train_labels[idx]).backward()
            opt.step()
        with torch.no_grad():
            correct = sum(int((module(x_test[i:i + 1000]).argmax(1) == test_labels[i:i + 1000]).sum())
                          for i in range(0, len(test_labels), 1000))
        accuracy = 100.0 * correct / max(1, len(test_labels))
    return {"lr": lr, "seed": seed, "seconds": time.perf_counter() - start, "test_accuracy": accuracy}


def main(argv: Sequence[str] | None = None) -> int:
    from experiments.data.cifar10 import find_data_dir, load_cifar10

    p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.torch_sweep",
                                description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--lr", default="1e-1,1e-2,1e-3,1e-4,1e-5")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/torch-sweep.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = find_data_dir(args.data_dir, download=False)
    train, test = load_cifar10(root, "train"), load_cifar10(root, "test")
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {"runs": []}
    have = {(r["lr"], r["seed"]) for r in done["runs"]}
    for lr in [float(v) for v in args.lr.split(",")]:
        for seed in range(args.seeds):
            if (lr, seed) in have:
                continue
            run = train_one(train.images, train.labels, test.images, test.labels, lr=lr, seed=seed,
                            epochs=args.epochs)
            done["runs"].append(run)
            done["total_seconds"] = sum(r["seconds"] for r in done["runs"])
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out, json.dumps(done, indent=1) + "\n")
            print(f"lr {lr:g} seed {seed}: {run['seconds']:.1f} s, test {run['test_accuracy']:.2f}%",
                  file=sys.stderr)
    print(f"{len(done['runs'])} runs, {done.get('total_seconds', 0.0):.1f} s in all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
