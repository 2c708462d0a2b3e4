"""Ensembles against their peers: K members of the report's sweep trained at once, against what a
PyTorch user would otherwise write to train K models.

    python -m experiments.bench --skip steps,layers,pipeline --reps 9

For each net (the PyTorch tutorial net at the report's batch of 32, and Model A) and each K, one
process builds every variant below and times them interleaved in rounds (each round calls every
variant once, ``steps`` training steps each, starting at a rotating position), and reports the
median images/s per member (``K * batch * steps / seconds``):

* ``purenn``: ``experiments.train.make_step`` over ``ensemble_parts`` (``nets.ensemble`` +
  ``optim.vmapped`` with a tensor learning rate and momentum per member): what
  ``experiments.sweep`` runs each step;
* ``torch.nn loop``: K ``nn.Module`` + ``torch.optim.SGD`` (foreach) models, one step each in
  turn (``zero_grad``, forward, ``F.cross_entropy``, ``backward``, ``step``): the sweep a user
  writes as a for-loop;
* ``torch.func``: ``torch.func.stack_module_state`` + ``vmap(grad(functional_call))`` over the
  stacked parameters, and the momentum update written by hand in place on the stacked leaves
  with a ``(K, 1, ...)`` learning rate per member (functorch's model-ensembling tutorial, trained);
* ``torch.nn loop + compile`` and ``torch.func + compile``: the same with ``torch.compile`` of
  each module (the optimizer eager, as torch.nn users do) or of the whole vmapped step with its
  update. Their first call (the compilation) is reported apart and never timed.

The *fastest peer* is the fastest of the torch.nn / torch.func rows. The *physical limit* is the
step's FLOPs (``6 x`` the forward's multiply-adds, :func:`experiments.benchmarks.steps.step_flops`)
at the fp32 matmul rate measured inside the same rounds (one ``n x n`` matmul per round), so under
the same load: ``limit img/s per member = matmul FLOP/s / (6 x MACs per image)``.

Every variant uses SGD with momentum 0.9 and lr 0.01 (the sweep's update), fp32, the same fixed
batch shared by the members (``experiments.sweep`` without augmentation), and starts member k
from ``net.init(key(k))`` on every side.
"""
from __future__ import annotations

import copy
import resource
import sys
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F

import layers
import nets
import optim
from layers import random as jr

from ..train import ensemble_parts, make_step
from .reference import reference_module, tutorial_module
from .timing import interleaved, matmul, median, timed

__all__ = ["NETS", "VARIANTS", "PEERS", "tutorial_module", "peer_module", "make_variant",
           "bench_ensembles", "render_ensembles"]

NETS = {"tutorial": nets.tutorial_net, "a": nets.model_a}
LR, MOMENTUM = 0.01, 0.9

#: Every variant, in the order of the table; ``PEERS`` are the ones a user would write instead.
VARIANTS = ("purenn", "torch.nn loop", "torch.func", "torch.nn loop + compile", "torch.func + compile")
PEERS = VARIANTS[1:]


def _peak_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def peer_module(model: str, tree) -> torch.nn.Module:
    """The torch.nn twin of ``NETS[model]`` loaded with the pure net's ``{**params, **state}``."""
    module = reference_module(model)
    module.load_state_dict(OrderedDict(tree))
    return module.train()


def _batch(batch: int, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y


def _purenn(model, k, x, y, device):
    net = NETS[model]()
    make = lambda lr, momentum: optim.sgd(lr, momentum=momentum)   # noqa: E731
    net_k, opt_k, loss_k = ensemble_parts(net, make, {"lr": [LR] * k, "momentum": [MOMENTUM] * k},
                                          layers.cross_entropy, flat=True)   # as the sweep runs
    keys = torch.stack([jr.key(i) for i in range(k)])
    p, s = net_k.init(keys, device=device)
    box = [p, s, opt_k.init(p)]
    step = make_step(net_k, opt_k, loss_k)
    keys = keys.to(device)

    def run():
        box[0], box[1], box[2], m = step(box[0], box[1], box[2], (x, y), keys)
        return m["loss"]
    return run


def _modules(model, k, device):
    net = NETS[model]()
    out = []
    for i in range(k):
        p, s = net.init(jr.key(i))
        out.append(peer_module(model, {**p, **s}).to(device))
    return out


def _loop(model, k, x, y, device, compile: bool):
    modules = _modules(model, k, device)
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM) for m in modules]
    forwards = [torch.compile(m) for m in modules] if compile else modules

    def run():
        for fwd, opt in zip(forwards, opts):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()
        return loss.detach()
    return run


def _func(model, k, x, y, device, compile: bool):
    modules = _modules(model, k, device)
    params, buffers = torch.func.stack_module_state(modules)
    params = {n: t.detach() for n, t in params.items()}
    base = copy.deepcopy(modules[0]).to("meta")
    lr = torch.full((k,), LR, device=device)
    momentum = torch.full((k,), MOMENTUM, device=device)
    bufs = {n: torch.zeros_like(t) for n, t in params.items()}

    def loss_of(p, b, xx, yy):
        return F.cross_entropy(torch.func.functional_call(base, (p, b), (xx,)), yy)

    grads_of = torch.func.vmap(torch.func.grad_and_value(loss_of), in_dims=(0, 0, None, None))

    def step(params, buffers, bufs, x, y):
        grads, loss = grads_of(params, buffers, x, y)
        for n, p in params.items():   # torch.optim.SGD's update, one lr and momentum per member
            shape = (k,) + (1,) * (p.dim() - 1)
            bufs[n].mul_(momentum.view(shape)).add_(grads[n])
            p.sub_(bufs[n] * lr.view(shape))
        return loss

    step = torch.compile(step) if compile else step

    def run():
        return step(params, buffers, bufs, x, y)
    return run


