"""A run folder: its config, checkpoint and history, and the registry of the models a run names.

    runs/<name>/
      config.json              the resolved config (written once, when the run starts)
      checkpoint.safetensors   params, state, opt_state, train key, progress and config: one
                               file, replaced atomically after every epoch (and on Ctrl-C)
      metrics.jsonl            one JSON line per completed epoch
      accuracy.png, loss.png, confusion.png

Every write goes through :func:`nets.checkpoint.atomic_write`, so a file is always either its
old or its new content. :func:`load_run` refuses a checkpoint that cannot be read
(:class:`nets.checkpoint.CheckpointError`) or whose tensors hold NaN or infinity
(:class:`NonFiniteCheckpointError`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch.utils import _pytree as pytree

import nets
from nets.checkpoint import CheckpointError, atomic_write

from ..common.files import read_jsonl, write_jsonl
from trees.paths import leaves_with_paths

__all__ = ["CHECKPOINT", "CONFIG", "METRICS", "NonFiniteCheckpointError", "save_checkpoint",
           "load_run", "checkpoint_path", "write_config", "read_history", "write_history",
           "check_finite", "write_json", "MODELS", "build_model", "num_classes_of"]

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
    except (OSError, json.JSONDecodeError, AttributeError, Exception) as err:   # safetensors raises its own
        if isinstance(err, CheckpointError):
            raise
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


def write_config(run_dir: Path, config: dict) -> None:
    """``run_dir/config.json``, indented (atomically)."""
    atomic_write(run_dir / CONFIG, json.dumps(config, indent=2) + "\n")


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON at ``path`` (atomically; the folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_history(path: Path, upto_epoch: int) -> list[dict]:
    """The rows of ``metrics.jsonl`` up to and including epoch ``upto_epoch``."""
    if not path.is_file():
        return []
    return [r for r in read_jsonl(path) if r["epoch"] <= upto_epoch]


def write_history(path: Path, rows: list[dict]) -> None:
    """``rows`` as strict JSON lines (atomically; a diverged member's NaN is null)."""
    write_jsonl(path, rows)


# --------------------------------------------------------------------------------------------
# The model registry


def _vgg_like_options(cfg: dict) -> dict:
    """The architecture options of Models A, B, C a config may set (the ablation sets all)."""
    return {k: cfg[k] for k in ("dropout", "head_dropout", "batch_norm", "init", "bn_momentum",
                                "bn_eps") if cfg.get(k) is not None}


def _airbench_options(cfg: dict) -> dict:
    """The architecture options of the speedrun's net (``experiments.airbench.RECIPE``). Layer 0's
    whitening filters are not rebuilt: a run's checkpoint holds them (``0.weight``)."""
    return {k: cfg[k] for k in ("widths", "activation", "bn_momentum", "bn_eps", "scale") if k in cfg}


#: The nets a run's config may name under "model": ``name -> (num_classes, config) -> Net``.
MODELS: dict[str, Callable[[int, dict], "nets.Net"]] = {
    "cifar_model_a": lambda k, cfg: nets.model_a(k, **_vgg_like_options(cfg)),
    "cifar_model_b": lambda k, cfg: nets.model_b(k, **_vgg_like_options(cfg)),
    "cifar_model_c": lambda k, cfg: nets.model_c(k, **_vgg_like_options(cfg)),
    "cifar_transfer": lambda k, cfg: nets.small_vgg16(k),
    "tutorial": lambda k, cfg: nets.tutorial_net(k),
    "vgg16": lambda k, cfg: nets.vgg16(k, batch_norm=bool(cfg.get("batch_norm"))),
    "airbench94": lambda k, cfg: nets.airbench(k, **_airbench_options(cfg)),
}


def build_model(model: str | None, num_classes: int, config: dict | None = None):
    """``MODELS[model](num_classes, config)``: the net a run's config names."""
    if model not in MODELS:
        raise ValueError(f"build_model: expected a model among {sorted(MODELS)}, got {model!r}")
    return MODELS[model](num_classes, dict(config or {}))


def num_classes_of(params: dict) -> int:
    """The number of outputs of a net's last linear layer (its last 2-D ``weight``)."""
    last = [v for k, v in params.items() if k.endswith("weight") and v.dim() == 2]
    if not last:
        raise ValueError("num_classes_of: expected a net with a linear layer, got parameters "
                         f"without a 2-D weight ({sorted(params)[:5]}...)")
    return int(last[-1].shape[0])
