"""Per-layer telemetry while a net trains: what its layers do, every N steps, in one JSON line.

At a telemetry step the trainer takes the step's own batch, dropout key and parameters and runs
one more forward and backward through :func:`nets.capture` with zero probes on every layer
(:mod:`nets.capture`), which gives in one pass, per layer:

    act_mean, act_std      the layer's output over the batch
    zero_frac              the fraction of exact zeros (after a ReLU: dead units)
    grad_act_norm          ||d loss / d output||
    grad_w_norm            ||d loss / d weight||                     (conv, linear, batch norm)

and, comparing what the step changed:

    update_ratio           ||w_new - w|| / ||w||                      (the step's relative update)
    bn_drift               ||mu_new - mu_old|| / (||mu_old|| + eps)  of the running mean since the
                           previous telemetry step, and the same of the running variance

Telemetry is an observer: the step itself is unchanged (the extra pass is computed apart, in
float32 without autocast), so a run with telemetry trains the same parameters as one without.
Rows go to ``runs/<name>/telemetry.jsonl``, written with the history after every epoch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch

import nets

from ..common.files import read_jsonl, write_jsonl

__all__ = ["TELEMETRY", "OPS", "DEFAULT_EVERY", "Telemetry", "watched", "layer_stats",
           "update_stats", "read_telemetry", "write_telemetry"]

TELEMETRY = "telemetry.jsonl"
#: The layer kinds telemetry watches.
OPS = ("Conv2d", "Linear", "BatchNorm2d", "ReLU")
#: ``--telemetry`` without a value: every 50 steps (overhead measured in docs/training.md).
DEFAULT_EVERY = 50


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach().float()))


def watched(net) -> list[str]:
    """The leaf layers telemetry reports, in apply order."""
    return [n for n in nets.leaf_names(net) if nets.child(net, n).op in OPS]


def layer_stats(net, params: Mapping, state: Mapping, x: torch.Tensor, y: torch.Tensor,
                loss_fn: Callable, key) -> dict:
    """``{layer: {act_mean, act_std, zero_frac, grad_act_norm, grad_w_norm}}`` on one batch."""
    names = watched(net)
    x = x.float()
    params = {k: v.float() for k, v in params.items()}
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def loss_of(p, probes):
        out = nets.capture(net, p, state, x, names=names, train=True, key=key, probes=probes)
        return loss_fn(out.logits, y), out.activations

    with torch.autocast(device_type=x.device.type, enabled=False):
        shapes = nets.capture(net, params, state, x, names=names, train=True, key=key).activations
        probes = {n: torch.zeros_like(a) for n, a in shapes.items()}
        (g_params, g_acts), acts = torch.func.grad(loss_of, argnums=(0, 1), has_aux=True)(params, probes)
    rows = {}
    for n in names:
        a = acts[n].detach()
        row = {"act_mean": float(a.mean()), "act_std": float(a.std()),
               "zero_frac": float((a == 0).float().mean()), "grad_act_norm": _norm(g_acts[n])}
        if f"{n}.weight" in g_params:
            row["grad_w_norm"] = _norm(g_params[f"{n}.weight"])
        rows[n] = row
    return rows


def update_stats(rows: dict, before: Mapping, after: Mapping, state_then: Mapping | None,
                 state_now: Mapping) -> dict:
    """Add ``update_ratio`` (per weight) and ``bn_drift`` (per batch norm) to ``rows``."""
    for n, row in rows.items():
        w = f"{n}.weight"
        if w in before:
            row["update_ratio"] = _norm(after[w].float() - before[w].float()) / max(_norm(before[w]), 1e-12)
        if state_then is not None and f"{n}.running_mean" in state_now:
            for stat in ("running_mean", "running_var"):
                old, new = state_then[f"{n}.{stat}"].float(), state_now[f"{n}.{stat}"].float()
                row[f"bn_drift_{stat[8:]}"] = _norm(new - old) / (_norm(old) + 1e-12)
    return rows


def read_telemetry(path: Path, upto_epoch: int, upto_step: int) -> list[dict]:
    """The rows of ``telemetry.jsonl`` before (epoch, step) = the checkpoint's progress."""
    if not path.is_file():
        return []
    return [r for r in read_jsonl(path) if (r["epoch"], r["step"]) < (upto_epoch, upto_step)]


def write_telemetry(path: Path, rows: list[dict]) -> None:
    """All rows as strict JSON lines (atomically, as the history)."""
    write_jsonl(path, rows)


class Telemetry:
    """The observer :func:`~experiments.train.loop.fit` calls around a watched step: statistics
    of the step's batch before it, update ratios and running-statistics drift after it; the rows
    are written beside the run's history (``run.dir / TELEMETRY``)."""

    def __init__(self, every: int, net, loss_fn: Callable, run=None):
        self.every, self.net, self.loss_fn, self.run = every, net, loss_fn, run
        self.rows: list[dict] = []
        self.state_then = None   # the running statistics at the previous watched step
        self._stats = None

    @classmethod
    def maybe(cls, every: int, net, loss_fn: Callable, run=None) -> "Telemetry | None":
        """A Telemetry every ``every`` steps, or None when ``every`` is 0."""
        return cls(every, net, loss_fn, run) if every else None

    def restore(self, progress: Mapping) -> None:
        """The rows written before the checkpoint's (epoch, step)."""
        if self.run is not None:
            self.rows = read_telemetry(self.run.dir / TELEMETRY, progress["epoch"] + 1, progress["step"])

    def due(self, global_step: int) -> bool:
        return global_step % self.every == 0

    def before(self, params, state, x, y, key) -> None:
        self._stats = layer_stats(self.net, params, state, x, y, self.loss_fn, key)

    def after(self, epoch: int, step: int, params_before, params_after, state_after) -> None:
        self.rows.append({"epoch": epoch + 1, "step": step, "layers": update_stats(
            self._stats, params_before, params_after, self.state_then, state_after)})
        self.state_then = state_after

    def write(self) -> None:
        if self.run is not None and self.run.writes:
            write_telemetry(self.run.dir / TELEMETRY, self.rows)
