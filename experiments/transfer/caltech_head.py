"""Transfer learning as in the report: ImageNet VGG16, last layer replaced by 4096x256, only that
layer trained on Caltech-256 (32 training and 8 test images per class; SGD, lr 0.001, 10 epochs).

Pipeline:

1. Classes and the seeded per-class split from the image-folder tree
   (:mod:`experiments.caltech_data`; the clutter class 257 is left out unless ``--clutter``).
2. Weights (:func:`resolve_weights`): ``--weights PATH``, else torch's hub cache
   ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth``, else a download into that cache when
   online, else an error naming all three.
3. ``nets.vgg16(num_classes=256)`` with the checkpoint everywhere but ``classifier.6``, which is
   drawn fresh (torchvision's init, from ``--seed``). Every other parameter is frozen through
   the optimizer: ``optim.freeze(optim.sgd(...), frozen)`` gives frozen leaves no update and no
   state (:func:`frozen_mask`).
4. Frozen features are computed once and cached (:mod:`experiments.feature_cache`), keyed by a
   hash of the frozen weights, of the image files (paths, sizes, times), of the split and of the
   preprocessing; the head then trains on the cache. Dropout (``--dropout``):

   * ``eval`` (default): the cache holds the penultimate 4096-d activations (the output of
     ``classifier.5``, i.e. of ``classifier.4``'s ReLU with the dropout after it in eval
     mode), so both of VGG16's classifier dropouts are off while the head trains: the same as
     training through the frozen net built with ``dropout=0``. One linear layer per step: the
     fastest path, and the one whose features are deterministic.
   * ``train``: the cache holds ``classifier.1``'s output (after the first FC and its ReLU);
     every step runs ``classifier.2`` (dropout), ``.3`` (frozen FC), ``.4``, ``.5`` (dropout)
     and ``.6`` in train mode with the keys the whole net would draw. This is *exactly* the
     report's training through the frozen net in train mode (tests/test_transfer_caltech.py checks the
     parameters are equal), still ~40x cheaper than the convolutions.
5. Training accuracy (of the last epoch, dropout as trained), test accuracy and mean per-class
   recall are printed and written to ``OUT/results.json``.

No Caltech-256 copy and no ImageNet weights exist on the machines this project was built on; the
tests run this pipeline on generated image trees and random torchvision weights at small sizes.

    python -m experiments.caltech_vgg16_transfer --data /data/caltech256 --out runs/caltech_transfer
"""
from __future__ import annotations

import argparse
import sys
import time
import urllib.error
from pathlib import Path
from typing import Callable, Mapping

import torch

import layers
import nets
import optim
from layers import random as jr

from ..data import caltech256 as cd
from ..data.cifar10 import cache_dir
from ..train import fit_tensors, make_step, score_net
from . import feature_cache as fc
from ..common.files import write_json
from .config import CaltechHeadConfig, CaltechSettings, check_output, open_output

__all__ = ["VGG16_URL", "VGG16_FILE", "HEAD", "CUT", "WeightsNotFoundError", "resolve_weights",
           "pretrained_vgg16", "frozen_mask", "head_optimizer", "frozen_optimizer",
           "train_head_on_features", "add_caltech_flags", "split_and_weights", "run", "benchmark"]

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"
#: The replaced last layer's parameters.
HEAD = ("classifier.6.weight", "classifier.6.bias")
#: Where the frozen part ends, per dropout mode (see the module docstring).
CUT = {"eval": "classifier.5", "train": "classifier.1"}


class WeightsNotFoundError(FileNotFoundError):
    """No VGG16 weights: not given, not in the hub cache, and the download failed."""


