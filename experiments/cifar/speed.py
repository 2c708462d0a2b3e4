"""Images/s of a CIFAR recipe's full training step under each speed option (``--benchmark``).

fp32, channels_last, bf16 and bf16 + channels_last, interleaved in rounds on random images at
the recipe's batch size; the median over rounds is reported (docs/performance.md).
"""
from __future__ import annotations

import sys
import time

import torch

from layers import random as jr

from ..train import make_step, resolve_device, to_channels_last
from .config import CifarConfig
from .recipes import augmenter, build_net
from ..train.build import build_loss, build_optimizer

__all__ = ["benchmark"]


def benchmark(cfg: CifarConfig, steps: int, rounds: int = 3, stream=None) -> dict[str, float]:
    """Images/s of the full training step (augmentation included) for each speed option.

    ``steps`` timed steps per option and round (after one untimed warm-up step), options
    interleaved within each round so that a noisy, shared machine slows them alike; the
    median over rounds is reported.
    """
    stream = sys.stderr if stream is None else stream
    device = resolve_device(cfg.device)
    bs = cfg.batch_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (bs, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (bs,), generator=g).to(device)
    net = build_net(cfg)
    augment = augmenter(cfg)
    modes = {"fp32": {}, "channels_last": {"channels_last": True}, "bf16": {"bf16": True},
             "bf16+channels_last": {"bf16": True, "channels_last": True}}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode, opts in modes.items():
            params, state = net.init(jr.key(0), device=device)
            opt = build_optimizer(cfg, steps + 1)
            opt_state = opt.init(params)
            if opts.get("channels_last"):
                params, opt_state = to_channels_last(params), to_channels_last(opt_state)
            step = make_step(net, opt, build_loss(cfg), **opts)
            for i in range(steps + 1):
                if i == 1:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                x = augment(jr.key(i), images)
                params, state, opt_state, m = step(params, state, opt_state, (x, labels), jr.key(i))
                m["loss"].item()
            rates[mode].append(steps * bs / (time.perf_counter() - t0))
            print(f"round {r + 1}/{rounds} {mode:>18}: {rates[mode][-1]:7.1f} img/s", file=stream)
    result = {m: sorted(v)[len(v) // 2] for m, v in rates.items()}
    print(f"median img/s over {rounds} rounds of {steps} steps, batch {bs}, {device}, "
          f"{torch.get_num_threads()} threads:", file=stream)
    for m, v in result.items():
        print(f"  {m:>18}: {v:7.1f} img/s ({v / result['fp32']:.2f}x fp32)", file=stream)
    return result


