"""Speed, measured side by side: the pure training step against the torch.nn + torch.optim loop.

    python -m experiments.bench [--quick] [--models a,b,c] [--reps N] [--device auto|cpu|cuda]
                                [--allocator retain|default] [--write [--out docs/performance.md]]

In one process, for each of Models A, B and C at batch 128 on 32x32 inputs, it times a training
step (forward, cross-entropy with label smoothing 0.1, backward, SGD with Nesterov momentum 0.9
and weight decay 5e-4) in each configuration of :data:`CONFIGS`:

1. the plain torch.nn + torch.optim loop (:mod:`experiments.benchmarks.reference`), and the
   same loop with the pure step's tricks: (1b) channels_last + bf16 autocast, (1c) and
   torch.compile; the fastest of them is "the best torch.nn peer";
2. our pure step, ``make_step`` with ``optim.sgd``, eager float32;
3. - 5. the same with channels_last, bf16 autocast, torch.compile alone;
6. their combinations (channels_last + bf16, and + compile); the fastest is "the best".

Method: each configuration is built and warmed up first (the first call of a compiled step is
reported separately as its compile time, never timed), then the configurations run interleaved,
one step each per round, for ``--reps`` rounds; each reports the median images/s, its ratio to
(1), and its achieved FLOP/s as a fraction of the measured matmul peak of its dtype.

FLOP rule: a training step costs 3x the forward pass (forward, grad wrt activations, grad wrt
weights) and a multiply-add is 2 FLOPs, so ``step FLOPs = 6 * nets.summary(...).total_macs``
(batch included). Batch norm, ReLU, pooling and the optimizer are not counted.

It also measures each layer's forward + backward time (explicit against fast formulation,
:mod:`experiments.benchmarks.layers`) and the data pipeline's throughput against a torchvision
DataLoader (:mod:`experiments.benchmarks.pipeline`), then prints everything as the text of
docs/performance.md, and with ``--write`` writes it there.

Allocator: by default the process first calls :func:`experiments.train.device.retain_freed_memory`,
as the CIFAR experiments do, so that no configuration page-faults its tensors in every step;
``--allocator default`` keeps glibc's policy (the pure step, which allocates fresh parameters and
optimizer state every step, loses the most there).
"""
from __future__ import annotations

import datetime
import sys
import gc
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch

import layers
import nets
import optim
from layers import random as jr

from ..train import make_step, to_channels_last
from ..train.registry import build_net
from .reference import ReferenceLoop, reference_module
from .timing import interleaved, matmul, median, timed

__all__ = ["Config", "CONFIGS", "BENCHED_NETS", "benched_net", "LR", "MOMENTUM", "WEIGHT_DECAY", "LABEL_SMOOTHING",
           "step_flops", "make_runner", "bench_steps", "best_config", "best_peer", "targets", "render"]

LR, MOMENTUM, WEIGHT_DECAY, LABEL_SMOOTHING = 0.01, 0.9, 5e-4, 0.1

#: The nets whose step is timed, by the letter ``--models`` names them: ``letter -> (the model
#: registry's name, the dropout rates of its recipes)`` (A has no dropout).
BENCHED_NETS: dict[str, tuple[str, dict]] = {
    "a": ("cifar_model_a", {}),
    "b": ("cifar_model_b", {"dropout": 0.1, "head_dropout": 0.2}),
    "c": ("cifar_model_c", {"dropout": 0.1, "head_dropout": 0.2}),
    "tutorial": ("tutorial", {}),   # the report's sweeps' net (no dropout); --models tutorial
}


def benched_net(model: str) -> nets.Net:
    """The net of ``BENCHED_NETS[model]`` for CIFAR-10's 10 classes (the model registry's)."""
    if model not in BENCHED_NETS:
        raise ValueError(f"benched_net: expected model in {sorted(BENCHED_NETS)}, got {model!r}")
    name, options = BENCHED_NETS[model]
    return build_net(name, 10, options)


