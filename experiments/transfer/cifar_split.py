"""A transfer study that runs on this machine: CIFAR-10 split by class, pretrain on one half, move
to the other with few labels.

* **A** = airplane, automobile, bird, cat, deer (25 000 training images): the source task.
* **B** = dog, frog, horse, ship, truck: the target task. ``n`` training images per class are
  drawn from B's training split (32 as the report's Caltech split, and 500), per draw seed
  ``d`` by ``permutation(fold_in(key(d), c))`` of class ``c``'s images, first ``n`` kept (so
  the 32-image set is a subset of the 500-image one). Every method is tested on all of B's test
  images (5000 in the official set; 2500 in the 5k-test JPEG copy this project's machines hold).

The net is :func:`nets.small_vgg16`: VGG16's layout (configuration D: 2, 2, 3, 3, 3 convolutions in
five blocks, each closed by a 2x2 max-pool) at a quarter of its widths (16, 32, 64, 128, 128)
with batch norm, built with :func:`nets.vgg_like`. On a 32x32 image its blocks give
16x16x16, 32x8x8, 64x4x4, 128x2x2 and 128x1x1, so the report's block-3 and block-4 heads exist
(on 1024 and 512 features instead of 200704 and 100352).

Methods (all hyperparameters are in :data:`RECIPE`, typed configs of
:mod:`experiments.transfer.config`; see docs/transfer.md):

* ``probe-block{k}``: a linear classifier on the globally average-pooled, standardised
  features of block ``k`` (frozen, eval mode), for ``k = 1..5``: the transferability curve;
* ``head-block3``, ``head-block4``: the report's heads, ``flatten -> FC 1024 -> ReLU -> FC 5``
  on the frozen block-3 / block-4 feature maps;
* ``frozen+new-head``: the pretrained net with a new last layer, only that layer trained (on the
  cached block-5 features; the head's dropout replays the whole net's keys,
  :mod:`experiments.feature_cache`);
* ``fine-tune``: the pretrained net with a new last layer, everything trained (batch norm in
  training mode, crop + flip augmentation);
* ``scratch``: the same net from a random init, trained on B's few images only.

Resumable: the study's settings are ``OUT/config.json``; a rerun with other settings (the data,
the pretraining's epochs) is refused in one line naming them, and one with more cells (shots,
draws, methods) trains only those. Pretraining is an :func:`experiments.train.fit` run in the run
lifecycle (:mod:`experiments.train.lifecycle`), in ``OUT/pretrain-<hash>`` (the hash names its
recipe), continued when interrupted and skipped when complete; frozen features are cached
(:func:`experiments.transfer.feature_cache.cached`); every finished cell of the table is
written to ``OUT/results.json`` at once and skipped on a rerun. The table and the figure show
every cell ``results.json`` holds.

    python -m experiments.cifar_transfer --out runs/cifar_transfer
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

import nets
from nets.checkpoint import atomic_write
from nets.small_vgg16 import SMALL_VGG16_WIDTHS
from layers import random as jr
from nets.compose import Flatten, Linear, ReLU, as_net, serial

from ..cifar.recipes import augmenter, prepare
from ..common.files import read_json, write_json
from ..data.cifar10 import CIFAR10_CLASSES, cache_dir
from ..data.dataset import Dataset
from ..report.plots import plot_run, save_figure
from ..train import fit, fit_tensors, score_net
from ..train.build import build_loss, build_optimizer
from ..train.lifecycle import Run, open_run
from . import feature_cache as fc
from .config import (FEATURES, FINETUNE, METHODS, PRETRAIN, PRETRAIN_HASHED, SCRATCH,
                     CifarTransferStudy, HeadRecipe, TransferConfig, check_output,
                     open_output)

__all__ = ["CLASSES_A", "CLASSES_B", "RECIPE", "METHODS", "COMMAND",
           "split_by_class", "draw_per_class", "block_features", "run_study", "format_table",
           "plot_transferability", "cells", "open_pretrain", "pretrain"]

COMMAND = "python -m experiments.cifar_transfer"

CLASSES_A = CIFAR10_CLASSES[:5]
CLASSES_B = CIFAR10_CLASSES[5:]

#: Every hyperparameter of the study (:mod:`experiments.transfer.config`): ``pretrain`` is the
#: run on A (the CIFAR "fast" recipe, shortened to fit a shared 2-core CPU); ``features`` trains
#: every classifier on frozen features; ``finetune`` / ``scratch`` train whole nets, each with its
#: epochs by images per class.
RECIPE: dict[str, TransferConfig | HeadRecipe] = {
    "pretrain": PRETRAIN, "features": FEATURES, "finetune": FINETUNE, "scratch": SCRATCH}


def split_by_class(data: Dataset, classes: Sequence[str]) -> Dataset:
    """The images of ``classes`` only, relabelled ``0 .. len(classes) - 1`` in that order."""
    missing = [c for c in classes if c not in data.classes]
    if missing:
        raise ValueError(f"split_by_class: expected classes among {data.classes}, got {missing}")
    ids = torch.tensor([data.classes.index(c) for c in classes])
    keep = torch.isin(data.labels, ids)
    relabel = torch.full((len(data.classes),), -1, dtype=torch.int64)
    relabel[ids] = torch.arange(len(classes))
    return Dataset(data.images[keep], relabel[data.labels[keep]], tuple(classes))


def draw_per_class(labels: torch.Tensor, n: int, seed: int, num_classes: int) -> torch.Tensor:
    """Sorted indices of ``n`` images per class: the first ``n`` of
    ``permutation(fold_in(key(seed), c), count_c)`` of class ``c``'s images."""
    out = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() < n:
            raise ValueError(f"draw_per_class: expected at least {n} images of class {c}, "
                             f"got {idx.numel()}")
        out.append(idx[jr.permutation(jr.fold_in(jr.key(seed), c), idx.numel())[:n]])
    return torch.cat(out).sort().values


