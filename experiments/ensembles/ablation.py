"""Table 1 of the report as a measured ablation: start from a model's report recipe and change
one method at a time (batch norm, Xavier initialisation, Adam, dropout, batch size).

Each variant is one sweep of a one-point grid (:class:`~experiments.ensembles.config.SweepConfig`):
its seeds share an architecture, so they train as one vmapped step; variants that change the
architecture (batch norm on/off, dropout layers), the optimizer or the batch size are separate
runs. Every variant is a run of the run lifecycle (:func:`experiments.train.lifecycle.open_run`)
in its own folder ``runs/<name>/<variant>/``: a rerun of the same command continues it, a rerun
with more epochs trains them (the report recipe's rate is constant), and a rerun with other
seeds or data is refused before anything is written. The table is computed from what the
variants' folders hold (:func:`experiments.ensembles.sweep.read_results`), never from the flags.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

from nets.checkpoint import atomic_write

from ..cifar.config import RECIPES
from ..common.files import write_json
from ..train.lifecycle import EXIT_OK, Run, RunRefused, open_run
from ..train.runs import read_checkpoint_meta
from .config import GRID, AblationConfig, SweepConfig
from .sweep import read_results, spread, train_sweep

__all__ = ["METHODS", "COMMAND", "variants", "variant_config", "variant_configs",
           "open_variants", "run_ablation", "ablation_rows", "format_ablation", "write_ablation", "slug"]

COMMAND = "python -m experiments.ablation"

#: Table 1's columns, and what the report says each model uses.
METHODS = ("batch norm", "Xavier init", "Adam", "dropout", "batch size")

#: SGD-Nesterov for the "Adam off" variant: torch.optim.SGD's usual CIFAR setting.
SGD = dict(optimizer="sgd", lr=(0.01,), momentum=(0.9,), nesterov=True)

#: Settings a variant takes from the study, not from the report recipe.
_FROM_STUDY = ("data_dir", "val_split", "limit_per_class", "test", "device", "epochs")

#: Settings of the report recipe a variant changes to train as an ensemble: vmap runs a
#: convolution outside autocast (docs/sweeps.md), so the ensemble trains in float32.
_ENSEMBLE = dict(bf16=False, channels_last=False, compile=False)


def variants(model: str) -> list[tuple[str, dict]]:
    """``[(name, changes to the report recipe)]``: the full recipe, then one change per method."""
    recipe = RECIPES[model]["report"]
    a = model == "cifar_model_a"
    dropout_on = {"dropout": 0.1, "head_dropout": 0.2}
    other_batch = 125 if recipe.batch_size == 32 else 32
    return [
        ("full report recipe", {}),
        ("batch norm off", {"batch_norm": False}),
        ("Xavier init" if a else "torch default init",
         {"init": "xavier_uniform" if a else "torch_default"}),
        ("SGD-Nesterov instead of Adam", dict(SGD)),
        ("dropout on (0.1 / 0.2)" if a else "dropout off",
         dropout_on if a else {"dropout": 0.0, "head_dropout": 0.0}),
        (f"batch {other_batch}", {"batch_size": other_batch}),
    ]


def slug(name: str) -> str:
    """``"SGD-Nesterov instead of Adam"`` -> ``"sgd-nesterov-instead-of-adam"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def variant_config(study: AblationConfig, changes: Mapping, *, name: str) -> SweepConfig:
    """The sweep config of one variant: the report recipe of ``study.model`` with ``changes``,
    trained in float32 as a one-point grid of ``study.seeds`` members, on the study's data."""
    recipe = RECIPES[study.model]["report"]
    shared = set(SweepConfig.names()) & set(type(recipe).names())
    taken = {k: getattr(recipe, k) for k in shared - set(_FROM_STUDY) - set(GRID) - {"name", "recipe"}}
    taken.update({k: (getattr(recipe, k),) for k in GRID})
    taken.update({k: getattr(study, k) for k in _FROM_STUDY}, **_ENSEMBLE, name=name)
    taken.update(changes)
    return SweepConfig.with_members(SweepConfig(**{**taken, "seeds": (taken["seed"],)}),
                                    seeds_per_point=study.seeds)


def variant_configs(study: AblationConfig, folder: str) -> list[tuple[str, SweepConfig]]:
    """Every variant's ``(name, config)``; ``folder`` is the study's folder name (the variants'
    run names are ``<folder>/<variant slug>``)."""
    return [(name, variant_config(study, changes, name=f"{folder}/{slug(name)}"))
            for name, changes in variants(study.model)]