@dataclass(frozen=True)
class Config:
    """One way of running the training step. ``reference`` is the torch.nn + torch.optim loop."""

    label: str
    reference: bool = False
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False
    donate: bool = True   # the functional step as fit runs it: params and optimizer state donated

    @property
    def dtype(self) -> str:
        """The dtype of the step's matmuls: ``"bf16"`` under autocast, else ``"fp32"``."""
        return "bf16" if self.bf16 else "fp32"

    @property
    def options(self) -> dict:
        """The speed options as ``make_step`` keywords (the reference takes the first three)."""
        options = {"channels_last": self.channels_last, "bf16": self.bf16, "compile": self.compile}
        return options if self.reference else {**options, "donate": self.donate}


CONFIGS: tuple[Config, ...] = (
    Config("(1) torch.nn + torch.optim", reference=True),
    Config("(1b) torch.nn + channels_last + bf16", reference=True, channels_last=True, bf16=True),
    Config("(1c) torch.nn + channels_last + bf16 + compile", reference=True, channels_last=True,
           bf16=True, compile=True),
    Config("(2) functional, eager fp32"),
    Config("(3) functional + channels_last", channels_last=True),
    Config("(4) functional + bf16 autocast", bf16=True),
    Config("(5) functional + torch.compile", compile=True),
    Config("(6a) channels_last + bf16", channels_last=True, bf16=True),
    Config("(6b) channels_last + bf16 + compile", channels_last=True, bf16=True, compile=True),
    Config("(6c) channels_last + bf16, pure update (not donated)", channels_last=True, bf16=True,
           donate=False),
)


def step_flops(net, batch: int, side: int = 32) -> int:
    """FLOPs of one training step: ``6 * multiply-adds`` of the forward pass on ``batch`` images
    (3 passes - forward, input grads, weight grads - times 2 FLOPs per multiply-add)."""
    return 6 * nets.summary(net, (batch, 3, side, side), show=False).total_macs