def make_variant(variant: str, model: str, k: int, batch: int, device="cpu") -> Callable[[], torch.Tensor]:
    """A zero-argument function running one training step of K members of ``model`` as
    ``variant`` (module docstring) on a fixed batch; it returns the last loss (per member for
    the vmapped variants)."""
    if variant not in VARIANTS:
        raise ValueError(f"make_variant: expected a variant in {VARIANTS}, got {variant!r}")
    if model not in NETS:
        raise ValueError(f"make_variant: expected a model in {sorted(NETS)}, got {model!r}")
    device = torch.device(device)
    x, y = _batch(batch, device)
    if variant == "purenn":
        return _purenn(model, k, x, y, device)
    compile = variant.endswith("+ compile")
    if variant.startswith("torch.nn loop"):
        return _loop(model, k, x, y, device, compile)
    return _func(model, k, x, y, device, compile)


def bench_ensembles(models=("tutorial", "a"), ks=(1, 2, 4, 8, 16), batch: int = 32, rounds: int = 5,
                    device="cpu", steps: int = 3, variants=VARIANTS, matmul_n: int = 1024,
                    stream=None) -> list[dict]:
    """One row per (model, K): ``img_s`` and ``compile_s`` per variant (images/s per member), the
    fastest peer, ``ratio`` (purenn / fastest peer), the in-round fp32 matmul rate and the
    physical limit (module docstring), and the process's peak resident MiB after that K."""
    from .steps import step_flops

    stream = sys.stderr if stream is None else stream
    device = torch.device(device)
    rows = []
    for model in models:
        macs_per_image = step_flops(NETS[model](), 1) / 6
        for k in ks:
            torch._dynamo.reset()
            fns, compile_s = {}, {}
            for variant in variants:
                run = make_variant(variant, model, k, batch, device)
                first = timed(run, device)
                if variant.endswith("+ compile"):
                    compile_s[variant] = first
                run()
                fns[variant] = (lambda r: lambda: [r() for _ in range(steps)][-1])(run)
            fns["matmul"] = matmul(torch.float32, device, matmul_n)
            times = interleaved(fns, rounds, device)
            img_s = {v: steps * k * batch / median(times[v]) for v in variants}
            rate = 2.0 * matmul_n ** 3 / median(times["matmul"])
            peers = {v: img_s[v] for v in variants if v in PEERS}
            peer = max(peers, key=peers.get) if peers else None
            row = {"model": model, "k": k, "img_s": img_s,
                   "compile_s": {v: max(0.0, compile_s[v] - median(times[v]) / steps) for v in compile_s},
                   "fastest_peer": peer, "matmul_tflops": rate / 1e12,
                   "limit_img_s": rate / (6 * macs_per_image),
                   "ratio": img_s["purenn"] / peers[peer] if peer and "purenn" in img_s else None,
                   "peak_mib": _peak_mib()}
            rows.append(row)
            print(f"  ensemble {model} K={k:2d}: " + ", ".join(f"{v} {s:.0f}" for v, s in img_s.items())
                  + f" img/s per member; limit {row['limit_img_s']:.0f}"
                  + (f"; purenn / {peer} x{row['ratio']:.2f}" if row["ratio"] else ""), file=stream)
            del fns
    torch._dynamo.reset()
    return rows


def render_ensembles(rows: list[dict], batch: int, rounds: int) -> list[str]:
    """The docs/performance.md section of :func:`bench_ensembles`."""
    variants = [v for v in VARIANTS if rows and v in rows[0]["img_s"]]
    lines = ["## Ensembles: K members at once against the torch.nn and torch.func peers", "",
             f"Batch {batch}, SGD with momentum 0.9 and lr 0.01, fp32, one input batch shared by "
             "the members; images/s per member (K x batch / time), median of "
             f"{rounds} interleaved rounds; ratio = purenn / the fastest peer; limit = the step's "
             "FLOPs at the fp32 matmul rate measured in the same rounds; (n s) = the first call's "
             "compilation, not timed (0 where inductor's cache already held the graph).", "",
             "| net | K | " + " | ".join(variants) + " | fastest peer | ratio | purenn / torch.nn loop "
             "| limit | % of limit | peak MiB |",
             "| --- | ---: | " + " | ".join("---:" for _ in variants) + " | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cells = []
        for v in variants:
            cell = f"{r['img_s'][v]:.0f}"
            if v in r["compile_s"]:
                cell += f" ({r['compile_s'][v]:.0f} s)"
            cells.append(cell)
        best = max(r["img_s"].values())
        loop = (f"{r['img_s']['purenn'] / r['img_s']['torch.nn loop']:.2f}"
                if {"purenn", "torch.nn loop"} <= set(r["img_s"]) else "-")
        lines.append(f"| {r['model']} | {r['k']} | " + " | ".join(cells) + f" | {r['fastest_peer'] or '-'} | "
                     + (f"{r['ratio']:.2f}" if r["ratio"] else "-") + f" | {loop}"
                     + f" | {r['limit_img_s']:.0f} | {100 * best / r['limit_img_s']:.0f}% | {r['peak_mib']:.0f} |")
    return lines + [""]
