"""Frozen features computed once: split a net at a layer, cache the frozen part's output on disk,
train the rest on the cache.

A :class:`~nets.compose.Net` built with ``nets.compose.serial`` is a chain of leaf layers
``l_1, ..., l_L`` (:func:`nets.compose.leaves`), and ``net.apply`` is their composition. Cutting
after leaf ``l_t`` (``through``, with :func:`nets.cut`) gives

    prefix(x)   = l_t o ... o l_1 (x)            frozen, always run in eval mode
    suffix(h)   = l_L o ... o l_{t+1} (h)        trained, in train mode with the net's own keys
    net(x)      = suffix(prefix(x))

so training the suffix on ``h = prefix(x)`` computed once and stored is the same computation as
training through the frozen net, as long as the prefix holds no layer whose training-mode output
differs from its eval-mode output. Two rules make that hold and are documented choices:

* **The prefix runs in eval mode.** Dropout in the prefix is off and batch norm uses its running
  statistics (which stay frozen). For VGG16's convolutions (no dropout, no batch norm) train and
  eval coincide; for VGG16's classifier, cutting after ``classifier.5`` caches the penultimate
  4096-d activations with both dropouts (``classifier.2``, ``.5``) *off* (see docs/transfer.md).
* **The suffix gets the keys the whole net would give it.** ``serial`` splits one key per child,
  recursively, and a part made by :func:`nets.cut` keeps that rule, so dropout in the suffix (e.g. VGG16's
  ``classifier.5`` before the last layer) draws exactly the mask that
  ``net.apply(params, state, x, train=True, key=k)`` draws. Cut after ``classifier.1`` and
  the cached path reproduces training the head through the whole net in train mode, both
  dropouts included.

The cache is a safetensors file named by a sha256 of what determines it: the frozen parameters
and state (their bytes), the cut, and a description of the data (file names, sizes,
modification times, preprocessing). Change any of them and the name changes; a damaged file is
recomputed, never trusted.

The heads then train on the cached features with the project's one loop,
:func:`experiments.train.fit_tensors`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from safetensors.torch import load_file, save

import nets
from nets.checkpoint import atomic_write
from nets.compose import Net

from ..common.progress import ProgressBar


__all__ = [
    "prefix_apply", "suffix_net", "extract",
    "tree_digest", "cache_key", "cached", "batches_of", "standardize",
]


# --------------------------------------------------------------------------------------------
# Cutting a net (nets.cut) for feature caching


def prefix_apply(net: Net, through: str) -> Callable:
    """``f(params, state, x) -> h``: ``nets.cut(net, upto=through)`` in eval mode, under no_grad.

    ``params`` and ``state`` may be the whole net's; the prefix takes the entries it owns.
    """
    prefix = nets.cut(net, upto=through)
    p_names, s_names = set(prefix.layer.param_shapes), set(prefix.layer.state_shapes)

    def f(params, state, x):
        with torch.no_grad():
            return prefix.apply({k: params[k] for k in p_names}, {k: state[k] for k in s_names},
                                x, train=False)[0]
    return f


def suffix_net(net: Net, through: str, frozen_params: Mapping | None = None) -> Net:
    """``nets.cut(net, after=through)`` as a :class:`Net` over the *trainable* parameters.

    ``apply(params, state, h, *, train, key=None)`` runs the suffix on ``h`` with the parameters
    ``{**frozen_params, **params}`` (so a suffix may mix frozen and trained layers, e.g. VGG16's
    ``classifier.3`` frozen and ``classifier.6`` trained); ``key`` is the whole net's key, so
    the suffix's dropout draws the whole net's masks. ``state`` holds the suffix's state (batch
    norm). ``init`` is the suffix's init restricted to the names not in ``frozen_params``.
    """
    suffix = nets.cut(net, after=through)
    frozen = dict(frozen_params or {})
    p_names = set(suffix.layer.param_shapes)
    where = f"{suffix.name}.apply"

    def init(key, **kwargs):
        p, s = suffix.init(key, **kwargs)
        return {k: v for k, v in p.items() if k not in frozen}, s

    def apply(params, state, h, *, train, key=None):
        full = {**frozen, **params}
        missing = sorted(p_names - full.keys())
        if missing:
            raise ValueError(f"{where}: expected parameters for the layers after {through}, "
                             f"missing {missing}")
        return suffix.apply({k: full[k] for k in p_names}, state, h, train=train, key=key)

    return Net(init, apply, suffix.layer, suffix.name)


def extract(fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor], *,
            dtype: torch.dtype = torch.float32, progress: str | None = None,
            total: int | None = None) -> torch.Tensor:
    """``cat([fn(x) for x in batches])`` on the CPU in ``dtype``, under ``no_grad``; with
    ``progress``, a count of the examples done (of ``total``) on stderr."""
    out, done = [], 0
    bar = ProgressBar(total, progress or "", enabled=None if progress else False)
    with torch.no_grad():
        for x in batches:
            out.append(fn(x).to("cpu", dtype))
            done += len(x)
            if progress:
                bar.update(done, done)
    if progress:
        bar.close(f"{progress}: {done} examples")
    if not out:
        raise ValueError("extract: expected at least one batch, got none")
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# The cache


def tree_digest(tree: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a flat ``{name: tensor}`` dict: every name, dtype, shape and the raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tree):
        t = tree[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(**parts) -> str:
    """sha256 of ``parts`` (JSON-able values: digests, names, numbers), order-independent."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached(directory: str | os.PathLike, name: str, key: str,
           compute: Callable[[], Mapping[str, torch.Tensor]], *, log=sys.stderr) -> dict:
    """``{name: tensor}`` from ``directory/<name>-<key[:24]>.safetensors``, else ``compute()``
    saved there atomically (:func:`nets.checkpoint.atomic_write`) and returned.

    A file whose stored key differs, or that cannot be read, is recomputed and replaced.
    """
    path = Path(directory) / f"{name}-{key[:24]}.safetensors"
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                stored = (f.metadata() or {}).get("key")
            if stored == key:
                print(f"feature cache: read {path}", file=log)
                return load_file(str(path))
            print(f"feature cache: {path} holds key {stored}, expected {key}; recomputing", file=log)
        except Exception as err:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
            print(f"feature cache: ignoring unreadable {path}: {err}", file=log)
    tensors = {k: v.contiguous() for k, v in compute().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save(tensors, metadata={"key": key}))
    print(f"feature cache: wrote {path}", file=log)
    return tensors


# --------------------------------------------------------------------------------------------
# Feeding and standardising features


def batches_of(x: torch.Tensor, batch_size: int,
               prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterable[torch.Tensor]:
    """``x`` in consecutive batches, each mapped by ``prepare`` when given."""
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size] if prepare is None else prepare(x[i:i + batch_size])


def standardize(train: torch.Tensor, *others: torch.Tensor) -> Sequence[torch.Tensor]:
    """``(f - mean) / std`` per feature, both statistics from ``train`` (std floored at 1e-6)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]
