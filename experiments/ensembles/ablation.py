"""Table 1 of the report as a measured ablation: start from a model's report recipe and change
one method at a time (batch norm, Xavier initialisation, Adam, dropout, batch size).

Each variant is one ensemble of its seeds (:func:`experiments.ensembles.sweep.run_sweep` with a
one-point grid): seeds share an architecture, so they train as one vmapped step; variants that
change the architecture (batch norm on/off, dropout layers) or the optimizer are separate runs.
Every variant has its own run folder under ``runs/<name>/<variant>/`` and resumes on its own.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

from nets.checkpoint import atomic_write

from ..cifar.recipes import RECIPES
from ..train import CHECKPOINT
from ..train.runs import write_json
from .grid import members
from .sweep import run_sweep

__all__ = ["METHODS", "variants", "variant_config", "run_ablation", "format_ablation"]

#: Table 1's columns, and what the report says each model uses.
METHODS = ("batch norm", "Xavier init", "Adam", "dropout", "batch size")

#: SGD-Nesterov for the "Adam off" variant: torch.optim.SGD's usual CIFAR setting.
SGD = dict(optimizer="sgd", lr=0.01, momentum=0.9, nesterov=True)


def variants(model: str) -> list[tuple[str, dict]]:
    """``[(name, changes to the report recipe)]``: the full recipe, then one change per method."""
    recipe = RECIPES[model]["report"]
    a = model == "cifar_model_a"
    dropout_on = {"dropout": 0.1, "head_dropout": 0.2}
    return [
        ("full report recipe", {}),
        ("batch norm off", {"batch_norm": False}),
        ("Xavier init" if a else "torch default init",
         {"init": "xavier_uniform" if a else "torch_default"}),
        ("SGD-Nesterov instead of Adam", dict(SGD)),
        ("dropout on (0.1 / 0.2)" if a else "dropout off",
         dropout_on if a else {"dropout": 0.0, "head_dropout": 0.0}),
        (f"batch {125 if recipe['batch_size'] == 32 else 32}",
         {"batch_size": 125 if recipe["batch_size"] == 32 else 32}),
    ]


def slug(name: str) -> str:
    """``"SGD-Nesterov instead of Adam"`` -> ``"sgd-nesterov-instead-of-adam"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def variant_config(model: str, changes: Mapping, *, seeds: int, epochs: int, base: Mapping) -> dict:
    """The sweep config of one variant: the report recipe with ``changes``, a one-point grid,
    ``seeds`` members; ``base`` holds the run-wide settings (data, device, limits)."""
    cfg = {**RECIPES[model]["report"], **base, **changes, "model": model, "epochs": epochs,
           "recipe": "sweep"}
    cfg.setdefault("nesterov", False)
    grid = {"lr": [cfg["lr"]], "momentum": [cfg.get("momentum", 0.0)],
            "weight_decay": [cfg.get("weight_decay", 0.0)]}
    ms = members(grid, seeds)
    cfg.update(grid=grid, points=[m.point for m in ms], seeds=[m.seed for m in ms])
    return cfg


def run_ablation(model: str, *, seeds: int, epochs: int, base: Mapping, out: Path, load_data,
                 max_epochs: int | None = None, stream=None) -> list[dict]:
    """Train (or resume, or reuse) every variant; returns one row per variant and writes
    ``out/ablation.json`` and ``out/ablation.md`` once all are done."""
    rows = []
    for name, changes in variants(model):
        cfg = variant_config(model, changes, seeds=seeds, epochs=epochs, base=base)
        cfg["name"] = f"{out.name}/{slug(name)}"
        run_dir = out / slug(name)
        if (run_dir / "results.json").is_file():
            done = json.loads((run_dir / "results.json").read_text())
            rows.append({"variant": name, **done["rows"][0]})
            continue
        train, val, test = load_data(cfg)
        result, summary = run_sweep(cfg, train=train, val=val, test=test, run_dir=run_dir,
                                    resume=(run_dir / CHECKPOINT).is_file(), max_epochs=max_epochs,
                                    stream=stream)
        if result.status != "done":
            return rows
        rows.append({"variant": name, **summary[0]})
    write_json(out / "ablation.json", {"model": model, "seeds": seeds, "epochs": epochs, "rows": rows})
    atomic_write(out / "ablation.md", format_ablation(rows, model, seeds, epochs))
    return rows


def format_ablation(rows: Sequence[Mapping], model: str, seeds: int, epochs: int) -> str:
    """A markdown table: variant, test accuracy mean ± std (%), difference from the full recipe."""
    full = rows[0]["mean"] if rows and rows[0]["mean"] is not None else None
    lines = ["| variant | test accuracy (%) | difference (points) | seeds | diverged |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        acc = "-" if r["mean"] is None else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
        diff = ("" if r is rows[0] else "-" if r["mean"] is None or full is None
                else f"{100 * (r['mean'] - full):+.2f}")
        lines.append(f"| {r['variant']} | {acc} | {diff} | {r['n']} | {r['diverged']} |")
    return ("\n".join(lines) + f"\n\n{model}, report recipe, {epochs} epochs, {seeds} seeds per "
            "variant (vmapped), one method changed at a time.\n")
