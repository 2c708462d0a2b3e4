"""The report's hyperparameter sweeps as one ensemble: every (grid point, seed) is a member, all
trained together by one vmapped step (:mod:`experiments.train.ensemble`).

    run = open_run(run_dir, cfg, command="python -m experiments.sweep")
    result, code = run.guarded(lambda: train_sweep(cfg, run=run, train=train, test=test))
    results = read_results(run_dir)          # what the folder holds: config, epoch, rows
    write_results(run_dir, results)          # results.json, table.md, sweep_<name>.png

A sweep's config is a :class:`~experiments.ensembles.config.SweepConfig`. Its run folder holds
what a CIFAR run's does (metrics with one value per member, one checkpoint of the whole
ensemble) and ``results.json``, ``table.md`` and the figures ``sweep_lr.png`` /
``sweep_momentum.png``, all computed from the folder (:func:`read_results`), never from flags.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import layers
import optim
from nets.checkpoint import atomic_write

from ..cifar.recipes import augmenter, prepare
from ..common.files import DamagedFileError, read_jsonl, write_json
from ..report.plots import plot_run, save_figure
from ..train import ensemble_parts, fit
from ..train.lifecycle import Run, RunRefused, stored_config
from ..train.registry import build_net
from ..train.runs import METRICS
from .config import GRID, SweepConfig
from .grid import Member

__all__ = ["make_optimizer", "sweep_parts", "train_sweep", "SweepResults", "read_results",
           "write_results", "summarize", "format_table", "plot_sweep"]


def make_optimizer(optimizer: str, nesterov: bool = False) -> Callable[..., optim.GradientTransformation]:
    """``make(lr, momentum, weight_decay)`` for one member (0-d tensors under vmap):
    ``optim.sgd`` (torch.optim.SGD, the report's sweeps) or ``optim.adam`` (momentum unused)."""
    if optimizer == "sgd":
        return lambda lr, momentum, weight_decay: optim.sgd(lr, momentum=momentum, nesterov=nesterov,
                                                            weight_decay=weight_decay)
    if optimizer == "adam":
        return lambda lr, momentum, weight_decay: optim.adam(lr, weight_decay=weight_decay)
    raise ValueError(f"--optimizer: expected sgd or adam, got {optimizer!r}")


def sweep_parts(cfg: SweepConfig, num_classes: int):
    """``(ensemble net, vmapped optimizer, per-member loss)`` of the sweep: member k is
    ``cfg.members()[k]`` (its grid point's optimizer; its seed is fit's, from ``cfg.seeds``)."""
    ms = cfg.members()
    hyper = {name: [m.point[name] for m in ms] for name in GRID}
    net = build_net(cfg.model, num_classes, cfg.net_options())
    loss = lambda logits, y: layers.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)  # noqa: E731
    # make_optimizer builds plain sgd / adam (no mask, no clipping): the flat buffer is exact.
    return ensemble_parts(net, make_optimizer(cfg.optimizer, cfg.nesterov), hyper, loss, flat=True)


def _augment(cfg: SweepConfig):
    """The members' augmentation, or None when the config draws none (no crop, flip or cutout:
    the tutorial's setting), so that members sharing their batches share one input."""
    if not (cfg.crop or cfg.flip or cfg.cutout):
        return None
    return augmenter(cfg)


def train_sweep(cfg: SweepConfig, *, run: Run | None, train, val=None, test=None,
                max_epochs: int | None = None, stream=None, quiet: bool = False):
    """Train (or continue) every member of the sweep as one ensemble in ``run``'s folder (None:
    in memory); the mean curves are plotted after every epoch. Returns fit's result."""
    net_k, opt_k, loss_k = sweep_parts(cfg, len(train.classes))
    if run is not None:
        run.after_epoch.append(plot_run)
    return fit(cfg, net=net_k, opt=opt_k, loss_fn=loss_k, train=train, val=val, test=test,
               augment=_augment(cfg), prepare=prepare, run=run, max_epochs=max_epochs,
               stream=stream, quiet=quiet)


class SweepResults(NamedTuple):
    """What a sweep's run folder holds: its ``config``, its completed ``epoch`` (the
    checkpoint's), the metrics ``row`` of that epoch (None before the first) and the summary
    ``rows`` of :func:`summarize`."""

    config: SweepConfig
    epoch: int
    row: dict | None
    rows: list[dict]


