"""One speedrun: the data, the airbench net with its whitening, the optimizer, the lookahead and
the alternating flip handed to the one trainer (:func:`experiments.train.fit`), inside the run
lifecycle (:mod:`experiments.train.lifecycle`) that keeps the run folder, checkpoint and resume
of every other experiment."""
from __future__ import annotations

import sys
import time

import torch

from ..cifar.recipes import load_data, prepare
from ..common.files import write_jsonl
from ..report.plots import plot_run
from ..train import evaluate, fit, make_eval, resolve_device, retain_freed_memory
from ..train.build import build_loss
from ..train.hooks import FitHooks
from ..train.lifecycle import EXIT_REFUSED, Run
from ..train.runs import METRICS
from ..train.lookahead import with_lookahead
from .config import SpeedrunConfig
from .recipe import alternating_flip, augmenter, build_net, build_optimizer

__all__ = ["parts", "run_speedrun", "final_evaluation"]


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
    each = cfg.eval_every_epoch
    result, code = run.guarded(
        lambda: fit(cfg, net=net, opt=opt, loss_fn=build_loss(cfg), train=train,
                    val=val if each else None, test=test if each else None,
                    augment=augmenter(cfg), prepare=prepare, run=run, max_epochs=max_epochs,
                    stream=stream, hooks=hooks),
        stream=stream)
    if not each and code == 0 and result is not None and result.status == "done" and result.history:
        final_evaluation(cfg, net, result, val, test, device, run, stream)
    return result, code


def final_evaluation(cfg: SpeedrunConfig, net, result, val, test, device, run: Run, stream) -> dict:
    """Evaluate the finished run's net on ``val`` and ``test`` (the config's test-time views)
    once, after the last epoch: what ``eval_every_epoch=False`` does instead of evaluating
    after every epoch. The results go into the last row of the history (and ``metrics.jsonl``),
    where a run that evaluates every epoch has them, with ``eval_seconds`` beside them."""
    predict = make_eval(net, tta_flip=cfg.tta_flip, tta_shift=cfg.tta_shift, bf16=cfg.bf16,
                        channels_last=cfg.channels_last, shift_weight=cfg.tta_shift_weight)
    row, started = dict(result.history[-1]), time.perf_counter()
    for split, data in (("val", val), ("test", test)):
        if data is not None and len(data.labels):
            r = evaluate(predict, result.params, result.state, data, device=device,
                         batch_size=cfg.eval_batch_size, prepare=prepare)
            row[f"{split}_loss"], row[f"{split}_accuracy"] = r.loss, r.accuracy
    row["eval_seconds"] = time.perf_counter() - started
    result.history[-1] = row
    if run.writes:
        write_jsonl(run.dir / METRICS, result.history)
    print("final evaluation: " + ", ".join(f"{k} {row[k]:.4f}" for k in ("val_accuracy", "test_accuracy")
                                           if row.get(k) is not None)
          + f" ({row['eval_seconds']:.1f} s)", file=stream)
    return row
