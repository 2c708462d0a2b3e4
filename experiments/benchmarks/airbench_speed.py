"""Which recipe trains fastest per image: the speedrun's pure step of several configs (or batch
sizes), timed interleaved (docs/speedrun.md, "A CPU recipe").

    from experiments.airbench import CPU_RECIPE, RECIPE
    from experiments.benchmarks.airbench_speed import time_batch_sizes, time_configs
    print(time_configs({"airbench94": RECIPE, "cpu": CPU_RECIPE}, rounds=5))
    print(time_batch_sizes(RECIPE, (256, 512, 1024), rounds=5))

Each round runs, for every config in turn, the steps that take ``images`` images through the
step (``images // B`` steps of batch ``B``, with the lookahead; no augmentation), so a load that
comes and goes on a shared machine falls on every config alike
(:func:`experiments.benchmarks.timing.interleaved`).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from layers import random as jr

from ..airbench.config import SpeedrunConfig
from ..airbench.run import parts
from ..data.dataset import Dataset
from ..train import make_step, to_channels_last
from ..train.build import build_loss
from .timing import interleaved, median

__all__ = ["time_configs", "time_batch_sizes"]


def _steps(cfg: SpeedrunConfig, n: int, rounds: int, seed: int):
    """``run()``: ``n`` pure steps of ``cfg`` (its batch size, widths, bf16, channels-last,
    lookahead) on one random batch, after one untimed warm-up step."""
    b = cfg.batch_size
    g = torch.Generator().manual_seed(seed)
    train = Dataset(torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (b,), generator=g), tuple(range(10)))
    # the schedule and the lookahead span every step timed (and the warm-up)
    net, opt, hooks = parts(cfg, train, math.ceil((n * (rounds + 1)) / cfg.epochs) + 1)
    x, y = torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)
    params, state = net.init(jr.key(seed))
    opt_state = opt.init(params)
    if cfg.channels_last:
        params, opt_state = to_channels_last(params), to_channels_last(opt_state)
    step = make_step(net, opt, build_loss(cfg), bf16=cfg.bf16, channels_last=cfg.channels_last)
    if hooks.wrap_step is not None:
        step = hooks.wrap_step(step)
    trees, key = [(params, state, opt_state)], jr.key(seed + 1)

    def run():
        for _ in range(n):
            trees[0] = step(*trees[0], (x, y), key)[:3]
    run()
    return run


def time_configs(configs: Mapping, rounds: int = 5, *, images: int = 1024, seed: int = 0) -> dict:
    """``{name: {"median": s, "min": s, "all": [s, ...]}}``: seconds per ``images`` training
    images of each config's pure step (``images // batch_size`` steps), ``rounds`` interleaved
    rounds. Every batch size must divide ``images``."""
    fns = {}
    for name, cfg in configs.items():
        if images % cfg.batch_size:
            raise ValueError(f"time_configs: expected batch sizes that divide images={images}, "
                             f"got {cfg.batch_size}")
        fns[name] = _steps(cfg, images // cfg.batch_size, rounds, seed)
    times = interleaved(fns, rounds, "cpu")
    return {name: {"median": median(t), "min": min(t), "all": t} for name, t in times.items()}


def time_batch_sizes(cfg: SpeedrunConfig, batch_sizes, rounds: int = 5, *, images: int = 1024,
                     seed: int = 0) -> dict:
    """:func:`time_configs` of ``cfg`` at each batch size: ``{B: {"median", "min", "all"}}``."""
    return time_configs({b: cfg.replace(batch_size=b) for b in batch_sizes}, rounds,
                        images=images, seed=seed)
