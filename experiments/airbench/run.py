"""One speedrun: the data, the airbench net with its whitening, the optimizer, the lookahead and
the alternating flip handed to the one trainer (:func:`experiments.train.fit`), inside the run
lifecycle (:mod:`experiments.train.lifecycle`) that keeps the run folder, checkpoint and resume
of every other experiment."""
from __future__ import annotations

import sys

import torch

from ..cifar.recipes import load_data, prepare
from ..report.plots import plot_run
from ..train import fit, resolve_device, retain_freed_memory
from ..train.build import build_loss
from ..train.hooks import FitHooks
from ..train.lifecycle import EXIT_REFUSED, Run
from ..train.lookahead import with_lookahead
from .config import SpeedrunConfig
from .recipe import alternating_flip, augmenter, build_net, build_optimizer

__all__ = ["parts", "run_speedrun"]


def parts(cfg: SpeedrunConfig, train, steps_per_epoch: int, *, from_checkpoint: bool = False):
    """``(net, opt, hooks)`` of the run ``cfg`` on the training split ``train``.

    ``from_checkpoint``: the parameters will be loaded, so the whitening filters are not computed
    (layer 0 is built with zero filters of the right shape).
    """
    net = build_net(cfg, None if from_checkpoint else train.images, len(train.classes))
    opt = build_optimizer(cfg, steps_per_epoch)
    flips = alternating_flip(cfg.seed) if cfg.flip and cfg.alt_flip else None
    hooks = FitHooks(epoch_images=flips)
    if cfg.lookahead:
        opt, hooks = with_lookahead(net, opt, cfg.epochs * steps_per_epoch,
                                    every=cfg.lookahead_every, max_decay=cfg.lookahead_decay,
                                    hooks=hooks)
    return net, opt, hooks


def run_speedrun(run: Run, *, max_epochs: int | None = None, stream=None):
    """Load the data ``run.config`` names, build the parts and train (or resume) in ``run``.

    Returns ``(FitResult or None, exit status)``: :meth:`Run.guarded`'s, or ``(None, 2)`` with one
    line on ``stream`` when the data cannot train (too few images for one batch); every setting
    was checked when the config was made.
    """
    stream = sys.stderr if stream is None else stream
    cfg: SpeedrunConfig = run.config
    train, val, test = load_data(cfg)
    steps_per_epoch = len(train.labels) // cfg.batch_size
    if steps_per_epoch < 1:
        print(f"error: --batch-size {cfg.batch_size}: expected at most the {len(train.labels)} "
              "training images (lower --batch-size, or raise --limit-per-class)", file=stream)
        return None, EXIT_REFUSED
    if cfg.retain_freed_memory:
        retain_freed_memory()
    net, opt, hooks = parts(cfg, train, steps_per_epoch, from_checkpoint=run.resumed)
    device = resolve_device(cfg.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    print(f"speedrun (airbench94 recipe) on {device}: epochs {cfg.epochs}, batch "
          f"{cfg.batch_size}, {steps_per_epoch} steps per epoch, run dir {run.dir}", file=stream)
    run.after_epoch.append(plot_run)
    return run.guarded(lambda: fit(cfg, net=net, opt=opt, loss_fn=build_loss(cfg), train=train,
                                   val=val, test=test, augment=augmenter(cfg), prepare=prepare,
                                   run=run, max_epochs=max_epochs, stream=stream, hooks=hooks),
                       stream=stream)