def read_results(run_dir: str | Path) -> SweepResults:
    """The sweep's results at its last completed epoch, from its folder: the checkpoint's config
    and epoch, and that epoch's line of ``metrics.jsonl``. RunRefused (one line) when the folder
    holds no sweep or a damaged file."""
    run_dir = Path(run_dir)
    cfg, progress = stored_config(run_dir, SweepConfig)
    epoch = progress["epoch"]
    try:
        history = read_jsonl(run_dir / METRICS) if (run_dir / METRICS).is_file() else []
        rows = [r for r in history if r["epoch"] == epoch]
    except (DamagedFileError, KeyError) as err:
        raise RunRefused(f"{run_dir / METRICS}: expected a line per epoch, got {err}") from None
    if epoch and not rows:
        raise RunRefused(f"{run_dir / METRICS}: expected a line for epoch {epoch} (the "
                         f"checkpoint's), got epochs {[r['epoch'] for r in history]}")
    row = rows[-1] if rows else None
    return SweepResults(cfg, epoch, row, summarize(cfg.members(), row, GRID))


def write_results(run_dir: str | Path, results: SweepResults) -> None:
    """``results.json``, ``table.md`` and the figures of :func:`read_results`' results."""
    run_dir = Path(run_dir)
    cfg, names = results.config, list(GRID)
    write_json(run_dir / "results.json", {
        "grid": cfg.grid(), "epoch": results.epoch, "rows": results.rows,
        "members": [dict(m.point, seed=m.seed) for m in cfg.members()], "last_epoch": results.row})
    atomic_write(run_dir / "table.md", format_table(results.rows, names, cfg, results.epoch))
    plot_sweep(results.rows, names, run_dir)


def summarize(ms: Sequence[Member], row: Mapping | None, names: Sequence[str]) -> list[dict]:
    """One row per grid point: test (else val) accuracy mean and standard deviation over the
    seeds whose member did not diverge (std None with fewer than two), their count ``n``, and
    how many ``diverged`` (or have no accuracy). ``row`` is an epoch's metrics (None: no epoch
    completed yet)."""
    row = row or {"test_accuracy": None, "val_accuracy": None, "diverged": None}
    split = "test" if row["test_accuracy"] is not None else "val"
    accs = row[f"{split}_accuracy"] or [None] * len(ms)
    diverged = row["diverged"] or [False] * len(ms)
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
                     std=statistics.stdev(accs) if len(accs) > 1 else None)
        rows.append(entry)
    return rows


def spread(row: Mapping) -> str:
    """A row's standard deviation over its seeds in points, ``-`` with fewer than two seeds."""
    return "-" if row["std"] is None else f"{100 * row['std']:.2f}"


def format_table(rows: Sequence[Mapping], names: Sequence[str], cfg: SweepConfig, epoch: int) -> str:
    """A markdown table: the grid point, accuracy mean and std over seeds (in %), seeds,
    diverged; the note says what was trained (``epoch`` completed epochs)."""
    split = rows[0]["split"] if rows else "test"
    head = "| " + " | ".join(names) + f" | {split} accuracy (%) | std | seeds | diverged |\n"
    head += "|" + " --- |" * (len(names) + 4) + "\n"
    lines = []
    for r in rows:
        acc = "-" if r["mean"] is None else f"{100 * r['mean']:.2f}"
        lines.append("| " + " | ".join(f"{r[n]:g}" for n in names) + f" | {acc} | {spread(r)} | "
                     f"{r['n']} | {r['diverged']} |")
    planned = "" if epoch >= cfg.epochs else f" of {cfg.epochs} planned"
    note = (f"\n{cfg.model} on CIFAR-10, {cfg.optimizer}, {epoch} epoch{'s' * (epoch != 1)}{planned}, "
            f"batch {cfg.batch_size}, {len(cfg.seeds)} member{'s' * (len(cfg.seeds) != 1)} "
            "trained as one vmapped ensemble; mean and standard deviation over the seeds that did "
            "not diverge.\n")
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
                            yerr=[100 * (r["std"] or 0.0) for r in ok], marker="o", capsize=3,
                            label=label)
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