def _batch(batch: int, device: torch.device, side: int = 32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, side, side, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y


def make_runner(config: Config, model: str, batch: int, device: torch.device | str,
                side: int = 32) -> Callable[[], torch.Tensor]:
    """A zero-argument function running one training step of ``model`` in ``config``.

    Every call advances its own trajectory (new parameters, state and optimizer state), as a
    training loop does; it returns the step's loss. Both sides start from the same parameters
    (``net.init(key(0))``) and see the same fixed batch.
    """
    if model not in BENCHED_NETS:
        raise ValueError(f"make_runner: expected model in {sorted(BENCHED_NETS)}, got {model!r}")
    device = torch.device(device)
    net = benched_net(model)
    kwargs = BENCHED_NETS[model][1]
    params, state = net.init(jr.key(0), device=device)
    x, y = _batch(batch, device, side)
    if config.reference:
        loop = ReferenceLoop(reference_module(model, **kwargs), {**params, **state}, lr=LR,
                             momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                             label_smoothing=LABEL_SMOOTHING, device=device, **config.options)
        return lambda: loop.step(x, y)

    opt = optim.sgd(LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    opt_state = opt.init(params)
    if config.channels_last:
        params, opt_state = to_channels_last(params), to_channels_last(opt_state)
    step = make_step(net, opt, partial(layers.cross_entropy, label_smoothing=LABEL_SMOOTHING),
                            **config.options)
    key = jr.key(1, device=device)
    trees = [params, state, opt_state]

    def run():
        trees[0], trees[1], trees[2], metrics = step(*trees, (x, y), key)
        return metrics["loss"]

    return run


def bench_steps(model: str, batch: int, rounds: int, device: torch.device | str,
                configs: Sequence[Config] = CONFIGS, matmul_n: int = 2048, warmup: int = 2,
                stream=None) -> tuple[list[dict], dict[str, float]]:
    """Median images/s of one training step of ``model`` in every config, interleaved.

    Each round also runs one ``matmul_n``-square matmul per dtype, so the peak each step is
    compared with was measured under the same background load.

    Returns ``(rows, peaks)``: one row per config with ``label``, ``dtype``, ``img_s``, ``ratio``
    (to the first config, the reference), ``tflops`` (achieved), ``peak_fraction`` (of the
    in-round matmul rate of its dtype), ``compile_s`` (first call minus a warm step; compiled
    configs only, else None); ``peaks`` maps ``"fp32"``/``"bf16"`` to the median in-round
    matmul FLOP/s.
    """
    stream = sys.stderr if stream is None else stream
    device = torch.device(device)
    torch._dynamo.reset()
    flops = step_flops(benched_net(model), batch)
    fns, first_call = {}, {}
    for config in configs:
        run = make_runner(config, model, batch, device)
        first_call[config.label] = timed(run, device)
        for _ in range(warmup - 1):
            run()
        fns[config.label] = run
        print(f"  model {model.upper()}: built {config.label} (first call "
              f"{first_call[config.label]:.1f} s)", file=stream)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for name, dtype in dtypes.items():
        fns[f"matmul {name}"] = matmul(dtype, device, matmul_n)
    times = interleaved(fns, rounds, device)
    peaks = {name: 2.0 * matmul_n ** 3 / median(times[f"matmul {name}"]) for name in dtypes}
    rows = []
    for config in configs:
        t = median(times[config.label])
        achieved = flops / t
        rows.append({"label": config.label, "reference": config.reference, "dtype": config.dtype,
                     "img_s": batch / t,
                     "tflops": achieved / 1e12, "peak_fraction": achieved / peaks[config.dtype],
                     "compile_s": first_call[config.label] - t if config.compile else None})
    peer = best_peer(rows)["img_s"] if any(r["reference"] for r in rows) else None
    for row in rows:
        row["ratio"] = row["img_s"] / rows[0]["img_s"]
        row["peer_ratio"] = row["img_s"] / peer if peer else None
    del fns
    torch._dynamo.reset()
    gc.collect()
    return rows, peaks


def best_config(rows: list[dict]) -> dict:
    """The fastest row of the pure step."""
    return max((r for r in rows if not r["reference"]), key=lambda r: r["img_s"])


def best_peer(rows: list[dict]) -> dict:
    """The fastest torch.nn + torch.optim row (the strongest peer)."""
    return max((r for r in rows if r["reference"]), key=lambda r: r["img_s"])


def targets(steps: dict[str, list[dict]], pipeline: dict[str, float]) -> list[tuple[str, str, bool]]:
    """The issue's targets as ``(what, measured, met)`` rows."""
    out = []
    for model, rows in steps.items():
        eager = next(r for r in rows if r["label"].startswith("(2)"))
        out.append((f"Model {model.upper()}: (2)/(1) >= 0.97", f"{eager['ratio']:.3f}",
                    eager["ratio"] >= 0.97))
    if "b" in steps:
        best = best_config(steps["b"])
        out.append(("Model B: best configuration >= 1.5x (1)", f"{best['ratio']:.2f}x ({best['label']})",
                    best["ratio"] >= 1.5))
    for model, rows in steps.items():
        best, peer = best_config(rows), best_peer(rows)
        out.append((f"Model {model.upper()}: best configuration >= 1.00x the best torch.nn peer",
                    f"{best['img_s'] / peer['img_s']:.3f} ({best['label']} against {peer['label']})",
                    best["img_s"] >= peer["img_s"]))
    for model, rows in steps.items():
        best = best_config(rows)
        out.append((f"Model {model.upper()}: best configuration >= 60% of its dtype's peak",
                    f"{100 * best['peak_fraction']:.0f}% ({best['label']}, {best['dtype']})",
                    best["peak_fraction"] >= 0.6))
    if pipeline and steps:
        fastest = max(best_config(rows)["img_s"] for rows in steps.values())
        ours = pipeline["ours (whole-batch tensors)"]
        out.append(("data pipeline >= 20x the fastest training step",
                    f"{ours / fastest:.0f}x ({ours:,.0f} vs {fastest:,.0f} img/s)", ours >= 20 * fastest))
    return out


def render(*, command: str, info: dict, peaks: dict, step_peaks: dict, steps: dict, layer_rows: list, pipeline: dict,
           batch: int, rounds: int, seconds: float, retained: bool = False) -> str:
    """docs/performance.md: tables, targets, machine, command."""
    lines = ["# Performance", "",
             "Measured by `experiments/bench.py`; every number below comes from this command, run "
             "once, in one process:", "", "```", command, "```", "",
             f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), "
             f"device {info['device']}, ISA {info['isa']}, torch {info['torch']}, python "
             f"{info['python']}. Run {datetime.date.today().isoformat()}, "
             f"{seconds / 60:.1f} min in all.", "",
             "Method: each configuration is built and warmed up first (a compiled step's first "
             "call is its compile time, reported apart and never timed); then the configurations "
             f"run interleaved, one step each per round, for {rounds} rounds, and each reports its "
             "median. Background load on shared cores hits all configurations alike, so the "
             "*ratios* are the robust numbers; absolute images/s move with the load.", "",
             "Allocator: " + ("freed memory retained in the process, as the experiments run "
                              "(`experiments/train/device.py`: glibc serves every block from the "
                              "heap and never trims it, so no step page-faults its memory in)."
                              if retained else
                              "the C library's default policy (glibc `mmap`s each block above its "
                              "threshold and unmaps it on free: every step page-faults its large "
                              "tensors in again)."), "",
             "## Matmul peak", "",
             "Square matmuls (2 n^3 FLOPs each): the best of several at the start of the run, and "
             "the median of the ones run inside each model's interleaved rounds (the same load as "
             "its training steps; the % of peak below is against this one).", "",
             "| dtype | best, TFLOP/s | " + " | ".join(f"in Model {m.upper()}'s rounds" for m in step_peaks)
             + " |", "| --- | ---: |" + " ---: |" * len(step_peaks)]
    lines += [f"| {k} | {v / 1e12:.3f} | " + " | ".join(f"{p[k] / 1e12:.3f}" for p in step_peaks.values())
              + " |" for k, v in peaks.items()]
    lines += ["", "## Training step", "",
              f"Batch {batch} of 32x32 images, SGD (Nesterov momentum {MOMENTUM}, weight decay "
              f"{WEIGHT_DECAY}, lr {LR}), cross-entropy with label smoothing {LABEL_SMOOTHING}, "
              "dropout as in the recipes. FLOP rule: step FLOPs = 3 x forward = "
              "6 x `nets.summary(net, (batch, 3, 32, 32)).total_macs` (2 FLOPs per multiply-add; "
              "batch norm, pooling and the optimizer not counted). % of peak is against the "
              "in-round matmul rate of the configuration's matmul dtype.", ""]
    for model, rows in steps.items():
        best = best_config(rows)
        lines += [f"### Model {model.upper()}", "",
                  "| configuration | img/s | ratio to (1) | ratio to best torch.nn | achieved TFLOP/s | "
                  "% of dtype peak | compile s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        peer = best_peer(rows)
        for r in rows:
            mark = " **(6) best**" if r is best else " **best torch.nn**" if r is peer else ""
            comp = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
            lines.append(f"| {r['label']}{mark} | {r['img_s']:.1f} | {r['ratio']:.3f} | "
                         f"{r['peer_ratio']:.3f} | {r['tflops']:.3f} | "
                         f"{100 * r['peak_fraction']:.0f}% ({r['dtype']}) | {comp} |")
        lines.append("")
    if steps:
        lines += ["## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {what} | {measured} | {'yes' if ok else 'no'} |"
                  for what, measured, ok in targets(steps, pipeline)]
        lines.append("")
    if layer_rows:
        lines += ["## Layers: forward + backward, explicit against fast", "",
                  "One call plus `torch.autograd.grad` of its output with a random cotangent, "
                  "fp32, median over interleaved rounds.", "",
                  "| layer | input | explicit ms | fast ms | explicit / fast |",
                  "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['name']} | {r['shape']} | {r['explicit_ms']:.2f} | {r['fast_ms']:.2f} | "
                  f"{r['ratio']:.2f} |" for r in layer_rows]
        lines.append("")
    if pipeline:
        lines += ["## Data pipeline", "",
                  "One epoch of random crop (padding 4) + horizontal flip + normalise, batch "
                  f"{batch}, images/s (median over interleaved epochs):", "",
                  "| pipeline | img/s |", "| --- | ---: |"]
        lines += [f"| {k} | {v:,.0f} |" for k, v in pipeline.items()]
        lines.append("")
    return "\n".join(lines)


NOTES_MARKER = "<!-- notes below this line are kept when experiments.bench rewrites the file -->"


def kept_notes(path: Path) -> str:
    """The hand-written part of an existing report: the marker line and all after it ("" if none)."""
    if not path.is_file():
        return ""
    text = path.read_text()
    i = text.find(NOTES_MARKER)
    return "\n" + text[i:] if i >= 0 else ""
