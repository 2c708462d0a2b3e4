"""A run's checkpoint file: what it holds, and reading it back (the folder around it is
:mod:`experiments.train.lifecycle`'s; the model registry is :mod:`experiments.train.registry`).

    checkpoint.safetensors   params, state, opt_state, train key, progress and config: one
                             file, replaced atomically after every epoch (and on Ctrl-C)

It is written through :func:`nets.save` (atomically, so it is always either its old or its new
content). :func:`load_run` refuses a checkpoint that cannot be read
(:class:`nets.checkpoint.CheckpointError`) or whose tensors hold NaN or infinity
(:class:`NonFiniteCheckpointError`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils import _pytree as pytree

import nets
from nets.checkpoint import CheckpointError
from trees.paths import leaves_with_paths

__all__ = ["CHECKPOINT", "CONFIG", "METRICS", "NonFiniteCheckpointError", "save_checkpoint",
           "read_checkpoint_meta", "load_run", "checkpoint_path", "check_finite"]

CHECKPOINT = "checkpoint.safetensors"
CONFIG = "config.json"
METRICS = "metrics.jsonl"


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint whose tensors hold NaN or infinity (corrupted bytes, or a diverged run)."""


def check_finite(tree: Any, where: str) -> None:
    """Raise :class:`NonFiniteCheckpointError` naming (by its tree path, :mod:`trees.paths`) the
    first floating leaf of ``tree`` that holds NaN or infinity."""
    for name, leaf in leaves_with_paths(tree, where):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not bool(
                torch.isfinite(leaf).all()):
            bad = int((~torch.isfinite(leaf)).sum())
            raise NonFiniteCheckpointError(
                f"{where}: expected finite tensors, got {bad} NaN or infinite value(s) in "
                f"'{name}' {tuple(leaf.shape)}: the file is corrupted or the run diverged")


def checkpoint_path(run: str | Path) -> Path:
    """``run`` itself when it is a file, else ``run/checkpoint.safetensors``."""
    run = Path(run)
    return run if run.is_file() else run / CHECKPOINT


def save_checkpoint(path: Path, params, state, opt_state, train_key, progress: dict, config: dict):
    """Write the run's whole training state to ``path`` (atomically; tensors moved to the CPU)."""
    tree = {"params": params, "state": state, "opt_state": opt_state, "key": train_key}
    tree = pytree.tree_map(lambda t: t.detach().contiguous().cpu() if isinstance(t, torch.Tensor) else t,
                           tree)
    nets.save(path, tree, {"progress": json.dumps(progress), "config": json.dumps(config)})


def read_checkpoint_meta(path: str | Path) -> tuple[dict, dict]:
    """``(progress, config)`` stored in a run's checkpoint, read from its header only (the tensors
    are not loaded); CheckpointError (one line) when the header cannot be read."""
    path = checkpoint_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header.get("metadata", "{}")) or {}
        return json.loads(meta.get("progress", "{}")), json.loads(meta.get("config", "{}"))
    except Exception as err:   # OSError, JSON errors, and safetensors' own SafetensorError
        raise CheckpointError(f"{path}: expected a purenn checkpoint, got a file whose header "
                              f"cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def load_run(run: str | Path, like=None, device: torch.device | str = "cpu"):
    """Read a run's checkpoint (``run`` is the run folder or the file): ``(tree, progress, config)``.

    ``tree`` holds ``params``, ``state``, ``opt_state`` and ``key`` (or, for a bare checkpoint of
    ``nets.save``, whatever it holds); it is checked against ``like`` when given. ``progress``
    holds ``epoch`` (epochs completed), ``step`` (batches completed in that epoch) and the
    running sums of the epoch; ``config`` the run's config ({} when the file has none).

    Raises:
      FileNotFoundError: no checkpoint there.
      CheckpointError: unreadable, or (:class:`NonFiniteCheckpointError`) NaN / inf inside.
    """
    path = checkpoint_path(run)
    if not path.is_file():
        raise FileNotFoundError(f"load_run: expected a run folder or checkpoint file, got {run} "
                                f"(no {path})")
    tree, meta = nets.load(path, like=like)
    check_finite(tree, f"load_run: {path}")
    meta = meta if isinstance(meta, dict) else {}
    try:
        progress = json.loads(meta.get("progress", "{}"))
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"load_run: {path} has unreadable run metadata ({err})") from None
    tree = pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)
    return tree, progress, config
