"""The one training loop: :func:`fit` trains a net for some epochs, optionally inside a run folder.

Every study trains with it: the CIFAR recipes, the speedrun, the sweeps (K members as one
vmapped ensemble), the transfer study's fine-tuning and the heads trained on cached features. It
knows nothing of the data set or of the run folder: the caller hands it ``augment`` (training
batch -> net input, keyed), ``prepare`` (eval batch -> net input) and, to keep a run folder, a
:class:`~experiments.train.lifecycle.Run`, which restores and saves it.

Epoch ``e`` visits the examples in :func:`~experiments.train.keys.epoch_order` and step ``s``
gets :func:`~experiments.train.keys.step_keys`, so a draw depends only on (key, epoch, step)
and a resumed run is bit-identical on the CPU to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

import layers
import optim

from ..common.progress import LineWriter, ProgressBar, history_table, member_mean
from ..data.dataset import Dataset
from .device import resolve_device
from .hooks import FitHooks
from .lifecycle import NonFiniteLossError, Run, interrupts_deferred, sigterm_as_interrupt
from .members import Members
from .metrics import evaluate
from .settings import TrainSettings
from .step import make_eval, make_step, to_channels_last
from .telemetry import Telemetry

__all__ = ["fit", "fit_tensors", "FitResult", "NonFiniteLossError", "sigterm_as_interrupt"]


@dataclass
class FitResult:
    """What :func:`fit` ended with: ``status`` is ``"done"``, ``"stopped"`` (max_epochs) or
    ``"interrupted"`` (Ctrl-C or kill; a checkpoint was saved)."""

    status: str
    params: Any
    state: Any
    opt_state: Any
    history: list = field(default_factory=list)
    run: Run | None = None
    telemetry: list = field(default_factory=list)

    def training_curve(self) -> list[dict]:
        """``[{"epoch", "train_loss", "train_accuracy"}, ...]``: the history without wall-clock
        times, so two runs of the same config compare equal."""
        return [{k: row[k] for k in ("epoch", "train_loss", "train_accuracy")} for row in self.history]


def _fresh(epoch: int = 0) -> dict:
    """The progress of an epoch not yet begun: batches done, running sums, seconds."""
    return {"epoch": epoch, "step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


def _current_lr(opt_state) -> float | list | None:
    """The rate of the next update: a float, a list (one per ensemble member), or None (an
    optimizer without an lr field)."""
    if isinstance(opt_state, optim.VmappedState):
        lrs = optim.member_lrs(opt_state)
        return None if lrs is None else lrs.tolist()
    try:
        return optim.current_lr(opt_state)
    except ValueError:
        return None


def _diverged(opt_state, count: int | None) -> list[bool]:
    """Which ensemble members are frozen because they diverged (``optim.vmapped``'s flags)."""
    if isinstance(opt_state, optim.VmappedState):
        return opt_state.diverged.tolist()
    return [False] * (count or 0)


def _live_mean(value, diverged: list[bool] | None):
    """A display number: the value, or its mean over the members that did not diverge (so loss,
    accuracy and learning rate are averaged over the same members)."""
    if not isinstance(value, list):
        return value
    kept = [v for v, bad in zip(value, diverged or [False] * len(value)) if not bad]
    return member_mean(kept)


def _lr_text(lr, diverged) -> str:
    """``lr 1.00e-03``, or for an ensemble the range of the live members' rates."""
    if isinstance(lr, list):
        live = [v for v, bad in zip(lr, diverged or [False] * len(lr)) if not bad and v is not None]
        if not live:
            return "lr -"
        lo, hi = min(live), max(live)
        return f"lr {lo:.2e}" if lo == hi else f"lr {lo:.2e}..{hi:.2e}"
    return "lr -" if lr is None else f"lr {lr:.2e}"


def _epoch_line(row: dict, epochs: int, count: int | None) -> str:
    """The line printed after each epoch."""
    bad = row.get("diverged")
    summary = " ".join(f"{k} {100 * _live_mean(row[f'{k}_accuracy'], bad):.2f}%"
                       for k in ("train", "val", "test") if row[f"{k}_accuracy"] is not None)
    if count is not None:
        summary = f"(mean of {count - sum(bad)} of {count} members) {summary}"
    return (f"epoch {row['epoch']}/{epochs}: loss {_live_mean(row['train_loss'], bad):.4f} "
            f"{summary} {_lr_text(row['lr'], bad)} {row['seconds']:.1f}s")


def _to_device(trees, device, channels_last: bool, own: bool):
    """``(params, state, opt_state)`` on ``device`` (params and optimizer state channels-last);
    ``own``: copies, so that a donating step never writes into the caller's tensors."""
    move = lambda t: t.to(device, copy=own) if isinstance(t, torch.Tensor) else t  # noqa: E731
    params, state, opt_state = (pytree.tree_map(move, t) for t in trees)
    if channels_last:
        params, opt_state = to_channels_last(params), to_channels_last(opt_state)
    return params, state, opt_state


def fit(settings: TrainSettings, *, net, opt, loss_fn: Callable, train, val=None, test=None,
        augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
        params=None, state=None, key: torch.Tensor | None = None, drop_last: bool = True,
        run: Run | None = None, max_epochs: int | None = None, on_step: Callable | None = None,
        stream=None, quiet: bool = False, parallel=None, hooks: FitHooks | None = None) -> FitResult:
    """Train ``net`` on ``train`` for ``settings.epochs`` epochs.

    Args:
      settings: a typed config with the fields of :class:`~experiments.train.settings.TrainSettings`
        (and ``seeds`` / ``member_data_order`` of an ensemble, :mod:`experiments.train.members`).
      net, opt, loss_fn: the ``Net``, the ``GradientTransformation`` and ``(logits, y) -> loss``.
      train, val, test: :class:`~experiments.data.dataset.Dataset` splits; val and test are
        evaluated after each epoch.
      augment: ``(key, x_batch) -> net input`` for training batches (normalisation included);
        None feeds ``prepare(x_batch)``, or ``x_batch`` itself when ``prepare`` is None too.
      prepare: ``x_batch -> net input`` for evaluation batches.
      params, state, key: where to start; default ``net.init(run_keys(seed).init)`` and
        ``run_keys(seed).train``.
      drop_last: drop each epoch's last partial batch (True) or train on it (False).
      run: the run folder (:mod:`experiments.train.lifecycle`): restored when it resumes, saved
        after every epoch and on Ctrl-C. None trains in memory only.
      max_epochs: stop after that many completed epochs (status ``"stopped"``).
      on_step: ``on_step(epoch, step)`` before every step (a test hook).
      quiet: print nothing (the per-epoch lines and the final table go to ``stream`` otherwise).
      parallel: a :class:`~experiments.train.distributed.DataParallel` (torchrun), or None.
      hooks: a :class:`~experiments.train.hooks.FitHooks` (a step wrapper, each epoch's images).

    Returns a :class:`FitResult`; ``history`` has one row per epoch (``train_loss``,
    ``train_accuracy``, ``val_*``, ``test_*``, ``lr``, ``seconds``).

    Raises:
      ValueError: too little data for one batch.
      NonFiniteLossError: a NaN or infinite training loss; the checkpoint on disk is the last good one.
    """
    writes = parallel is None or parallel.writes
    quiet = quiet or not writes
    stream = sys.stderr if stream is None else stream
    device = resolve_device(settings.device) if parallel is None else parallel.device
    if parallel is not None:
        parallel.check_fit(settings, drop_last)
    batch_size, epochs, n = settings.batch_size, settings.epochs, len(train.labels)
    steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    if steps_per_epoch < 1:
        raise ValueError(f"fit: expected at least one batch of {batch_size} examples (lower "
                         f"--batch-size), got {n} training examples")
    members = Members(settings, key)
    if params is None:
        params, state = net.init(members.init_key)
    state = {} if state is None else state
    opt_state, history, progress = opt.init(params), [], _fresh()
    telemetry = Telemetry.maybe(settings.telemetry, net, loss_fn, run)
    if run is not None:
        run.writes = writes
        if run.resumed:
            params, state, opt_state, progress, history = run.restore(
                {"params": params, "state": state, "opt_state": opt_state, "key": members.train_key},
                members.train_key)
            if telemetry is not None:
                telemetry.restore(progress)
            if not quiet:
                print(f"resuming {run.dir} at epoch {progress['epoch'] + 1}, batch {progress['step']}",
                      file=stream)
        else:
            run.begin(params, state, opt_state, members.train_key)
    # The step donates params and optimizer state (written in place, bit-identical) unless
    # something reads the old ones after it: telemetry compares them, an ensemble runs under vmap.
    donate = telemetry is None and members.count is None
    params, state, opt_state = _to_device((params, state, opt_state), device,
                                          settings.channels_last, own=donate)
    step = make_step(net, opt, loss_fn, bf16=settings.bf16, channels_last=settings.channels_last,
                     compile=settings.compile, reduce=None if parallel is None else parallel.reduce,
                     donate=donate)
    hooks = FitHooks() if hooks is None else hooks
    step = step if hooks.wrap_step is None else hooks.wrap_step(step)
    predict = make_eval(net, tta_flip=settings.tta_flip, tta_shift=settings.tta_shift,
                        bf16=settings.bf16, channels_last=settings.channels_last,
                        shift_weight=settings.tta_shift_weight)
    loop = _Loop(settings, members, step, predict, augment, prepare, device, parallel, telemetry,
                 hooks, on_step, (train, val, test), steps_per_epoch, quiet, stream, run)
    status, trees = "done", (params, state, opt_state)
    loop.trees, loop.progress = trees, progress   # what a Ctrl-C before the first step saves
    try:
        while progress["epoch"] < epochs:
            if max_epochs is not None and progress["epoch"] >= max_epochs:
                status = "stopped"
                break
            trees, progress, row, results = loop.epoch(trees, progress)
            history.append(row)
            progress = _fresh(progress["epoch"] + 1)
            if run is not None:
                if telemetry is not None:
                    telemetry.write()
                run.end_epoch(history, *trees, members.train_key, progress, results, train.classes)
            loop.close_bar(_epoch_line(row, epochs, members.count))
    except KeyboardInterrupt:
        if run is None:
            raise
        # A rank of a data-parallel run saves nothing (rank 0's parameters are every rank's).
        run.save(*loop.trees, members.train_key, loop.progress)
        if telemetry is not None:
            telemetry.write()
        return FitResult("interrupted", *loop.trees, history, run, loop.telemetry_rows)
    if status == "done" and run is not None and not quiet:
        print(history_table(history), file=stream)
    return FitResult(status, *trees, history, run, loop.telemetry_rows)


class _Loop:
    """One epoch of :func:`fit`: the steps, then the evaluation; ``trees`` and ``progress`` are
    always a consistent pair (what a Ctrl-C saves)."""

    def __init__(self, settings, members, step, predict, augment, prepare, device, parallel,
                 telemetry, hooks, on_step, splits, steps_per_epoch, quiet, stream, run):
        self.s, self.members, self.step, self.predict = settings, members, step, predict
        self.augment, self.prepare, self.device, self.parallel = augment, prepare, device, parallel
        self.telemetry, self.hooks, self.on_step, self.quiet, self.stream = telemetry, hooks, on_step, quiet, stream
        self.run = run
        train, self.val, self.test = splits
        self.images, self.labels = train.images.to(device), train.labels.to(device)
        self.steps_per_epoch, self.bar, self.trees, self.progress = steps_per_epoch, None, None, None
        # The step's batch axis: this process's rows of the global batch (layers.parallel).
        self.scope = (contextlib.nullcontext if parallel is None
                      else (lambda: parallel.scope(settings.batch_size)))

    @property
    def telemetry_rows(self) -> list:
        return [] if self.telemetry is None else self.telemetry.rows

    def net_input(self, k, xb):
        if self.augment is not None:
            return self.augment(k.to(self.device), xb)
        return xb if self.prepare is None else self.prepare(xb)

    def epoch(self, trees, progress):
        """Train the rest of epoch ``progress["epoch"]`` and evaluate: ``(trees, progress, row, results)``."""
        m, bs, epoch = self.members, self.s.batch_size, progress["epoch"]
        self.trees, self.progress = trees, progress
        order = m.order(epoch, len(self.labels), self.device)
        images = self.images if self.hooks.epoch_images is None else self.hooks.epoch_images(epoch, self.images)
        self.bar = ProgressBar(self.steps_per_epoch, f"epoch {epoch + 1}/{self.s.epochs}",
                               stream=self.stream, enabled=False if self.quiet else None)
        t0 = time.perf_counter() - progress["seconds"]
        first = progress["step"]
        for s in range(first, self.steps_per_epoch):
            if self.on_step is not None:
                self.on_step(epoch, s)
            idx = order[..., s * bs:(s + 1) * bs]
            size = idx.shape[-1]
            idx = idx if self.parallel is None else self.parallel.local(idx)
            sk = m.step_keys(epoch, s, self.steps_per_epoch)
            lr_now = _current_lr(self.trees[2])
            watch = self.telemetry is not None and self.telemetry.due(epoch * self.steps_per_epoch + s)
            # A step that donates its trees must not stop half-way: Ctrl-C waits for the step.
            with interrupts_deferred(), self.scope():
                x = m.inputs(self.net_input, images, idx, sk.augment, random=self.augment is not None)
                if watch:
                    self.telemetry.before(*self.trees[:2], x, self.labels[idx], sk.dropout.to(self.device))
                new = self.step(*self.trees, (x, self.labels[idx]), sk.dropout.to(self.device))
                if watch:
                    self.telemetry.after(epoch, s, self.trees[0], new[0], new[1])
                loss = m.values(new[3]["loss"])
                if m.all_diverged(loss) or (m.count is not None and all(_diverged(new[2], m.count))):
                    kept = ("" if self.run is None else f"; stopped without saving, so "
                            f"{self.run.checkpoint} still holds the last good checkpoint")
                    raise NonFiniteLossError(
                        f"fit: expected a finite training loss, got {loss} at epoch {epoch + 1}, "
                        f"batch {s}{kept}. Lower the learning rate or check the data.")
                nxt = {"epoch": epoch, "step": s + 1,
                       "loss_sum": m.add(self.progress["loss_sum"], loss, size),
                       "correct": m.add(self.progress["correct"], m.values(new[3]["correct"]), 1),
                       "seen": self.progress["seen"] + size,
                       "seconds": time.perf_counter() - t0, "lr": lr_now}
                # One assignment, so a Ctrl-C never sees new parameters with old progress.
                self.trees, self.progress = new[:3], nxt
            if self.parallel is not None:
                self.parallel.after_step(self.trees[0], self.trees[2], epoch, s + 1)
            if not self.quiet:
                self.bar.update(s + 1, (s + 1 - first) * bs,
                                loss=member_mean(m.ratio(nxt["loss_sum"], nxt["seen"])),
                                acc=member_mean(m.ratio(nxt["correct"], nxt["seen"])))
        params, state, opt_state = self.trees
        if self.parallel is not None:
            state = self.parallel.epoch_end(params, state, opt_state, epoch)
            self.trees = (params, state, opt_state)
        row, results = self.evaluate(epoch, t0)
        return self.trees, self.progress, row, results

    def evaluate(self, epoch: int, t0: float):
        """The epoch's history row and the evaluation results of val and test."""
        m, p = self.members, self.progress
        row = {"epoch": epoch + 1, "train_loss": m.ratio(p["loss_sum"], p["seen"]),
               "train_accuracy": m.ratio(p["correct"], p["seen"]),
               "val_loss": None, "val_accuracy": None, "test_loss": None, "test_accuracy": None,
               "lr": p.get("lr"), "train_seconds": time.perf_counter() - t0}
        results = {}
        for split, data in (("val", self.val), ("test", self.test)):
            if data is not None and len(data.labels) and (self.parallel is None or self.parallel.writes):
                results[split] = evaluate(self.predict, *self.trees[:2], data, device=self.device,
                                          batch_size=self.s.eval_batch_size, prepare=self.prepare)
                r = results[split]
                row[f"{split}_loss"], row[f"{split}_accuracy"] = (
                    ([x.loss for x in r], [x.accuracy for x in r]) if isinstance(r, list)
                    else (r.loss, r.accuracy))
        if m.count is not None:
            row["diverged"] = _diverged(self.trees[2], m.count)
        row["seconds"] = time.perf_counter() - t0
        return row, results

    def close_bar(self, line: str) -> None:
        if not self.quiet:
            self.bar.close(line)


def fit_tensors(net, opt, x: torch.Tensor, y: torch.Tensor, *, params, state=None, epochs: int,
                batch_size: int, key: torch.Tensor, loss_fn: Callable | None = None,
                augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                log: Callable[[str], None] | None = None) -> FitResult:
    """:func:`fit` on tensors held in memory, from given parameters: ``x (N, ...)`` and labels
    ``y (N,)`` on one device (the run's), every example used each epoch (the last partial batch
    is kept: few-shot sets are too small to drop data), no run folder, no evaluation.
    ``log(line)``, when given, receives one line per epoch.

    This is how heads train on cached features and how the transfer study fine-tunes: the same
    loop, keys and step as a CIFAR run.
    """
    n = len(y)
    if n == 0 or len(x) != n:
        raise ValueError(f"fit_tensors: expected as many inputs as labels (at least one), got "
                         f"{len(x)} inputs and {n} labels")
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, device=str(x.device))
    return fit(settings, net=net, opt=opt, loss_fn=loss_fn or layers.cross_entropy,
               train=Dataset(x, y, ()), augment=augment, params=params, state=state, key=key,
               drop_last=False, quiet=log is None, stream=None if log is None else LineWriter(log))


