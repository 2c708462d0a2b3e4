"""Feature extraction as in the report: classifiers on VGG16's intermediate blocks, on Caltech-256.

Two studies on frozen ImageNet VGG16 convolutions (the split and weights of
:mod:`experiments.caltech_vgg16_transfer`):

* **The report's heads**: on block 3's output (``28x28x256`` for a 224 input, 200 704 numbers)
  and on block 4's (``14x14x512``, 100 352): ``flatten -> FC 1024 -> ReLU -> FC 256``, trained
  with SGD (lr 0.001, momentum 0.9) for 10 epochs on the raw (unstandardised) features, as the
  report did.
* **Linear probes**: one linear layer on the globally average-pooled output of every block
  1..5 (64, 128, 256, 512, 512 numbers), features standardised with the training set's mean and
  std: a layer-by-layer transferability curve (``probes.png``).

The convolutions have no dropout and no batch norm (``vgg16``), so their features are the same
in train and eval mode; they are computed once in one forward pass cut after every block
(:func:`nets.outputs_at`) and cached, keyed by the weights, the files
and the preprocessing. The flat block-3 and block-4 maps are large: for 10 240 images they take
8.2 GB and 4.1 GB in float32, half in ``--cache-dtype float16`` (the default for them; they are
widened batch by batch while training). Pooled features are cached in float32.

    python -m experiments.caltech_vgg16_features --data /data/caltech256 --out runs/caltech_features
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import torch

import nets
import optim
from layers import random as jr
from nets.compose import Flatten, Linear, ReLU, as_net, serial

from ..data import caltech256 as cd
from ..data.cifar10 import cache_dir
from ..train import fit_tensors, score_net
from ..common.progress import ProgressBar
from ..report.plots import save_figure
from ..common.files import write_json
from . import feature_cache as fc
from .config import CaltechBlocksConfig, open_output
from .caltech_head import split_and_weights

__all__ = ["report_head", "linear_probe", "block_features", "run"]


def report_head(in_features: int, num_classes: int, hidden: int = 1024) -> nets.Net:
    """The report's head: ``flatten -> Linear(in, hidden) -> ReLU -> Linear(hidden, classes)``
    (torch's default init). ``(N, C, H, W) or (N, in) -> (N, num_classes)``."""
    return as_net(serial(Flatten(), Linear(in_features, hidden), ReLU(),
                         Linear(hidden, num_classes)), name=f"report_head[{in_features}]")


def linear_probe(in_features: int, num_classes: int) -> nets.Net:
    """One linear layer ``(N, in) -> (N, num_classes)`` (torch's default init)."""
    return as_net(serial(Linear(in_features, num_classes)), name=f"linear_probe[{in_features}]")


def block_features(net, params, state, x: torch.Tensor, flat_blocks: Sequence[int],
                   flat_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``pooled{k}`` ``(N, C_k)`` for every block and ``block{k}`` ``(N, C_k H_k W_k)`` (in
    ``flat_dtype``) for ``k`` in ``flat_blocks``, from one eval-mode forward pass."""
    outs = nets.outputs_at(net, params, state, x)
    feats = {f"pooled{k + 1}": o.mean((2, 3)) for k, o in enumerate(outs)}
    feats.update({f"block{k}": outs[k - 1].flatten(1).to(flat_dtype) for k in flat_blocks})
    return feats


def _extract(net, params, state, files, *, flat_blocks, flat_dtype, resize, crop, batch_size,
             cache, digest, log):
    def compute():
        parts: dict[str, list] = {}
        done = 0
        bar = ProgressBar(len(files), "block features", stream=log)
        with torch.no_grad():
            for x in cd.image_batches(files, batch_size, resize=resize, crop=crop):
                for k, v in block_features(net, params, state, x, flat_blocks, flat_dtype).items():
                    parts.setdefault(k, []).append(v)
                done += len(x)
                bar.update(done, done)
        bar.close(f"block features: {done} images")
        return {k: torch.cat(v) for k, v in parts.items()}
    if cache is None:
        return compute()
    key = fc.cache_key(weights=digest, files=cd.files_digest(files, resize=resize, crop=crop),
                       flat=list(flat_blocks), dtype=str(flat_dtype), what="caltech_vgg16_features v1")
    return fc.cached(cache, "caltech-vgg16-blocks", key, compute, log=log)


def _fit(head, x_tr, y_tr, x_te, y_te, *, epochs, batch_size, lr, momentum, weight_decay, key,
         num_classes, log):
    params, _ = head.init(jr.fold_in(key, 0))
    opt = optim.sgd(lr, momentum=momentum, weight_decay=weight_decay)
    result = fit_tensors(head, opt, x_tr, y_tr, params=params, state={}, epochs=epochs,
                         batch_size=batch_size, key=jr.fold_in(key, 1),
                         augment=lambda k, xb: xb.float(), log=log)
    params = result.params
    widen = lambda xb: xb.float()  # noqa: E731
    s_te = score_net(head, params, {}, x_te, y_te, num_classes, prepare=widen)
    s_tr = score_net(head, params, {}, x_tr, y_tr, num_classes, prepare=widen)
    return {"train_accuracy": s_tr.accuracy, "test_accuracy": s_te.accuracy,
            "test_mean_recall": s_te.mean_recall, "history": result.training_curve()}


def _plot_probes(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = sorted(int(k[len("probe-block"):]) for k in rows if k.startswith("probe-block"))
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for what, style in (("train_accuracy", "o--"), ("test_accuracy", "o-")):
        ax.plot(blocks, [100 * rows[f"probe-block{b}"][what] for b in blocks], style,
                label=what.split("_")[0])
    ax.set_xlabel("VGG16 block (globally pooled output)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(blocks)
    ax.set_title("linear probes: transferability per block")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def run(cfg: CaltechBlocksConfig, out: str | Path | None = None, stream=None) -> dict:
    """Both studies for the config ``cfg``; returns ``{row: scores}`` and writes it with the
    config (and the probes' figure) into ``out`` (RunRefused, one line, before anything is
    computed, when ``out`` holds results of other settings)."""
    stream = sys.stderr if stream is None else stream
    log, split, weights = split_and_weights(cfg, out, stream)
    k = len(split.classes)
    params, state = nets.load_torchvision_weights(weights, truncate_after_block=5)
    net = nets.vgg16(batch_norm=bool(state), truncate_after_block=5)
    cache = None if cfg.no_cache else Path(cfg.feature_cache or cache_dir() / "features")
    common = dict(flat_blocks=tuple(cfg.heads), flat_dtype=getattr(torch, cfg.cache_dtype),
                  resize=cfg.resize, crop=cfg.crop, batch_size=cfg.batch_size, cache=cache,
                  digest=fc.tree_digest({**params, **state}), log=stream)
    t0 = time.perf_counter()
    f_tr = _extract(net, params, state, split.train_files, **common)
    f_te = _extract(net, params, state, split.test_files, **common)
    log(f"features: {time.perf_counter() - t0:.1f} s")
    rows = {}
    for b in cfg.heads:
        t1 = time.perf_counter()
        rows[f"head-block{b}"] = _fit(
            report_head(f_tr[f"block{b}"].shape[1], k, cfg.hidden), f_tr[f"block{b}"],
            split.train_labels, f_te[f"block{b}"], split.test_labels, epochs=cfg.epochs,
            batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0,
            key=jr.fold_in(jr.key(cfg.seed), 100 + b), num_classes=k, log=log)
        rows[f"head-block{b}"]["seconds"] = time.perf_counter() - t1
    for b in range(1, 6) if cfg.probes else ():
        t1 = time.perf_counter()
        x_tr, x_te = fc.standardize(f_tr[f"pooled{b}"].float(), f_te[f"pooled{b}"].float())
        rows[f"probe-block{b}"] = _fit(
            linear_probe(x_tr.shape[1], k), x_tr, split.train_labels, x_te, split.test_labels,
            epochs=cfg.probe_epochs, batch_size=cfg.batch_size, lr=cfg.probe_lr,
            momentum=cfg.momentum, weight_decay=cfg.probe_weight_decay,
            key=jr.fold_in(jr.key(cfg.seed), 200 + b), num_classes=k, log=None)
        rows[f"probe-block{b}"]["seconds"] = time.perf_counter() - t1
    for name, r in rows.items():
        log(f"{name:>14}: train {100 * r['train_accuracy']:6.2f}%  test "
            f"{100 * r['test_accuracy']:6.2f}%  mean recall {100 * r['test_mean_recall']:6.2f}%")
    if out is not None:
        out = open_output(out, cfg)
        write_json(out / "results.json", rows)
        if cfg.probes:
            _plot_probes(rows, out / "probes.png")
    return rows
