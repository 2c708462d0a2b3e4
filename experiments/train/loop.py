"""The one training loop: :func:`fit` trains a net for some epochs, optionally inside a run folder.

Every study trains with it: the CIFAR recipes (a run folder, evaluation each epoch, resume),
the transfer study's pretraining and fine-tuning, and the heads trained on cached features (no
run folder, the last partial batch kept). It knows nothing of the data set: the caller hands
it ``augment`` (training batch -> net input, keyed) and ``prepare`` (eval batch -> net input).

Epoch ``e`` visits the examples in :func:`~experiments.train.keys.epoch_order` and step ``s``
gets :func:`~experiments.train.keys.step_keys`, so a draw depends only on (key, epoch, step)
and a resumed run is bit-identical on the CPU to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.utils import _pytree as pytree

import layers
import optim

from ..data.dataset import Dataset

from .checks import whole_number
from .device import resolve_device
from .hooks import FitHooks
from .members import Members, member_mean
from .metrics import evaluate
from .progress import LineWriter, ProgressBar, history_table
from .runs import (CHECKPOINT, METRICS, load_run, read_history, save_checkpoint, write_config,
                   write_history)
from .step import check_shift_weight, make_eval, make_step, to_channels_last, tta_views
from .telemetry import TELEMETRY, layer_stats, read_telemetry, update_stats, write_telemetry

__all__ = ["fit", "fit_tensors", "FitResult", "NonFiniteLossError", "check_loop_config",
           "sigterm_as_interrupt"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class FitResult:
    """What :func:`fit` ended with: ``status`` is ``"done"``, ``"stopped"`` (max_epochs) or
    ``"interrupted"`` (Ctrl-C; a checkpoint was saved)."""

    status: str
    params: Any
    state: Any
    opt_state: Any
    history: list = field(default_factory=list)
    run_dir: Path | None = None
    telemetry: list = field(default_factory=list)

    def training_curve(self) -> list[dict]:
        """``[{"epoch", "train_loss", "train_accuracy"}, ...]``: the history without wall-clock
        times, so two runs of the same config compare equal."""
        return [{k: row[k] for k in ("epoch", "train_loss", "train_accuracy")} for row in self.history]


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, ``kill PID`` (SIGTERM) of a background run raises KeyboardInterrupt, so
    :func:`fit` saves a checkpoint the way Ctrl-C does; the previous handler comes back after
    (nothing changes where handlers cannot be set: not the main thread)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def check_loop_config(config: Mapping) -> None:
    """Refuse (ValueError, one line) a config :func:`fit` cannot run: ``epochs`` >= 0 and
    ``batch_size`` >= 1 (ints), ``eval_batch_size`` >= 1, ``tta_shift`` >= 0, a known device."""
    whole_number(config.get("epochs"), "epochs", 0)
    whole_number(config.get("batch_size"), "batch_size")
    whole_number(config.get("eval_batch_size", 1000), "eval_batch_size")
    tta_views(False, config.get("tta_shift", 0))
    check_shift_weight(config.get("tta_shift_weight"))
    resolve_device(config.get("device", "auto"))
    if config.get("telemetry"):
        whole_number(config["telemetry"], "telemetry")
        if config.get("seeds"):
            raise ValueError("--telemetry: expected one model, got an ensemble (seeds)")


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


def _loss_and_accuracy(result):
    """``(loss, accuracy)`` of an EvalResult, or lists of them (one per ensemble member)."""
    if isinstance(result, list):
        return [r.loss for r in result], [r.accuracy for r in result]
    return result.loss, result.accuracy


def _diverged(opt_state, count: int) -> list[bool]:
    """Which ensemble members are frozen because they diverged (``optim.vmapped``'s flags)."""
    if isinstance(opt_state, optim.VmappedState):
        return opt_state.diverged.tolist()
    return [False] * count


def fit(config: Mapping, *, net, opt, loss_fn: Callable, train, val=None, test=None,
        augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
        params=None, state=None, key: torch.Tensor | None = None, drop_last: bool = True,
        run_dir: str | Path | None = None, resume: bool = False, max_epochs: int | None = None,
        on_step: Callable[[int, int], None] | None = None, stream=None, quiet: bool = False,
        resume_command: str | None = None, parallel=None,
        hooks: FitHooks | None = None) -> FitResult:
    """Train ``net`` on ``train`` for ``config["epochs"]`` epochs.

    Args:
      config: ``epochs``, ``batch_size`` and, optionally, ``seed`` (0), ``device`` ("auto"),
        ``bf16``, ``channels_last``, ``compile``, ``tta_flip``, ``tta_shift`` (0),
        ``eval_batch_size`` (1000), ``name``, ``telemetry`` (every N steps, 0: off;
        :mod:`experiments.train.telemetry`), and for an ensemble ``seeds`` (one per member) and
        ``member_data_order`` (:mod:`experiments.train.members`). JSON-able: it is written to
        the run folder.
      net, opt, loss_fn: the ``Net``, the ``GradientTransformation`` and ``(logits, y) -> loss``.
      train, val, test: splits with ``.images``, ``.labels`` and ``.classes``
        (:class:`experiments.data.dataset.Dataset`); val and test are evaluated after each epoch.
      augment: ``(key, x_batch) -> net input`` for training batches (normalisation included);
        None feeds ``prepare(x_batch)``, or ``x_batch`` itself when ``prepare`` is None too.
      prepare: ``x_batch -> net input`` for evaluation batches (e.g. normalisation).
      params, state: where to start; default ``net.init(run_keys(seed).init)``.
      key: the training key; default ``run_keys(seed).train``.
      drop_last: drop each epoch's last partial batch (True) or train on it (False).
      run_dir: the run folder (config.json, metrics.jsonl, plots, checkpoint after every epoch);
        None trains in memory only.
      resume: continue from ``run_dir``'s checkpoint.
      max_epochs: stop after that many completed epochs (status ``"stopped"``).
      on_step: ``on_step(epoch, step)`` before every step (a test hook).
      quiet: print nothing (the per-epoch lines and the final table go to ``stream`` otherwise).
      parallel: a :class:`~experiments.train.distributed.DataParallel` (torchrun): this process
        trains on its slice of every global batch of ``batch_size``, the gradients are averaged
        over the processes, and only rank 0 writes or prints. None: one process.
      hooks: a :class:`~experiments.train.hooks.FitHooks`: a wrapper of the step and the
        training images of each epoch (the speedrun's lookahead and alternating flip).

    Returns a :class:`FitResult`; ``history`` has one row per epoch (``train_loss``,
    ``train_accuracy``, ``val_*``, ``test_*``, ``lr``, ``seconds``).

    Raises:
      ValueError: a config it cannot run (:func:`check_loop_config`), too little data.
      NonFiniteLossError: a NaN or infinite training loss; the checkpoint on disk is the last good one.
    """
    config = dict(config)
    check_loop_config(config)
    if parallel is not None:
        parallel.check_fit(config, drop_last)
    writes = parallel is None or parallel.writes
    quiet = quiet or not writes
    stream = sys.stderr if stream is None else stream
    say = (lambda text: None) if quiet else (lambda text: print(text, file=stream))
    run_dir = None if run_dir is None else Path(run_dir)
    if resume and run_dir is None:
        raise ValueError("fit: expected a run_dir to resume from, got resume=True without one")
    device = resolve_device(config.get("device", "auto")) if parallel is None else parallel.device
    batch_size, epochs = config["batch_size"], config["epochs"]
    channels_last, bf16 = bool(config.get("channels_last")), bool(config.get("bf16"))
    n = len(train.labels)
    steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    if steps_per_epoch < 1:
        raise ValueError(f"fit: expected at least one batch of {batch_size} examples (lower "
                         f"--batch-size), got {n} training examples")
    members = Members(config, key)
    train_key = members.train_key
    ckpt_path = None if run_dir is None else run_dir / CHECKPOINT
    out_dir = run_dir if writes else None   # where this process writes: rank 0 only
    resume_command = resume_command or f"--resume {run_dir}"

    if params is None:
        params, state = net.init(members.init_key)
    state = {} if state is None else state
    opt_state = opt.init(params)
    history: list[dict] = []
    tel_every, tel_rows, tel_state = int(config.get("telemetry") or 0), [], None
    progress = {"epoch": 0, "step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    if resume:
        tree, progress, _ = load_run(run_dir, like={"params": params, "state": state,
                                                    "opt_state": opt_state, "key": train_key})
        params, state, opt_state = tree["params"], tree["state"], tree["opt_state"]
        if not torch.equal(tree["key"], train_key):
            raise ValueError(f"fit: expected the checkpoint's key to derive from seed "
                             f"{config.get('seed', 0)}, got a different key in {ckpt_path}")
        history = read_history(run_dir / METRICS, progress["epoch"])
        tel_rows = read_telemetry(run_dir / TELEMETRY, progress["epoch"] + 1, progress["step"])
        if out_dir is not None:
            write_config(run_dir, config)   # the caller may have changed epochs, device or data
        say(f"resuming {run_dir} at epoch {progress['epoch'] + 1}, batch {progress['step']}")
    elif out_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config)
        write_history(run_dir / METRICS, history)
        save_checkpoint(ckpt_path, params, state, opt_state, train_key, progress, config)

    to_dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    params, state, opt_state = (pytree.tree_map(to_dev, t) for t in (params, state, opt_state))
    if channels_last:
        params, opt_state = to_channels_last(params), to_channels_last(opt_state)
    step = make_step(net, opt, loss_fn, bf16=bf16, channels_last=channels_last,
                     compile=bool(config.get("compile")),
                     reduce=None if parallel is None else parallel.reduce)
    hooks = FitHooks() if hooks is None else hooks
    if hooks.wrap_step is not None:
        step = hooks.wrap_step(step)
    # The step's batch axis: this process's rows of the global batch (layers.parallel).
    scope = contextlib.nullcontext if parallel is None else (lambda: parallel.scope(batch_size))
    predict = make_eval(net, tta_flip=bool(config.get("tta_flip")),
                        tta_shift=config.get("tta_shift", 0), bf16=bf16,
                        channels_last=channels_last, shift_weight=config.get("tta_shift_weight"))
    images, labels = train.images.to(device), train.labels.to(device)
    eval_bs = int(config.get("eval_batch_size", 1000))

    def save(p, s, o, prog):
        if out_dir is not None:
            save_checkpoint(ckpt_path, p, s, o, train_key, prog, config)

    def net_input(k, xb):
        if augment is not None:
            return augment(k.to(device), xb)
        return xb if prepare is None else prepare(xb)

    status = "done"
    epoch = progress["epoch"]
    try:
        while epoch < epochs:
            if max_epochs is not None and epoch >= max_epochs:
                status = "stopped"
                break
            order = members.order(epoch, n, device)
            epoch_images = images if hooks.epoch_images is None else hooks.epoch_images(epoch, images)
            bar = ProgressBar(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", stream=stream,
                              enabled=False if quiet else None)
            t0 = time.perf_counter() - progress["seconds"]
            s = first_step = progress["step"]
            while s < steps_per_epoch:
                if on_step is not None:
                    on_step(epoch, s)
                idx = order[..., s * batch_size:(s + 1) * batch_size]
                size = idx.shape[-1]
                if parallel is not None:
                    idx = parallel.local(idx)
                sk = members.step_keys(epoch, s)
                lr_now = _current_lr(opt_state)
                watch = tel_every and (epoch * steps_per_epoch + s) % tel_every == 0
                with scope():
                    x = members.inputs(net_input, epoch_images, idx, sk.augment, random=augment is not None)
                    if watch:
                        stats = layer_stats(net, params, state, x, labels[idx], loss_fn,
                                            sk.dropout.to(device))
                    new_params, new_state, new_opt_state, metrics = step(
                        params, state, opt_state, (x, labels[idx]), sk.dropout.to(device))
                if watch:
                    tel_rows.append({"epoch": epoch + 1, "step": s, "layers": update_stats(
                        stats, params, new_params, tel_state, new_state)})
                    tel_state = new_state
                loss = members.values(metrics["loss"])
                if members.all_diverged(loss) or (members.count is not None
                                                  and all(_diverged(new_opt_state, members.count))):
                    where = (f"; stopped without saving, so {ckpt_path} still holds the last good "
                             "checkpoint" if ckpt_path is not None else "")
                    raise NonFiniteLossError(
                        f"fit: expected a finite training loss, got {loss} at epoch {epoch + 1}, "
                        f"batch {s}{where}. Lower the learning rate or check the data.")
                s += 1
                nxt = {"epoch": epoch, "step": s,
                       "loss_sum": members.add(progress["loss_sum"], loss, size),
                       "correct": members.add(progress["correct"], members.values(metrics["correct"]), 1),
                       "seen": progress["seen"] + size,
                       "seconds": time.perf_counter() - t0, "lr": lr_now}
                # One assignment, so a Ctrl-C never sees new parameters with old progress.
                params, state, opt_state, progress = new_params, new_state, new_opt_state, nxt
                if parallel is not None:
                    parallel.after_step(params, opt_state, epoch, s)
                if not quiet:
                    bar.update(s, (s - first_step) * batch_size,
                               loss=member_mean(members.ratio(progress["loss_sum"], progress["seen"])),
                               acc=member_mean(members.ratio(progress["correct"], progress["seen"])))
            if parallel is not None:
                state = parallel.epoch_end(params, state, opt_state, epoch)
            row = {"epoch": epoch + 1, "train_loss": members.ratio(progress["loss_sum"], progress["seen"]),
                   "train_accuracy": members.ratio(progress["correct"], progress["seen"]),
                   "val_loss": None, "val_accuracy": None, "test_loss": None, "test_accuracy": None,
                   "lr": progress.get("lr"),
                   "train_seconds": time.perf_counter() - t0}
            results = {}
            for split, data in (("val", val), ("test", test)):
                if data is not None and len(data.labels) and writes:
                    results[split] = evaluate(predict, params, state, data, device=device,
                                              batch_size=eval_bs, prepare=prepare)
                    row[f"{split}_loss"], row[f"{split}_accuracy"] = _loss_and_accuracy(results[split])
            if members.count is not None:
                row["diverged"] = _diverged(opt_state, members.count)
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            epoch += 1
            progress = {"epoch": epoch, "step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0,
                        "seconds": 0.0}
            if out_dir is not None:
                # History first, then the checkpoint: a resume drops rows past the checkpoint's epoch.
                write_history(run_dir / METRICS, history)
                if tel_every:
                    write_telemetry(run_dir / TELEMETRY, tel_rows)
                save(params, state, opt_state, progress)
                _plot(run_dir, history, results, train.classes, epoch, str(config.get("name", "")))
            summary = " ".join(f"{k} {100 * member_mean(row[f'{k}_accuracy']):.2f}%"
                               for k in ("train", "val", "test") if row[f"{k}_accuracy"] is not None)
            if members.count is not None:
                summary = (f"(mean of {members.count - sum(row['diverged'])} of {members.count} "
                           f"members) {summary}")
            line = (f"epoch {epoch}/{epochs}: loss {member_mean(row['train_loss']):.4f} {summary} "
                    f"lr {member_mean(row['lr']) or float('nan'):.2e} {row['seconds']:.1f}s")
            if not quiet:
                bar.close(line)
    except KeyboardInterrupt:
        if ckpt_path is None:
            raise
        # A rank of a data-parallel run saves nothing but rank 0, whose parameters are every
        # rank's up to the last completed step (its running statistics are its own).
        save(params, state, opt_state, progress)
        say(f"\ninterrupted: checkpoint saved at epoch {progress['epoch'] + 1}, batch "
            f"{progress['step']} in {ckpt_path}.\nresume with: {resume_command}")
        if tel_every and out_dir is not None:
            write_telemetry(run_dir / TELEMETRY, tel_rows)
        return FitResult("interrupted", params, state, opt_state, history, run_dir, tel_rows)
    if status == "done" and run_dir is not None:
        say(history_table(history))
    return FitResult(status, params, state, opt_state, history, run_dir, tel_rows)


def _plot(run_dir: Path, history: list[dict], results: dict, classes, epoch: int, title: str) -> None:
    """Curves of the history so far and the confusion matrix of the last evaluated split."""
    from ..report.plots import plot_confusion, plot_curves

    if any(isinstance(row.get("train_loss"), list) for row in history):   # an ensemble: means
        history = [{k: member_mean(v) if isinstance(v, list) else v for k, v in row.items()}
                   for row in history]
        plot_curves(history, run_dir, title=f"{title} (mean over the members)")
        return
    plot_curves(history, run_dir, title=title)
    which = "test" if "test" in results else ("val" if "val" in results else None)
    if which is not None:
        plot_confusion(results[which].confusion, classes, run_dir / "confusion.png",
                       title=f"{which}, epoch {epoch}")


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
    config = {"epochs": epochs, "batch_size": batch_size, "device": str(x.device)}
    return fit(config, net=net, opt=opt, loss_fn=loss_fn or layers.cross_entropy,
               train=Dataset(x, y, ()), augment=augment, params=params, state=state, key=key,
               drop_last=False, quiet=log is None, stream=None if log is None else LineWriter(log))


