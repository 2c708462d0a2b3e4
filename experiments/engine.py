"""The training engine: one pure step, an eval function, and the epoch loop around them.

* :func:`make_step` builds ``step(params, state, opt_state, batch, key) -> (params, state,
  opt_state, metrics)``: ``torch.func.grad_and_value`` of the loss with the new batch-norm state
  as aux, then the optimizer's ``update`` and ``apply_updates``. Nothing is changed in place.
* :func:`make_eval` builds ``predict(params, state, x) -> logits`` (optionally averaging the
  logits of the image and its mirror); :func:`evaluate` runs it over a split.
* :func:`fit` is the epoch loop: run directory, progress bar, per-epoch metrics, checkpoints,
  plots, resume, NaN guard and Ctrl-C.

Randomness: every draw derives from the run key by ``fold_in`` over (purpose, epoch, step), so a
resumed run draws exactly what the uninterrupted run drew (see :func:`run_keys`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.utils import _pytree as pytree

import layers
import optim
from layers import random as jr

from .augment import augment_batch, normalize
from .data import Dataset

__all__ = [
    "make_step", "make_eval", "evaluate", "EvalResult", "fit", "FitResult", "run_keys",
    "ProgressBar", "NonFiniteLossError", "resolve_device", "load_run", "CHECKPOINT",
    "to_channels_last", "translate", "tta_views",
]

CHECKPOINT = "checkpoint.safetensors"
# Purposes folded into the run key; the numbers are part of the checkpoint format (keep them).
_INIT, _SPLIT, _TRAIN = 0, 1, 2
_PERMUTE, _STEP = 0, 1
_AUGMENT, _DROPOUT = 0, 1


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is left as it was."""


def run_keys(seed: int) -> dict[str, torch.Tensor]:
    """The run's root keys: ``init`` (parameters), ``split`` (validation split), ``train``.

    Inside training, epoch ``e`` shuffles with ``fold_in(fold_in(train, e), 0)`` and step ``s``
    of it uses ``k = fold_in(fold_in(fold_in(train, e), 1), s)``: ``fold_in(k, 0)`` for the
    augmentation, ``fold_in(k, 1)`` for dropout.
    """
    root = jr.key(seed)
    return {"init": jr.fold_in(root, _INIT), "split": jr.fold_in(root, _SPLIT),
            "train": jr.fold_in(root, _TRAIN)}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when available else CPU; anything else as ``torch.device``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"resolve_device: expected an available device, got {device!r} but CUDA "
                         "is not available (use --device cpu or auto)")
    return dev