def open_variants(configs: Sequence[tuple[str, SweepConfig]], out: Path, hint: str) -> list[Run]:
    """Open every variant's run folder before any trains, so that a rerun under other settings
    is refused (RunRefused, one line naming the variant and each differing setting) with every
    folder untouched. ``hint`` is the command that continues them (the ablation's own command
    line: it has no ``--resume``), which the interrupt and stop messages name."""
    runs = []
    for name, cfg in configs:
        try:
            runs.append(open_run(out / slug(name), cfg, command=COMMAND, rerun_resumes=True,
                                 hint=hint))
        except RunRefused as err:
            raise RunRefused(f"variant {name!r}: {err}") from None
    return runs


def _finished(run: Run) -> bool:
    if not run.resumed:
        return False
    progress, _ = read_checkpoint_meta(run.checkpoint)
    return progress["epoch"] >= run.config.epochs and not progress["step"]


def run_ablation(runs: Sequence[tuple[str, Run]], *, train, val=None, test=None,
                 max_epochs: int | None = None, stream=None) -> tuple[list, int]:
    """Train what each variant's folder lacks, one variant after the other (a finished one is
    not touched); ``(fit results, exit status)``, stopping at the first variant that does not
    finish (interrupted, stopped at ``max_epochs``, diverged, damaged)."""
    stream = sys.stderr if stream is None else stream
    results = []
    for i, (name, run) in enumerate(runs, 1):
        if _finished(run):
            continue
        state = "continuing" if run.resumed else "training"
        seeds, epochs = len(run.config.seeds), run.config.epochs
        print(f"ablation: {state} variant {i}/{len(runs)}: {name} ({seeds} seed{'s' * (seeds != 1)}, "
              f"{epochs} epoch{'s' * (epochs != 1)}) -> {run.dir}", file=stream)
        result, code = run.guarded(lambda: train_sweep(run.config, run=run, train=train, val=val,
                                                       test=test, max_epochs=max_epochs,
                                                       stream=stream), stream=stream)
        if code != EXIT_OK or result.status != "done":
            return results, code
        results.append(result)
    return results, EXIT_OK


def ablation_rows(configs: Sequence[tuple[str, SweepConfig]], out: Path) -> list[dict]:
    """One row per variant, from its run folder: the summary of its last completed epoch, that
    epoch and its number of members (RunRefused for a folder that cannot be read)."""
    rows = []
    for name, _ in configs:
        res = read_results(out / slug(name))
        rows.append({"variant": name, **res.rows[0], "epochs": res.epoch,
                     "members": len(res.config.seeds)})
    return rows


def _counted(values: set, unit: str) -> str:
    shown = "/".join(str(v) for v in sorted(values))
    return f"{shown} {unit}{'s' * (values != {1})}"


def format_ablation(rows: Sequence[Mapping], model: str) -> str:
    """A markdown table: variant, test accuracy mean and std (%), difference from the full
    recipe; the note's epochs and seeds are the folders' (each row's)."""
    full = rows[0]["mean"] if rows and rows[0]["mean"] is not None else None
    split = rows[0]["split"] if rows else "test"
    lines = [f"| variant | {split} accuracy (%) | std | difference (points) | seeds | diverged |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        acc = "-" if r["mean"] is None else f"{100 * r['mean']:.2f}"
        diff = ("" if r is rows[0] else "-" if r["mean"] is None or full is None
                else f"{100 * (r['mean'] - full):+.2f}")
        lines.append(f"| {r['variant']} | {acc} | {spread(r)} | {diff} | {r['n']} | {r['diverged']} |")
    epochs = _counted({r["epochs"] for r in rows}, "epoch")
    seeds = _counted({r["members"] for r in rows}, "seed")
    return ("\n".join(lines) + f"\n\n{model}, report recipe, {epochs}, {seeds} per variant "
            "(vmapped), one method changed at a time.\n")


def write_ablation(out: Path, model: str, rows: Sequence[Mapping]) -> None:
    """``ablation.json`` and ``ablation.md`` of the rows :func:`ablation_rows` read."""
    write_json(out / "ablation.json", {"model": model, "epochs": sorted({r["epochs"] for r in rows}),
                                       "seeds": sorted({r["members"] for r in rows}), "rows": rows})
    atomic_write(out / "ablation.md", format_ablation(rows, model))