def resolve_weights(path: str | Path | None = None, *, hub_dir: str | Path | None = None,
                    download: bool = True,
                    downloader: Callable[[str, str], None] | None = None) -> Path:
    """The VGG16 checkpoint to use: ``path``; else ``<hub_dir>/checkpoints/vgg16-397923af.pth``
    (``hub_dir`` defaults to ``torch.hub.get_dir()``); else that file downloaded from
    :data:`VGG16_URL` (when ``download``); else :class:`WeightsNotFoundError` naming every place.

    ``downloader(url, dst)`` defaults to ``torch.hub.download_url_to_file`` with the file's hash
    prefix checked.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise WeightsNotFoundError(f"resolve_weights: expected --weights {path} to be a "
                                       "torchvision VGG16 .pth file, but no such file exists")
        return path
    hub = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    cached_file = hub / "checkpoints" / VGG16_FILE
    if cached_file.is_file():
        return cached_file
    tried = ["--weights (not given)", f"hub cache {cached_file} (no such file)"]
    if download:
        if downloader is None:
            def downloader(url, dst):
                torch.hub.download_url_to_file(url, dst, hash_prefix="397923af", progress=True)
        try:
            cached_file.parent.mkdir(parents=True, exist_ok=True)
            print(f"downloading {VGG16_URL} to {cached_file}", file=sys.stderr)
            downloader(VGG16_URL, str(cached_file))
            if cached_file.is_file():
                return cached_file
            tried.append(f"download of {VGG16_URL} (no file written)")
        except (urllib.error.URLError, OSError, RuntimeError, ValueError) as err:
            tried.append(f"download of {VGG16_URL} failed ({type(err).__name__}: {err})")
    else:
        tried.append("download (not attempted: offline)")
    raise WeightsNotFoundError("resolve_weights: expected ImageNet VGG16 weights, found none; "
                               "tried " + "; ".join(tried) + ". Pass --weights PATH (a "
                               "torchvision vgg16 state dict), or put the file in the hub cache.")


def pretrained_vgg16(weights: str | Path, num_classes: int = 256, *, seed: int = 0):
    """``(net, params, state)``: ``nets.vgg16(num_classes)`` with the checkpoint's parameters and
    a fresh last layer (``classifier.6``, torchvision's ``N(0, 0.01)`` init from ``key(seed)``)
    when ``num_classes`` differs from the checkpoint's."""
    loaded, state = nets.load_torchvision_weights(weights, num_classes=num_classes)
    batch_norm = any(k.endswith("running_mean") for k in state)
    net = nets.vgg16(num_classes=num_classes, batch_norm=batch_norm)
    missing = [k for k in net.layer.param_shapes if k not in loaded]
    if missing:
        head = nets.child(net, "classifier.6")
        fresh, _ = head.init(jr.fold_in(jr.key(seed), 6), dtype=torch.float32, device="cpu")
        loaded = {**loaded, **{f"classifier.6.{k}": v for k, v in fresh.items()}}
    return net, loaded, state


def frozen_mask(params: Mapping[str, torch.Tensor]) -> dict[str, bool]:
    """``True`` (frozen) for every parameter but the last layer's (:data:`HEAD`)."""
    return {k: k not in HEAD for k in params}


def head_optimizer(lr: float = 1e-3, momentum: float = 0.9):
    """The head's optimizer: ``optim.sgd(lr, momentum)`` (the report: SGD, lr 0.001)."""
    return optim.sgd(lr, momentum=momentum)


def frozen_optimizer(lr: float = 1e-3, momentum: float = 0.9):
    """The same optimizer over the whole net, frozen leaves masked out (:func:`frozen_mask`):
    used when training through the net; on the cache only the head's parameters exist."""
    return optim.freeze(head_optimizer(lr, momentum), frozen_mask)


def train_head_on_features(net, params, feats: torch.Tensor, labels: torch.Tensor, *,
                           dropout: str = "eval", epochs: int = 10, batch_size: int = 32,
                           lr: float = 1e-3, momentum: float = 0.9, key: torch.Tensor,
                           log=None):
    """Train the head on cached features ``feats`` (the output of ``CUT[dropout]``).

    Returns ``(head, head_params, history)``: ``head`` is the suffix net (apply it to cached
    features), ``head_params`` the trained :data:`HEAD` parameters.
    """
    if dropout not in CUT:
        raise ValueError(f"train_head_on_features: expected dropout in {sorted(CUT)}, got {dropout!r}")
    frozen = {k: v for k, v in params.items() if k not in HEAD}
    head = fc.suffix_net(net, CUT[dropout], frozen)
    p0 = {k: params[k] for k in HEAD}
    result = fit_tensors(head, head_optimizer(lr, momentum), feats, labels, params=p0, state={},
                         epochs=epochs, batch_size=batch_size, key=key, log=log)
    return head, result.params, result.training_curve()


def _features(net, params, state, files, *, digest, cut, resize, crop, batch_size, cache, dtype,
              log):
    prefix = fc.prefix_apply(net, cut)
    key = fc.cache_key(weights=digest, files=cd.files_digest(files, resize=resize,
                       crop=crop), cut=cut, dtype=str(dtype), what="caltech_vgg16_transfer v1")

    def compute():
        return {"features": fc.extract(lambda x: prefix(params, state, x),
                                       cd.image_batches(files, batch_size, resize=resize, crop=crop),
                                       dtype=dtype, progress=f"features after {cut}",
                                       total=len(files))}
    if cache is None:
        return compute()["features"]
    return fc.cached(cache, "caltech-vgg16", key, compute, log=log)["features"]


def add_caltech_flags(parser: argparse.ArgumentParser, *, data_required: bool = True) -> None:
    """The flags both Caltech-256 studies share: the data, the weights and the split (their
    defaults and checks are :class:`~experiments.transfer.config.CaltechSettings`')."""
    d = CaltechSettings()
    a = parser.add_argument
    a("--data", required=data_required,
      help="Caltech-256 folder (holding 256_ObjectCategories/ or being it)"
      + ("" if data_required else "; required unless --benchmark"))
    a("--weights", help="torchvision VGG16 .pth (default: torch hub cache, else download)")
    a("--offline", action="store_true", help="never download the weights")
    a("--clutter", action="store_true", help="keep class 257.clutter (left out by default)")
    a("--train-per-class", type=int, default=d.train_per_class,
      help=f"training images per class (default: {d.train_per_class})")
    a("--test-per-class", type=int, default=d.test_per_class,
      help=f"test images per class (default: {d.test_per_class})")


def split_and_weights(cfg: CaltechSettings, out, stream=None):
    """``(log, split, weights)`` of a Caltech study: the line logger on ``stream`` (stderr), the
    split (:func:`experiments.data.caltech256.split_per_class`) and the weights file
    (:func:`resolve_weights`) the config names, after ``out`` was checked
    (:func:`~experiments.transfer.config.check_output`: RunRefused, one line, before anything
    is computed, when it holds results of other settings)."""
    stream = sys.stderr if stream is None else stream
    log = lambda s: print(s, file=stream, flush=True)  # noqa: E731
    if out is not None:
        check_output(out, cfg)
    if cfg.data is None:
        raise FileNotFoundError("--data: expected a Caltech-256 folder, got none")
    classes = cd.list_classes(cfg.data, include_clutter=cfg.clutter)
    split = cd.split_per_class(classes, train_per_class=cfg.train_per_class,
                               test_per_class=cfg.test_per_class, seed=cfg.seed)
    log(f"caltech: {len(split.classes)} classes, {len(split.train_files)} train / "
        f"{len(split.test_files)} test images")
    return log, split, resolve_weights(cfg.weights, download=not cfg.offline)


def run(cfg: CaltechHeadConfig, out: str | Path | None = None, stream=None) -> dict:
    """The whole pipeline for the config ``cfg``; returns the results dict, and writes it with
    the config and the trained head into ``out`` (RunRefused, one line, before anything is
    computed, when ``out`` holds results of other settings:
    :func:`~experiments.transfer.config.check_output`)."""
    stream = sys.stderr if stream is None else stream
    log, split, weights = split_and_weights(cfg, out, stream)
    k = len(split.classes)
    net, params, state = pretrained_vgg16(weights, k, seed=cfg.seed)
    cache = None if cfg.no_cache else Path(cfg.feature_cache or cache_dir() / "features")
    dtype = getattr(torch, cfg.cache_dtype)
    cut = CUT[cfg.dropout]
    t0 = time.perf_counter()
    digest = fc.tree_digest({k: v for k, v in {**params, **state}.items() if k not in HEAD})
    common = dict(digest=digest, cut=cut, resize=cfg.resize, crop=cfg.crop, batch_size=cfg.batch_size,
                  cache=cache, dtype=dtype, log=stream)
    f_train = _features(net, params, state, split.train_files, **common).float()
    f_test = _features(net, params, state, split.test_files, **common).float()
    t_feat = time.perf_counter() - t0
    head, p, history = train_head_on_features(
        net, params, f_train, split.train_labels, dropout=cfg.dropout, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
        key=jr.fold_in(jr.key(cfg.seed), 1), log=log)
    s_test = score_net(head, p, {}, f_test, split.test_labels, k)
    s_train = score_net(head, p, {}, f_train, split.train_labels, k)
    results = {"classes": k, "train_images": len(split.train_files),
               "test_images": len(split.test_files), "dropout": cfg.dropout,
               "epochs": cfg.epochs, "lr": cfg.lr, "momentum": cfg.momentum,
               "train_accuracy_last_epoch": history[-1]["train_accuracy"] if history else None,
               "train_accuracy_eval": s_train.accuracy, "test_accuracy": s_test.accuracy,
               "test_mean_recall": s_test.mean_recall, "history": history,
               "feature_seconds": t_feat, "train_seconds": time.perf_counter() - t0 - t_feat,
               "weights": str(weights)}
    log(f"train {100 * s_train.accuracy:.2f}% (eval mode), test {100 * s_test.accuracy:.2f}%, "
        f"mean per-class recall {100 * s_test.mean_recall:.2f}%")
    if out is not None:
        out = open_output(out, cfg)
        write_json(out / "results.json", results)
        nets.save(out / "head.safetensors", p, {"classes": list(split.classes)})
    return results


def benchmark(steps: int = 5, *, crop: int = 64, batch_size: int = 8, dropout: str = "eval",
              stream=None) -> dict:
    """Seconds per head-training step through the frozen VGG16 (``optim.freeze``, gradients of
    the whole net as ``experiments.train.make_step`` takes them) and on cached features, and seconds per
    image to compute the features once; random weights and images, ``crop x crop`` inputs."""
    stream = sys.stderr if stream is None else stream
    g = torch.Generator().manual_seed(0)
    net = nets.vgg16(num_classes=256)
    params = {k: torch.randn(s, generator=g) * (0.01 if len(s) == 2 else 0.05 if len(s) == 4 else 0)
              for k, s in net.layer.param_shapes.items()}
    x = torch.randn(batch_size, 3, crop, crop, generator=g)
    y = torch.randint(0, 256, (batch_size,), generator=g)
    through_net = net if dropout == "train" else nets.vgg16(num_classes=256, dropout=0.0)
    frozen = {k: v for k, v in params.items() if k not in HEAD}
    head = fc.suffix_net(net, CUT[dropout], frozen)
    prefix = fc.prefix_apply(net, CUT[dropout])

    def timed(fn):
        fn(0)                                                   # warm-up
        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            fn(i)
        return (time.perf_counter() - t0) / steps

    step_net = make_step(through_net, frozen_optimizer(), layers.cross_entropy)
    opt_state = frozen_optimizer().init(params)
    t_net = timed(lambda i: step_net(params, {}, opt_state, (x, y), jr.key(i))[3]["loss"].item())
    t_feat = timed(lambda i: prefix(params, {}, x).sum().item()) / batch_size
    feats = prefix(params, {}, x)
    step_head = make_step(head, head_optimizer(), layers.cross_entropy)
    p_head = {k: params[k] for k in HEAD}
    h_state = head_optimizer().init(p_head)
    t_head = timed(lambda i: step_head(p_head, {}, h_state, (feats, y), jr.key(i))[3]["loss"].item())
    out = {"crop": crop, "batch_size": batch_size, "dropout": dropout, "threads": torch.get_num_threads(),
           "through_net_s_per_step": t_net, "cached_s_per_step": t_head,
           "features_s_per_image": t_feat, "speedup_per_step": t_net / t_head}
    print(f"head step, batch {batch_size} at {crop}x{crop}, dropout {dropout}: through the frozen "
          f"net {t_net:.3f} s, on cached features {t_head * 1e3:.2f} ms ({t_net / t_head:.0f}x); "
          f"features once: {t_feat:.3f} s per image", file=stream)
    return out
