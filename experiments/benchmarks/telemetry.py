"""What telemetry costs: one telemetry pass (:func:`experiments.train.telemetry.layer_stats`:
a probed forward and backward through ``nets.capture``) against one training step of the
recipe's configuration, interleaved in one process. The overhead of ``--telemetry N`` is
``pass / (N * step)`` of the training time."""
from __future__ import annotations

import sys

import torch

import layers
import optim
from layers import random as jr

from ..train import make_step, to_channels_last
from ..train.registry import build_net
from ..train.telemetry import DEFAULT_EVERY, layer_stats
from .timing import interleaved, median

__all__ = ["telemetry_overhead"]


def telemetry_overhead(model: str = "cifar_model_b", batch: int = 512, rounds: int = 5,
                       device="cpu", bf16: bool = True, channels_last: bool = True) -> dict:
    """``{step_s, pass_s, overhead_at_default}`` (seconds, median of interleaved rounds)."""
    net = build_net(model, 10, {"dropout": 0.1, "head_dropout": 0.2})
    params, state = net.init(jr.key(0), device=device)
    opt = optim.sgd(0.1, momentum=0.9, nesterov=True)
    opt_state = opt.init(params)
    if channels_last:
        params, opt_state = to_channels_last(params), to_channels_last(opt_state)
    step = make_step(net, opt, layers.cross_entropy, bf16=bf16, channels_last=channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    key = jr.key(1).to(device)
    fns = {"step": lambda: step(params, state, opt_state, (x, y), key)[3]["loss"].item(),
           "telemetry pass": lambda: layer_stats(net, params, state, x, y, layers.cross_entropy, key)}
    for fn in fns.values():
        fn()
    times = interleaved(fns, rounds, device)
    step_s, pass_s = median(times["step"]), median(times["telemetry pass"])
    out = {"model": model, "batch": batch, "step_s": step_s, "pass_s": pass_s,
           "overhead_at_default": pass_s / (DEFAULT_EVERY * step_s)}
    print(f"telemetry: step {step_s:.3f} s, pass {pass_s:.3f} s, overhead at every "
          f"{DEFAULT_EVERY} steps {100 * out['overhead_at_default']:.1f}%", file=sys.stderr)
    return out
