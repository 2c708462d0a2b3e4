"""Images/s of a CIFAR recipe's data-parallel training step, and the share spent communicating
(``python -m experiments.bench_distributed``, docs/distributed.md).

Run on one process it times the plain step; under torchrun every rank times its part of the
global batch and rank 0 reports. Communication is timed two ways: the time each step spends in
:meth:`~experiments.train.distributed.DataParallel.reduce` (flatten, the one all_reduce,
unflatten; it includes waiting for the slowest rank), and the same all_reduce of the gradient
bucket alone, right after a barrier (the transfer itself).
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.distributed as dist

from ..train import make_step, run_keys, step_keys
from ..train.build import build_loss, build_optimizer
from .config import CifarConfig
from .recipes import augmenter, build_net

__all__ = ["measure"]


def measure(cfg: CifarConfig, steps: int, parallel=None, warmup: int = 2) -> dict:
    """Time ``steps`` training steps (after ``warmup``) of ``cfg``'s model on random images at
    its (global) batch size; returns images/s (global batch / median step time), the median
    step, the median time in ``reduce`` and that of the bucket's all_reduce alone, in seconds."""
    device = parallel.device if parallel is not None else torch.device("cpu")
    world, rank = (1, 0) if parallel is None else (parallel.world, parallel.rank)
    batch = cfg.batch_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch,), generator=g)
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    images, labels = images[rows].to(device), labels[rows].to(device)
    net = build_net(cfg)
    opt = build_optimizer(cfg, warmup + steps)
    params, state = net.init(run_keys(0).init)
    params = {k: v.to(device) for k, v in params.items()}
    state = {k: v.to(device) for k, v in state.items()}
    opt_state = opt.init(params)
    augment = augmenter(cfg)
    comm = []

    def timed_reduce(grads, metrics):
        t = time.perf_counter()
        out = parallel.reduce(grads, metrics)
        comm.append(time.perf_counter() - t)
        return out

    step = make_step(net, opt, build_loss(cfg), bf16=cfg.bf16,
                     channels_last=cfg.channels_last,
                     reduce=None if parallel is None else timed_reduce)
    times = []
    for i in range(warmup + steps):
        keys = step_keys(run_keys(0).train, 0, i)
        if parallel is not None:
            parallel.all_ok(True)   # start every step together: the timing is one rank's step
        t = time.perf_counter()
        with contextlib.nullcontext() if parallel is None else parallel.scope(batch):
            x = augment(keys.augment, images)
            params, state, opt_state, _ = step(params, state, opt_state, (x, labels), keys.dropout)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times[warmup:])
    out = {"world": world, "threads": torch.get_num_threads(), "batch": batch,
           "images_per_s": batch / step_s, "step_s": step_s,
           "bucket_mb": sum(p.numel() * p.element_size() for p in params.values()) / 2**20}
    if parallel is not None:
        reduce_s = statistics.median(comm[warmup:])
        bucket = torch.cat([p.reshape(-1) for p in params.values()])
        alone = []
        for _ in range(5):
            parallel.all_ok(True)
            t = time.perf_counter()
            dist.all_reduce(bucket)
            alone.append(time.perf_counter() - t)
        out.update(reduce_s=reduce_s, reduce_share=reduce_s / step_s,
                   all_reduce_alone_s=statistics.median(alone),
                   all_reduce_alone_share=statistics.median(alone) / step_s)
    return out