def block_features(net: nets.Net, params, state, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every block (eval mode) for a normalised batch ``x``
    (:func:`nets.outputs_at`)."""
    return nets.outputs_at(net, params, state, x)


def _features(net, params, state, images, *, batch_size, progress) -> dict:
    """Pooled features of every block, flat block-3 and block-4 maps, block-5 maps (cut point of
    the new head), for uint8 ``images``."""
    def fn(x):
        b = block_features(net, params, state, x)
        return torch.cat([f.mean((2, 3)) for f in b] + [b[2].flatten(1), b[3].flatten(1),
                                                         b[4].flatten(1)], 1)
    shapes = [tuple(f.shape[1:]) for f in block_features(net, params, state, prepare(images[:1]))]
    flat = fc.extract(fn, fc.batches_of(images, batch_size, prepare), progress=progress,
                      total=len(images))
    sizes = [s[0] for s in shapes] + [math.prod(shapes[k]) for k in (2, 3, 4)]
    parts = torch.split(flat, sizes, 1)
    out = {f"pooled{k + 1}": parts[k] for k in range(5)}
    out.update(block3=parts[5], block4=parts[6], block5=parts[7].reshape(len(images), *shapes[4]))
    return out


def _sgd(cfg: HeadRecipe, epochs: int, n: int):
    """The recipe's optimizer (SGD + Nesterov, one-cycle, no decay on biases and norms) over
    ``epochs`` of ``n`` examples, the last partial batch kept."""
    return build_optimizer(cfg, cfg.steps_per_epoch(n), epochs=epochs)


def _fresh_head(net, params, key):
    """``params`` with the last linear layer (``classifier.3``) drawn anew from ``key``."""
    fresh, _ = net.init(key)
    return {**params, **{k: v for k, v in fresh.items() if k.startswith("classifier.3.")}}


def _train_on_features(method, n, feats_tr, y_tr, feats_te, y_te, net, pre_params, key):
    cfg = RECIPE["features"]
    epochs = cfg.epochs_for(n)
    if method == "frozen+new-head":
        names = nets.leaf_names(net)
        cut = names[names.index(nets.block_ends(net)[-1]) + 1]  # block 5's dropout
        head = fc.suffix_net(net, cut)
        p0 = {k: v for k, v in _fresh_head(net, pre_params, jr.fold_in(key, 0)).items()
              if k.startswith("classifier.")}
        xtr, xte = feats_tr["block5"], feats_te["block5"]
    else:
        if method.startswith("probe-block"):
            k = int(method[-1])
            xtr, xte = fc.standardize(feats_tr[f"pooled{k}"], feats_te[f"pooled{k}"])
            head = as_net(serial(Linear(xtr.shape[1], 5)), name=f"probe[block {k}]")
        else:
            k = int(method[-1])
            xtr, xte = fc.standardize(feats_tr[f"block{k}"], feats_te[f"block{k}"])
            head = as_net(serial(Flatten(), Linear(xtr.shape[1], cfg.hidden), ReLU(),
                                 Linear(cfg.hidden, 5)), name=f"report head[block {k}]")
        p0, _ = head.init(jr.fold_in(key, 0))
    result = fit_tensors(head, _sgd(cfg, epochs, len(y_tr)), xtr, y_tr, params=p0, state={},
                         epochs=epochs, batch_size=cfg.batch_size, key=jr.fold_in(key, 1))
    s = score_net(head, result.params, {}, xte, y_te, 5)
    return s, result.history[-1]["train_accuracy"]


def _train_whole(method, n, b_train, y_tr, b_test, net, pre_params, pre_state, key, log):
    cfg = RECIPE["finetune" if method == "fine-tune" else "scratch"]
    epochs = cfg.epochs_for(n)
    if method == "fine-tune":
        params, state = _fresh_head(net, pre_params, jr.fold_in(key, 0)), pre_state
    else:
        params, state = net.init(jr.fold_in(key, 0))
    result = fit_tensors(net, _sgd(cfg, epochs, len(y_tr)), b_train, y_tr, params=params,
                         state=state, epochs=epochs, batch_size=cfg.batch_size,
                         # the pretraining's augmentation: crop 4 + flip
                         key=jr.fold_in(key, 1), augment=augmenter(RECIPE["pretrain"]),
                         log=log)
    s = score_net(net, result.params, result.state, b_test.images, b_test.labels, 5, prepare=prepare)
    return s, result.history[-1]["train_accuracy"]


def open_pretrain(out: Path, study: CifarTransferStudy) -> Run:
    """The pretraining run of ``study`` in ``out/pretrain-<hash>``: new, or continued (reused
    when complete); RunRefused (one line, nothing written) when the folder holds a run of
    other data."""
    cfg = RECIPE["pretrain"].replace(data_dir=study.data_dir, limit_per_class=study.limit_per_class)
    if study.pretrain_epochs is not None:
        cfg = cfg.replace(epochs=study.pretrain_epochs)
    run_dir = out / f"pretrain-{fc.cache_key(**{k: getattr(cfg, k) for k in PRETRAIN_HASHED})[:10]}"
    # the study has no --resume: it continues when it is run again
    run = open_run(run_dir, cfg, command=COMMAND, rerun_resumes=True,
                   hint=f"{COMMAND} --out {out}")
    run.after_epoch.append(plot_run)
    return run


def pretrain(run: Run, a_train: Dataset, a_test: Dataset, stream=None) -> tuple[dict, dict, Path]:
    """Pretrain :func:`nets.small_vgg16` on A in ``run`` (:func:`open_pretrain`):
    ``(params, state, run_dir)``; KeyboardInterrupt when interrupted (its checkpoint saved)."""
    cfg = run.config
    net = nets.small_vgg16(len(a_train.classes))
    opt = build_optimizer(cfg, len(a_train.labels) // cfg.batch_size)
    result = fit(cfg, net=net, opt=opt, loss_fn=build_loss(cfg), train=a_train, test=a_test,
                 augment=augmenter(cfg), prepare=prepare, run=run, stream=stream)
    if result.status != "done":
        raise KeyboardInterrupt
    params = {k: v.contiguous() for k, v in result.params.items()}
    return params, dict(result.state), run.dir


def _load_results(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def cells(results: dict) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``(shots, methods)`` of the cells ``results`` holds (``n{n}-d{d}-{method}``), in the order
    of the table (sizes ascending, methods as :data:`METHODS`)."""
    keys = [k for k in results if not k.startswith("_")]
    shots = sorted({int(k.split("-", 2)[0][1:]) for k in keys})
    methods = [m for m in METHODS if any(k.split("-", 2)[2] == m for k in keys)]
    return tuple(shots), tuple(methods)


def run_study(train: Dataset, test: Dataset, out: str | Path, study: CifarTransferStudy, *,
              stream=None) -> dict:
    """Run (or continue) the study on CIFAR-10 ``train`` / ``test``; returns ``results``:
    ``{"n{n}-d{d}-{method}": {"accuracy", "mean_recall", "train_accuracy", "seconds"}}``,
    also written to ``out/results.json``; ``out/table.md`` holds :func:`format_table` of every
    cell there. RunRefused (one line, nothing written) when ``out`` holds a study of other
    settings."""
    stream = sys.stderr if stream is None else stream
    log = lambda s: print(s, file=stream, flush=True)  # noqa: E731
    check_output(out, study)
    run = open_pretrain(Path(out), study)
    out = open_output(out, study)
    shots, draws, methods = study.shots, study.draw_counts(), study.methods
    a_train, a_test = split_by_class(train, CLASSES_A), split_by_class(test, CLASSES_A)
    b_train, b_test = split_by_class(train, CLASSES_B), split_by_class(test, CLASSES_B)
    t0 = time.perf_counter()
    params, state, run_dir = pretrain(run, a_train, a_test, stream)
    log(f"pretrained net: {run_dir} ({time.perf_counter() - t0:.0f} s this run)")
    net = nets.small_vgg16(5)
    weights = fc.tree_digest({**params, **state})
    fdir = Path(study.feature_cache) if study.feature_cache is not None else cache_dir() / "features"
    results_path = out / "results.json"
    results = _load_results(results_path)
    if results.get("_pretrained") not in (None, weights):
        log(f"{results_path} holds results of other pretrained weights; starting a new table")
        results = {}
    results["_pretrained"] = weights
    results["_pretrain_run"] = str(run_dir)

    def feats(x: Dataset, what: str):
        key = fc.cache_key(weights=weights, data=fc.tree_digest({"images": x.images}),
                           net="small_vgg16", widths=list(SMALL_VGG16_WIDTHS), what="cifar_transfer blocks v1")
        return fc.cached(fdir, f"cifar_transfer-{what}", key,
                         lambda: _features(net, params, state, x.images, batch_size=250,
                                           progress=f"features of {what}"), log=stream)

    test_feats = None
    for n, nd in zip(shots, draws):
        for d in range(nd):
            pool = draw_per_class(b_train.labels, max(shots), d, 5)
            sub = b_train.subset(pool[torch.isin(pool, draw_per_class(b_train.labels, n, d, 5))])
            train_feats = None
            for method in methods:
                cell = f"n{n}-d{d}-{method}"
                if cell in results:
                    continue
                t1 = time.perf_counter()
                key = jr.fold_in(jr.fold_in(jr.key(d), n), METHODS.index(method))
                if method in ("fine-tune", "scratch"):
                    s, train_acc = _train_whole(method, n, sub.images, sub.labels, b_test, net,
                                                params, state, key, None)
                else:
                    if test_feats is None:
                        test_feats = feats(b_test, "B-test")
                    if train_feats is None:
                        full = feats(b_train.subset(pool), f"B-train-{max(shots)}-d{d}")
                        keep = torch.isin(pool, draw_per_class(b_train.labels, n, d, 5))
                        train_feats = {k: v[keep] for k, v in full.items()}
                    s, train_acc = _train_on_features(method, n, train_feats, sub.labels, test_feats,
                                                      b_test.labels, net, params, key)
                results[cell] = {"accuracy": s.accuracy, "mean_recall": s.mean_recall,
                                 "train_accuracy": train_acc, "seconds": time.perf_counter() - t1}
                write_json(results_path, results)
                log(f"{cell}: test {100 * s.accuracy:.2f}% (mean recall {100 * s.mean_recall:.2f}%),"
                    f" train {100 * train_acc:.2f}%, {time.perf_counter() - t1:.1f} s")
    write_json(results_path, results)
    held_shots, held_methods = cells(results)
    table = format_table(results, held_shots, held_methods)
    atomic_write(out / "table.md", table + "\n")
    plot_transferability(results, held_shots, out / "transferability.png")
    log(table)
    return results


def format_table(results: dict, shots: Sequence[int], methods: Sequence[str] = METHODS) -> str:
    """Markdown table: one row per method, per ``n`` the test accuracy on B's test images
    (mean +- sample std over draws when several) and the training accuracy of the last epoch.

    B's test set is balanced (the same count per class), so the mean per-class recall equals
    the accuracy; ``results.json`` holds both."""
    head = "| method | " + " | ".join(f"{n}/class: test acc % | {n}/class: train acc %"
                                       for n in shots) + " |"
    rows = [head, "|---|" + "---:|---:|" * len(shots)]

    def fmt(vals):
        if not vals:
            return "-"
        m = 100 * statistics.fmean(vals)
        return f"{m:.2f}" if len(vals) == 1 else f"{m:.2f} ± {100 * statistics.stdev(vals):.2f}"

    for method in methods:
        cells = []
        for n in shots:
            got = [v for k, v in results.items()
                   if k.startswith(f"n{n}-d") and k.endswith(f"-{method}")]
            cells += [fmt([g["accuracy"] for g in got]), fmt([g["train_accuracy"] for g in got])]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_transferability(results: dict, shots: Sequence[int], path: str | Path) -> None:
    """Test accuracy of the linear probe on each block (mean and std over draws), one line per
    ``n``, with the fine-tuned and from-scratch nets as dashed / dotted levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def acc(n, method):
        got = [100 * v["accuracy"] for k, v in results.items()
               if k.startswith(f"n{n}-d") and k.endswith(f"-{method}")]
        return (statistics.fmean(got), statistics.stdev(got) if len(got) > 1 else 0.0) if got else None

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for i, n in enumerate(shots):
        color = f"C{i}"
        pts = [(k, acc(n, f"probe-block{k}")) for k in range(1, 6)]
        pts = [(k, a) for k, a in pts if a is not None]
        if pts:
            ax.errorbar([k for k, _ in pts], [a[0] for _, a in pts], yerr=[a[1] for _, a in pts],
                        fmt="o-", color=color, capsize=3, label=f"linear probe, {n}/class")
        for method, style in (("fine-tune", "--"), ("scratch", ":")):
            a = acc(n, method)
            if a is not None:
                ax.axhline(a[0], color=color, linestyle=style, linewidth=1,
                           label=f"{method}, {n}/class")
    ax.set_xlabel("block of small_vgg16 pretrained on A (globally pooled output)")
    ax.set_ylabel("test accuracy on B (%)")
    ax.set_xticks(range(1, 6))
    ax.set_title("CIFAR-10 A -> B: transferability per block")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
