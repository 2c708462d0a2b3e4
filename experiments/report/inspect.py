"""Figures of a run's layer internals: its telemetry (``--telemetry``) and, from its checkpoint,
activation histograms and feature maps.

* ``telemetry_heatmaps.png``: one heatmap per statistic, layers (rows, in apply order) by
  telemetry step (columns, labelled ``epoch.step``); norms on a log colour scale.
* ``gradient_flow.png``: ``||d loss / d output||`` of every layer at the first, middle and last
  telemetry step: how the gradient shrinks or grows on its way back through the net.
* ``activation_histograms.png``: every watched layer's output on a test batch (eval mode,
  through :func:`nets.capture`).
* ``feature_maps_<layer>.png``: the first channels of a named layer's output for one image.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

import nets

from .plots import save_figure

__all__ = ["STATS", "telemetry_matrix", "plot_heatmaps", "plot_gradient_flow",
           "plot_activation_histograms"]

#: The statistics drawn, with their titles; those marked log use a log colour scale.
STATS = {"act_std": ("activation std", False), "zero_frac": ("fraction of zeros", False),
         "grad_act_norm": ("||dL/d output||", True), "grad_w_norm": ("||dL/d weight||", True),
         "update_ratio": ("||update|| / ||weight||", True), "bn_drift_mean": ("BN running-mean drift", True)}


def telemetry_matrix(rows: Sequence[Mapping], stat: str) -> tuple[list[str], list[str], np.ndarray]:
    """``(layers, columns, values (layers, columns))`` of one statistic; NaN where a layer has
    none (e.g. a ReLU's weight gradient)."""
    layers = list(dict.fromkeys(name for r in rows for name in r["layers"]))
    cols = [f"{r['epoch']}.{r['step']}" for r in rows]
    values = np.full((len(layers), len(rows)), np.nan)
    for j, r in enumerate(rows):
        for i, name in enumerate(layers):
            v = r["layers"].get(name, {}).get(stat)
            if v is not None:
                values[i, j] = v
    return layers, cols, values


def plot_heatmaps(rows: Sequence[Mapping], path: Path, title: str = "") -> Path:
    """Every statistic of :data:`STATS` as a layer-by-step heatmap, in one figure."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    stats = [s for s in STATS if any(s in layer for r in rows for layer in r["layers"].values())]
    cols = 2
    n_rows = math.ceil(len(stats) / cols)
    layers, steps, _ = telemetry_matrix(rows, stats[0])
    fig, axes = plt.subplots(n_rows, cols, figsize=(7 * cols, 0.28 * len(layers) * n_rows + 2),
                             dpi=110, squeeze=False)
    for ax, stat in zip(axes.flat, stats):
        names, steps, values = telemetry_matrix(rows, stat)
        label, log = STATS[stat]
        positive = values[np.isfinite(values) & (values > 0)]
        norm = LogNorm(positive.min(), positive.max()) if log and positive.size else None
        im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", norm=norm,
                       interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        tick = max(1, len(steps) // 10)
        ax.set_xticks(range(0, len(steps), tick), steps[::tick], fontsize=6, rotation=45)
        ax.set_xlabel("epoch.step", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.04)
    for ax in list(axes.flat)[len(stats):]:
        ax.axis("off")
    fig.suptitle(f"{title} telemetry: layers (rows, in order) by step".strip(), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_gradient_flow(rows: Sequence[Mapping], path: Path, title: str = "") -> Path:
    """``||dL/d output||`` per layer at the first, middle and last telemetry step (log scale)."""
    import matplotlib.pyplot as plt

    layers, steps, values = telemetry_matrix(rows, "grad_act_norm")
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 4), dpi=120)
    picks = sorted({0, len(steps) // 2, len(steps) - 1})
    for j in picks:
        ax.plot(range(len(layers)), values[:, j], marker="o", label=f"step {steps[j]}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=7, ha="right")
    ax.set_ylabel("||dL / d layer output||")
    ax.set_title(f"{title} gradient flow (input on the left)".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_activation_histograms(net, params, state, x: torch.Tensor, names: Sequence[str],
                               path: Path, title: str = "") -> Path:
    """A histogram of each named layer's output on the batch ``x`` (eval mode)."""
    import matplotlib.pyplot as plt

    with torch.no_grad():
        acts = nets.capture(net, params, state, x, names=list(names)).activations
    cols = 4
    n_rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 2.4 * n_rows), dpi=110, squeeze=False)
    for ax, name in zip(axes.flat, names):
        a = acts[name].detach().float().flatten().cpu().numpy()
        ax.hist(a, bins=60, color="tab:blue")
        ax.set_title(f"{name} ({nets.child(net, name).op})\nmean {a.mean():.3g} std {a.std():.3g} "
                     f"zeros {100 * (a == 0).mean():.0f}%", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{title} activations on {len(x)} test images".strip(), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
