"""The report's hyperparameter sweeps as one ensemble: every (grid point, seed) is a member, all
trained together by one vmapped step (:mod:`experiments.train.ensemble`).

A sweep's config is a CIFAR config (:mod:`experiments.cifar.recipes`) plus ``grid`` (``{name:
[values]}`` over ``lr``, ``momentum``, ``weight_decay``), ``seeds`` (one per member: member k
has grid point ``points[k]`` and seed ``seeds[k]``) and ``points``. Its run folder holds what a
CIFAR run's does (metrics with one value per member, one checkpoint of the whole ensemble) and
``results.json``, ``table.md`` and the figures ``sweep_lr.png`` / ``sweep_momentum.png``.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable, Mapping, Sequence

import layers
import optim
from nets.checkpoint import atomic_write

from ..cifar.recipes import augmenter, prepare
from ..report.plots import save_figure
from ..train import ensemble_parts, fit
from ..train.runs import build_model, write_json
from .grid import Member

__all__ = ["MODELS", "DEFAULTS", "make_optimizer", "study_members", "run_sweep", "summarize",
           "format_table", "plot_sweep"]

#: ``--model`` -> the registry's model name (experiments.train.runs.MODELS).
MODELS = {"tutorial": "tutorial", "a": "cifar_model_a", "b": "cifar_model_b", "c": "cifar_model_c"}

#: A member's hyperparameters when the grid leaves one out.
DEFAULTS = {"lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0}


def make_optimizer(optimizer: str, nesterov: bool = False) -> Callable[..., optim.GradientTransformation]:
    """``make(lr, momentum, weight_decay)`` for one member (0-d tensors under vmap):
    ``optim.sgd`` (torch.optim.SGD, the report's sweeps) or ``optim.adam`` (momentum unused)."""
    if optimizer == "sgd":
        return lambda lr, momentum, weight_decay: optim.sgd(lr, momentum=momentum, nesterov=nesterov,
                                                            weight_decay=weight_decay)
    if optimizer == "adam":
        return lambda lr, momentum, weight_decay: optim.adam(lr, weight_decay=weight_decay)
    raise ValueError(f"--optimizer: expected sgd or adam, got {optimizer!r}")


def _augment(config: Mapping):
    """The members' augmentation, or None when the config draws none (no crop, flip or cutout:
    the tutorial's setting), so that members sharing their batches share one input."""
    if not (config.get("crop") or config.get("flip") or config.get("cutout")):
        return None
    return augmenter(config)


def study_members(config: Mapping) -> list[Member]:
    """The members the config's ``points`` and ``seeds`` name."""
    return [Member(dict(p), s) for p, s in zip(config["points"], config["seeds"])]


def run_sweep(config: Mapping, *, train, val=None, test=None, run_dir: Path, resume: bool = False,
              max_epochs: int | None = None, stream=None, resume_command: str | None = None):
    """Train every member of the sweep as one ensemble, then write its results, table and
    figures (when the run finished). Returns ``(fit result, summary rows)``."""
    config = dict(config)
    ms = study_members(config)
    hyper = {name: [m.point.get(name, DEFAULTS[name]) for m in ms] for name in DEFAULTS}
    net = build_model(config["model"], len(train.classes), config)
    loss = lambda logits, y: layers.cross_entropy(   # noqa: E731
        logits, y, label_smoothing=float(config.get("label_smoothing", 0.0)))
    net_k, opt_k, loss_k = ensemble_parts(net, make_optimizer(config["optimizer"],
                                                              bool(config.get("nesterov"))),
                                          hyper, loss)
    result = fit(config, net=net_k, opt=opt_k, loss_fn=loss_k, train=train, val=val, test=test,
                 augment=_augment(config), prepare=prepare, run_dir=run_dir, resume=resume,
                 max_epochs=max_epochs, stream=stream, resume_command=resume_command)
    rows = summarize(ms, result.history[-1] if result.history else {}, list(config["grid"]))
    if result.status == "done":
        write_json(Path(run_dir) / "results.json", {"grid": config["grid"], "rows": rows,
                                                    "members": [dict(m.point, seed=m.seed) for m in ms],
                                                    "last_epoch": result.history[-1]})
        atomic_write(Path(run_dir) / "table.md", format_table(rows, list(config["grid"]), config))
        plot_sweep(rows, list(config["grid"]), Path(run_dir))
    return result, rows


def summarize(ms: Sequence[Member], row: Mapping, names: Sequence[str]) -> list[dict]:
    """One row per grid point: test (else val) accuracy mean and standard deviation over the
    seeds whose member did not diverge, their count, and how many diverged."""
    split = "test" if row.get("test_accuracy") is not None else "val"
    accs = row.get(f"{split}_accuracy") or [None] * len(ms)
    diverged = row.get("diverged") or [False] * len(ms)
    by_point: dict[tuple, dict] = {}
    for m, acc, bad in zip(ms, accs, diverged):
        key = tuple(m.point[n] for n in names)
        entry = by_point.setdefault(key, {**{n: m.point[n] for n in names}, "accs": [], "diverged": 0,
                                          "split": split})
        if bad or acc is None or not math.isfinite(acc):
            entry["diverged"] += 1
        else:
            entry["accs"].append(acc)
    rows = []
    for entry in by_point.values():
        accs = entry.pop("accs")
        entry.update(n=len(accs), mean=statistics.fmean(accs) if accs else None,
                     std=statistics.stdev(accs) if len(accs) > 1 else (0.0 if accs else None))
        rows.append(entry)
    return rows


def format_table(rows: Sequence[Mapping], names: Sequence[str], config: Mapping) -> str:
    """A markdown table: the grid point, accuracy mean +- std over seeds (in %), seeds, diverged."""
    split = rows[0]["split"] if rows else "test"
    head = "| " + " | ".join(names) + f" | {split} accuracy (%) | seeds | diverged |\n"
    head += "|" + " --- |" * (len(names) + 3) + "\n"
    lines = []
    for r in rows:
        acc = "-" if r["mean"] is None else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
        lines.append("| " + " | ".join(f"{r[n]:g}" for n in names) + f" | {acc} | {r['n']} | "
                     f"{r['diverged']} |")
    note = (f"\n{config['model']} on CIFAR-10, {config['optimizer']}, {config['epochs']} epochs, "
            f"batch {config['batch_size']}, {len(config['seeds'])} members trained as one vmapped "
            "ensemble; mean ± standard deviation over the seeds that did not diverge.\n")
    return head + "\n".join(lines) + "\n" + note


def plot_sweep(rows: Sequence[Mapping], names: Sequence[str], out: Path) -> list[Path]:
    """``sweep_<name>.png`` for each swept hyperparameter with more than one value: accuracy
    against it (log axis for ``lr``), one line per value of the others, diverged points as x."""
    import matplotlib.pyplot as plt

    written = []
    for name in names:
        values = sorted({r[name] for r in rows})
        if len(values) < 2:
            continue
        others = [n for n in names if n != name]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        groups: dict[tuple, list] = {}
        for r in rows:
            groups.setdefault(tuple(r[n] for n in others), []).append(r)
        for key, group in groups.items():
            group = sorted(group, key=lambda r: r[name])
            ok = [r for r in group if r["mean"] is not None]
            label = ", ".join(f"{n}={v:g}" for n, v in zip(others, key)) or None
            if ok:
                ax.errorbar([r[name] for r in ok], [100 * r["mean"] for r in ok],
                            yerr=[100 * r["std"] for r in ok], marker="o", capsize=3, label=label)
            bad = [r for r in group if r["diverged"]]
            if bad:
                ax.scatter([r[name] for r in bad], [0] * len(bad), marker="x", color="tab:red",
                           label="diverged" if key == next(iter(groups)) else None, zorder=3)
        if name == "lr":
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"{rows[0]['split']} accuracy (%)")
        ax.set_title(f"accuracy against {name} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        if any(ax.get_legend_handles_labels()[1]):
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(save_figure(fig, out / f"sweep_{name}.png"))
    return written