def to_channels_last(tree):
    """Every 4-D tensor leaf of ``tree`` in ``torch.channels_last`` memory format (values unchanged)."""
    return pytree.tree_map(
        lambda t: t.contiguous(memory_format=torch.channels_last)
        if isinstance(t, torch.Tensor) and t.dim() == 4 else t, tree)


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _widen(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (from autocast) to float32; float32/float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


# --------------------------------------------------------------------------------------------
# The pure step and the eval function


def make_step(net, opt, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
              bf16: bool = False, channels_last: bool = False, compile: bool = False) -> Callable:
    """Build ``step(params, state, opt_state, (x, y), key) -> (params, state, opt_state, metrics)``.

    ``(grads, (loss, (state', logits))) = grad_and_value(L, has_aux=True)(params, state, x, y, key)``
    with ``L = loss_fn(net.apply(params, state, x, train=True, key=key)[0], y)``;
    ``updates, opt_state' = opt.update(grads, opt_state, params)``;
    ``params' = apply_updates(params, updates)`` (through ``optim.step``, which fuses the two).

    Args:
      net: a ``Net(init, apply)``. opt: a ``GradientTransformation(init, update)``.
      loss_fn: ``(logits (N, K), y (N,) int64) -> scalar``.
      bf16: run the forward under ``torch.autocast(bfloat16)``; the loss is taken in float32.
      channels_last: hand ``x`` to the net in channels-last memory format (give the net
        channels-last parameters too, :func:`to_channels_last`).
      compile: ``torch.compile`` the net's forward and backward (the optimizer update stays
        eager: its schedule is host arithmetic on the step count).

    ``metrics`` holds 0-d tensors ``loss`` (mean over the batch) and ``correct`` (count).
    """
    def loss_of(params, state, x, y, key):
        with _autocast(x.device, bf16):
            logits, new_state = net.apply(params, state, x, train=True, key=key)
        logits = _widen(logits)
        return loss_fn(logits, y), (new_state, logits)

    grad_and_value = torch.func.grad_and_value(loss_of, has_aux=True)

    def forward_backward(params, state, x, y, key):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grads, (loss, (new_state, logits)) = grad_and_value(params, state, x, y, key)
        return grads, new_state, {"loss": loss.detach(), "correct": (logits.argmax(-1) == y).sum()}

    if compile:
        # Only the net's forward and backward are compiled. The optimizer stays eager: its
        # schedule is host arithmetic on the step count (int(count), a graph break and a new
        # constant every step under torch.compile), and its foreach update is a few
        # memory-bound passes over the parameters that compiling would not speed up.
        forward_backward = torch.compile(forward_backward)

    def step(params, state, opt_state, batch, key):
        x, y = batch
        grads, new_state, metrics = forward_backward(params, state, x, y, key)
        # update + apply_updates, fused into the foreach call that applies the learning rate
        new_params, new_opt_state = optim.step(opt, grads, opt_state, params)
        return new_params, new_state, new_opt_state, metrics

    return step


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x (N, C, H, W)`` moved down by ``dy`` and right by ``dx`` pixels (negative: up / left).

    ``out[..., i, j] = xr[..., i - dy, j - dx]`` where ``xr`` is ``x`` extended by reflection
    (``torch.nn.functional.pad(mode="reflect")``), so no border value is invented and the
    result does not depend on the normalisation. ``|dy|, |dx|`` must be below ``H``, ``W``.
    """
    s = max(abs(dy), abs(dx))
    if s == 0:
        return x
    h, w = x.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        raise ValueError(f"translate: expected shifts smaller than the image ({h}x{w}), got ({dy}, {dx})")
    padded = torch.nn.functional.pad(x, (s, s, s, s), mode="reflect")
    return padded[..., s - dy:s - dy + h, s - dx:s - dx + w]


def tta_views(tta_flip: bool = False, tta_shift: int = 0) -> list[tuple[bool, int, int]]:
    """The ``(mirror, dy, dx)`` views test-time augmentation averages over.

    ``{no mirror} (+ {mirror} with tta_flip) x {(0, 0)} (+ {(s, s), (-s, -s)} with tta_shift = s)``:
    1, 2, 3 or 6 views; the diagonal pair is airbench's choice of translations.
    """
    if isinstance(tta_shift, bool) or not isinstance(tta_shift, int) or tta_shift < 0:
        raise ValueError(f"make_eval: expected tta_shift to be a whole number of pixels >= 0, "
                         f"got {tta_shift!r}")
    shifts = [(0, 0)] + ([(tta_shift, tta_shift), (-tta_shift, -tta_shift)] if tta_shift else [])
    return [(m, dy, dx) for m in ((False, True) if tta_flip else (False,)) for dy, dx in shifts]


def make_eval(net, *, tta_flip: bool = False, tta_shift: int = 0, bf16: bool = False,
              channels_last: bool = False) -> Callable:
    """Build ``predict(params, state, x (N, C, H, W) float) -> logits (N, K)`` (eval mode; float32
    at least, bfloat16 logits are widened).

    Test-time augmentation averages the logits over the views of :func:`tta_views`:
    ``logits = mean_v f(view_v(x))``; ``tta_flip`` adds the mirror (flip of the width axis),
    ``tta_shift = s`` the translations by ``(s, s)`` and ``(-s, -s)`` (:func:`translate`) of
    each. Without either, ``logits = f(x)``.
    """
    views = tta_views(tta_flip, tta_shift)

    def predict(params, state, x):
        with torch.no_grad(), _autocast(x.device, bf16):
            logits = None
            for mirror, dy, dx in views:
                v = translate(x.flip(-1) if mirror else x, dy, dx)
                if channels_last:
                    v = v.contiguous(memory_format=torch.channels_last)
                out = _widen(net.apply(params, state, v, train=False)[0])
                logits = out if logits is None else logits + out
        return logits if len(views) == 1 else logits / len(views)

    return predict


@dataclass
class EvalResult:
    """Mean cross-entropy, accuracy (fraction), ``confusion[true, predicted]`` and predictions."""

    loss: float
    accuracy: float
    confusion: torch.Tensor
    predictions: torch.Tensor

    def per_class_accuracy(self) -> torch.Tensor:
        """``(K,)`` float64: the diagonal of the confusion matrix over its row sums."""
        return self.confusion.diag().double() / self.confusion.sum(1).clamp_min(1).double()


def evaluate(predict: Callable, params, state, data: Dataset, *, device: torch.device,
             batch_size: int = 1000) -> EvalResult:
    """Run ``predict`` over ``data`` (uint8 images, normalised here) in batches; plain cross-entropy."""
    k = len(data.classes)
    loss_sum, preds = 0.0, []
    for i in range(0, len(data.labels), batch_size):
        x = normalize(data.images[i:i + batch_size].to(device))
        y = data.labels[i:i + batch_size].to(device)
        logits = predict(params, state, x)
        loss_sum += layers.cross_entropy(logits, y, reduction="sum").item()
        preds.append(logits.argmax(-1).cpu())
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
    n = max(len(data.labels), 1)
    confusion = torch.bincount(data.labels * k + pred, minlength=k * k).reshape(k, k)
    return EvalResult(loss_sum / n, (pred == data.labels).sum().item() / n, confusion, pred)


# --------------------------------------------------------------------------------------------
# Progress bar


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class ProgressBar:
    """A one-line, carriage-return progress bar on stderr; silent when stderr is not a TTY.

    ``update(done, images, loss=..., acc=...)`` redraws at most every ``interval`` seconds;
    ``close(line)`` always prints ``line`` (the per-epoch summary) on its own line.
    """

    def __init__(self, total: int, desc: str, stream=None, interval: float = 0.25,
                 enabled: bool | None = None):
        self.total, self.desc = total, desc
        self.stream = sys.stderr if stream is None else stream
        self.enabled = (self.stream.isatty() if hasattr(self.stream, "isatty") else False) \
            if enabled is None else enabled
        self.interval, self.start, self.last = interval, time.perf_counter(), 0.0
        self.drawn = False

    def update(self, done: int, images: int, **metrics: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.interval and done < self.total):
            return
        self.last = now
        elapsed = now - self.start
        rate = images / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - done) if done else float("nan")
        width = 20
        fill = int(width * done / max(self.total, 1))
        parts = " ".join(f"{k} {v:.4f}" if k == "loss" else f"{k} {100 * v:.2f}%"
                         for k, v in metrics.items())
        eta_s = _fmt_time(eta) if math.isfinite(eta) else "--:--"
        self.stream.write(f"\r{self.desc} {done}/{self.total} [{'#' * fill}{'.' * (width - fill)}] "
                          f"{parts} {rate:.0f} img/s ETA {eta_s} \x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self, line: str) -> None:
        self.stream.write(("\r\x1b[K" if self.drawn else "") + line + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------------------------
# Checkpoints


def _save_checkpoint(path: Path, params, state, opt_state, train_key, progress: dict, config: dict):
    import nets

    tree = {"params": params, "state": state, "opt_state": opt_state, "key": train_key}
    tree = pytree.tree_map(lambda t: t.detach().contiguous().cpu() if isinstance(t, torch.Tensor) else t,
                           tree)
    nets.save(path, tree, {"progress": json.dumps(progress), "config": json.dumps(config)})


def load_run(run_dir: str | Path, like=None, device: torch.device | str = "cpu"):
    """Read ``run_dir/checkpoint.safetensors``: ``(tree, progress, config)``.

    ``tree`` holds ``params``, ``state``, ``opt_state`` and ``key``; it is checked against ``like``
    (a tree of the same structure) when given. ``progress`` holds ``epoch`` (epochs completed),
    ``step`` (batches completed in that epoch) and the running sums of the epoch.
    """
    import nets

    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"load_run: expected a checkpoint {path}, found none")
    tree, meta = nets.load(path, like=like)
    tree = pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)
    return tree, json.loads(meta["progress"]), json.loads(meta["config"])


# --------------------------------------------------------------------------------------------
# The epoch loop


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


def _current_lr(opt_state) -> float | None:
    try:
        return optim.current_lr(opt_state)
    except ValueError:  # an optimizer without an lr field
        return None


def _read_history(path: Path, upto_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _write_history(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _table(history: list[dict]) -> str:
    def pct(v):
        return f"{100 * v:6.2f}" if v is not None else "     -"

    def num(v):
        return f"{v:6.4f}" if v is not None else "     -"

    lines = ["epoch  train_loss train_acc  val_loss val_acc  test_loss test_acc        lr    sec",
             "-----  ---------- ---------  -------- -------  --------- --------  -------- ------"]
    for h in history:
        lines.append(f"{h['epoch']:5d}  {num(h['train_loss']):>10} {pct(h['train_accuracy']):>9}  "
                     f"{num(h['val_loss']):>8} {pct(h['val_accuracy']):>7}  {num(h['test_loss']):>9} "
                     f"{pct(h['test_accuracy']):>8}  {h['lr'] or float('nan'):8.2e} {h['seconds']:6.1f}")
    return "\n".join(lines)


def fit(config: Mapping, *, net, opt, loss_fn: Callable, train: Dataset, val: Dataset | None = None,
        test: Dataset | None = None, run_dir: str | Path, resume: bool = False, max_epochs: int | None = None,
        on_step: Callable[[int, int], None] | None = None, stream=None,
        resume_command: str | None = None) -> FitResult:
    """Train ``net`` on ``train`` for ``config["epochs"]`` epochs, writing everything to ``run_dir``.

    ``config`` (JSON-able) must hold ``seed``, ``epochs``, ``batch_size`` and may hold ``device``
    (``"auto"``), ``bf16``, ``channels_last``, ``compile``, ``tta_flip``, ``tta_shift`` (0),
    ``crop`` (4), ``flip`` (True), ``cutout`` (0), ``eval_batch_size`` (1000) and ``model``.
    Each epoch drops its last partial batch.

    Writes ``config.json``, ``metrics.jsonl`` (one line per epoch), ``accuracy.png``,
    ``loss.png``, ``confusion.png`` and ``checkpoint.safetensors`` (after every epoch, and at the
    start). ``resume=True`` continues from that checkpoint; the result is bit-identical on the
    CPU to an uninterrupted run. ``max_epochs`` stops after that many completed epochs (status
    ``"stopped"``); ``on_step(epoch, step)`` is called before every step (a test hook).

    Raises:
      NonFiniteLossError: a NaN or infinite training loss; the checkpoint on disk is the last good one.
    """
    from .plots import plot_confusion, plot_curves

    config = dict(config)
    stream = sys.stderr if stream is None else stream
    run_dir = Path(run_dir)
    device = resolve_device(config.get("device", "auto"))
    batch_size, epochs = int(config["batch_size"]), int(config["epochs"])
    channels_last, bf16 = bool(config.get("channels_last")), bool(config.get("bf16"))
    steps_per_epoch = len(train.labels) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"fit: expected at least one batch of {batch_size} images, "
                         f"got {len(train.labels)} training images")
    keys = run_keys(int(config["seed"]))
    ckpt_path, metrics_path = run_dir / CHECKPOINT, run_dir / "metrics.jsonl"
    resume_command = resume_command or (f"python -m experiments.{config.get('model', 'cifar_model_b')} "
                                        f"--resume {run_dir}")

    params, state = net.init(keys["init"])
    opt_state = opt.init(params)
    if resume:
        tree, progress, _ = load_run(run_dir, like={"params": params, "state": state,
                                                        "opt_state": opt_state, "key": keys["train"]})
        params, state, opt_state = tree["params"], tree["state"], tree["opt_state"]
        if not torch.equal(tree["key"], keys["train"]):
            raise ValueError(f"fit: expected the checkpoint's key to derive from seed {config['seed']}, "
                             f"got a different key in {ckpt_path}")
        history = _read_history(metrics_path, progress["epoch"])
        print(f"resuming {run_dir} at epoch {progress['epoch'] + 1}, batch {progress['step']}",
              file=stream)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        progress = {"epoch": 0, "step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        history = []
        _write_history(metrics_path, history)
        _save_checkpoint(ckpt_path, params, state, opt_state, keys["train"], progress, config)

    to_dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    params, state, opt_state = (pytree.tree_map(to_dev, t) for t in (params, state, opt_state))
    if channels_last:
        params, opt_state = to_channels_last(params), to_channels_last(opt_state)
    step = make_step(net, opt, loss_fn, bf16=bf16, channels_last=channels_last,
                     compile=bool(config.get("compile")))
    predict = make_eval(net, tta_flip=bool(config.get("tta_flip")),
                        tta_shift=config.get("tta_shift", 0), bf16=bf16,
                        channels_last=channels_last)
    images, labels = train.images.to(device), train.labels.to(device)
    crop, flip = int(config.get("crop", 4)), bool(config.get("flip", True))
    cutout = int(config.get("cutout", 0))
    eval_bs = int(config.get("eval_batch_size", 1000))

    def save(p, s, o, prog):
        _save_checkpoint(ckpt_path, p, s, o, keys["train"], prog, config)

    status = "done"
    epoch = progress["epoch"]
    try:
        while epoch < epochs:
            if max_epochs is not None and epoch >= max_epochs:
                status = "stopped"
                break
            ek = jr.fold_in(keys["train"], epoch)
            order = jr.permutation(jr.fold_in(ek, _PERMUTE), len(labels)).to(device)
            step_root = jr.fold_in(ek, _STEP)
            bar = ProgressBar(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", stream=stream)
            t0 = time.perf_counter() - progress["seconds"]
            s = first_step = progress["step"]
            while s < steps_per_epoch:
                if on_step is not None:
                    on_step(epoch, s)
                idx = order[s * batch_size:(s + 1) * batch_size]
                sk = jr.fold_in(step_root, s)
                x = augment_batch(jr.fold_in(sk, _AUGMENT).to(device), images[idx], crop=crop, flip=flip,
                                  cutout=cutout)
                lr_now = _current_lr(opt_state)
                new = step(params, state, opt_state, (x, labels[idx]), jr.fold_in(sk, _DROPOUT).to(device))
                loss = new[3]["loss"].item()
                if not math.isfinite(loss):
                    raise NonFiniteLossError(
                        f"fit: expected a finite training loss, got {loss} at epoch {epoch + 1}, "
                        f"batch {s}; stopped without saving, so {ckpt_path} still holds the last "
                        "good checkpoint. Lower the learning rate or check the data.")
                s += 1
                nxt = {"epoch": epoch, "step": s, "loss_sum": progress["loss_sum"] + loss * len(idx),
                       "correct": progress["correct"] + int(new[3]["correct"].item()),
                       "seen": progress["seen"] + len(idx),
                       "seconds": time.perf_counter() - t0, "lr": lr_now}
                # One assignment, so a Ctrl-C never sees new parameters with old progress.
                params, state, opt_state, progress = new[0], new[1], new[2], nxt
                bar.update(s, (s - first_step) * batch_size, loss=progress["loss_sum"] / progress["seen"],
                           acc=progress["correct"] / progress["seen"])
            row = {"epoch": epoch + 1, "train_loss": progress["loss_sum"] / progress["seen"],
                   "train_accuracy": progress["correct"] / progress["seen"],
                   "val_loss": None, "val_accuracy": None, "test_loss": None, "test_accuracy": None,
                   "lr": progress.get("lr"),
                   "train_seconds": time.perf_counter() - t0}
            results = {}
            for split, data in (("val", val), ("test", test)):
                if data is not None and len(data.labels):
                    results[split] = evaluate(predict, params, state, data, device=device,
                                              batch_size=eval_bs)
                    row[f"{split}_loss"], row[f"{split}_accuracy"] = (results[split].loss,
                                                                      results[split].accuracy)
            row["seconds"] = time.perf_counter() - t0
            # History first, then the checkpoint: a resume drops rows past the checkpoint's epoch.
            history.append(row)
            _write_history(metrics_path, history)
            epoch += 1
            progress = {"epoch": epoch, "step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0,
                        "seconds": 0.0}
            save(params, state, opt_state, progress)
            plot_curves(history, run_dir, title=str(config.get("name", "")))
            last = results.get("test") or results.get("val")
            if last is not None:
                which = "test" if "test" in results else "val"
                plot_confusion(last.confusion, train.classes, run_dir / "confusion.png",
                               title=f"{which}, epoch {epoch}")
            summary = " ".join(f"{k} {100 * row[f'{k}_accuracy']:.2f}%" for k in ("train", "val", "test")
                               if row[f"{k}_accuracy"] is not None)
            bar.close(f"epoch {epoch}/{epochs}: loss {row['train_loss']:.4f} {summary} "
                      f"lr {row['lr'] or float('nan'):.2e} {row['seconds']:.1f}s")
    except KeyboardInterrupt:
        save(params, state, opt_state, progress)
        print(f"\ninterrupted: checkpoint saved at epoch {progress['epoch'] + 1}, batch "
              f"{progress['step']} in {ckpt_path}.\nresume with: {resume_command}", file=stream)
        return FitResult("interrupted", params, state, opt_state, history, run_dir)
    if status == "done":
        print(_table(history), file=stream)
    return FitResult(status, params, state, opt_state, history, run_dir)
