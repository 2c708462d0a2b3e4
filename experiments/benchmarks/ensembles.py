"""Ensembles against sequential training: K members in one vmapped step (``optim.vmapped``,
``nets.ensemble``) against K pure steps one after the other, at the report's batch of 32.

Both sides run the same members (same nets, SGD with momentum, same batches); the vmapped side
shares one input batch across members (what ``experiments.sweep`` does without augmentation).
Each K is timed interleaved in rounds; images/s are per member (``K * batch / time``), so the
ratio is the speed-up of training K members together. Peak memory is the process's peak
resident size after each K (``ru_maxrss``), K ascending: memory grows with K, so each reading is
that K's peak, bounded below by every smaller K's.
"""
from __future__ import annotations

import resource
import sys

import torch

import layers
import nets
import optim
from layers import random as jr

from ..train import ensemble_parts, make_step
from .timing import interleaved, median

__all__ = ["NETS", "bench_ensembles"]

NETS = {"tutorial": nets.tutorial_net, "a": nets.model_a}


def _peak_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def _runners(model: str, k: int, batch: int, device):
    """Zero-argument functions running one vmapped step of K members and K sequential steps."""
    net = NETS[model]()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    make = lambda lr, momentum: optim.sgd(lr, momentum=momentum)   # noqa: E731
    net_k, opt_k, loss_k = ensemble_parts(net, make, {"lr": [0.01] * k, "momentum": [0.9] * k},
                                          layers.cross_entropy)
    keys = torch.stack([jr.key(i) for i in range(k)])
    p, s = net_k.init(keys, device=device)
    box = [p, s, opt_k.init(p)]
    step_k = make_step(net_k, opt_k, loss_k)

    def vmapped():
        box[0], box[1], box[2], m = step_k(box[0], box[1], box[2], (x, y), keys.to(device))
        return m["loss"]

    opt_1 = optim.sgd(0.01, momentum=0.9)
    step_1 = make_step(net, opt_1, layers.cross_entropy)
    singles = []
    for i in range(k):
        p1, s1 = net.init(jr.key(i), device=device)
        singles.append([p1, s1, opt_1.init(p1)])

    def sequential():
        for i, m_state in enumerate(singles):
            m_state[0], m_state[1], m_state[2], m = step_1(*m_state, (x, y), jr.key(i).to(device))
        return m["loss"]
    return vmapped, sequential


def bench_ensembles(models=("tutorial", "a"), ks=(1, 2, 4, 8, 16), batch: int = 32, rounds: int = 5,
                    device="cpu", steps: int = 3) -> list[dict]:
    """Rows ``{model, k, vmapped_img_s, sequential_img_s, ratio, peak_mib}`` (images/s per member)."""
    rows = []
    for model in models:
        for k in ks:
            vmapped, sequential = _runners(model, k, batch, device)
            for fn in (vmapped, sequential):   # warm-up
                fn()
            times = interleaved({"vmapped": lambda: [vmapped() for _ in range(steps)][-1],
                                 "sequential": lambda: [sequential() for _ in range(steps)][-1]},
                                rounds, device)
            v, s = median(times["vmapped"]), median(times["sequential"])
            rows.append({"model": model, "k": k, "vmapped_img_s": steps * k * batch / v,
                         "sequential_img_s": steps * k * batch / s, "ratio": s / v,
                         "peak_mib": _peak_mib()})
            print(f"  ensemble {model} K={k:2d}: vmapped {rows[-1]['vmapped_img_s']:8.0f} img/s, "
                  f"sequential {rows[-1]['sequential_img_s']:8.0f} img/s, x{rows[-1]['ratio']:.2f}",
                  file=sys.stderr)
    return rows


def render_ensembles(rows: list[dict], batch: int, rounds: int) -> list[str]:
    """The docs/performance.md section of :func:`bench_ensembles`."""
    lines = ["## Ensembles: K members in one vmapped step against K sequential steps", "",
             f"Batch {batch} (the report's), SGD with momentum, fp32, one input batch shared by the "
             f"members; images/s per member (K x batch / time), median of {rounds} interleaved "
             "rounds; ratio = vmapped / sequential speed; peak resident memory of the process "
             "after each K (K ascending).", "",
             "| net | K | vmapped img/s | sequential img/s | ratio | peak MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['k']} | {r['vmapped_img_s']:.0f} | {r['sequential_img_s']:.0f} | "
              f"{r['ratio']:.2f} | {r['peak_mib']:.0f} |" for r in rows]
    return lines + [""]
