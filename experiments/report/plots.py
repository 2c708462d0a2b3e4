"""Figures of a training run (matplotlib, Agg backend, PNG): accuracy and loss curves per epoch
for the train / val / test splits, and a confusion matrix.

    run.after_epoch.append(plot_run)      # the curves and the confusion matrix after every epoch
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from nets.checkpoint import atomic_write  # noqa: E402

from ..common.progress import member_mean  # noqa: E402

__all__ = ["plot_curves", "plot_confusion", "plot_run", "save_figure"]

#: Up to this many epochs, every epoch is a tick (so a 1-epoch run is not drawn at 0.96, 0.98, ...).
_EVERY_EPOCH_TICKED = 12

_SPLITS = (("train", "tab:blue"), ("val", "tab:orange"), ("test", "tab:green"))


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """Render ``fig`` to PNG and write it atomically (a killed run leaves the old picture, never
    half of a new one); the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
    return path


def _curve(history: Sequence[Mapping], metric: str, path: Path, ylabel: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    epochs = [h["epoch"] for h in history]
    for split, color in _SPLITS:
        values = [h.get(f"{split}_{metric}") for h in history]
        pts = [(e, v) for e, v in zip(epochs, values) if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, color=color, label=split)
    ax.set_xlabel("epoch")
    _epoch_ticks(ax, epochs)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _epoch_ticks(ax, epochs: Sequence[int]) -> None:
    """Whole-number epoch ticks: each epoch when there are few (one epoch: a tick at 1 on an axis
    one epoch wide either side), else whole numbers chosen by matplotlib."""
    shown = sorted(set(epochs))
    if 0 < len(shown) <= _EVERY_EPOCH_TICKED:
        ax.set_xticks(shown)
        if len(shown) == 1:
            ax.set_xlim(shown[0] - 1, shown[0] + 1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(history: Sequence[Mapping], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``accuracy.png`` and ``loss.png`` in ``out_dir`` from per-epoch metric records.

    Each record holds ``epoch`` and any of ``{train,val,test}_{loss,accuracy}`` (accuracy as a
    fraction; plotted in percent). Returns the two paths.
    """
    out_dir = Path(out_dir)
    pct = [{k: (v * 100 if k.endswith("_accuracy") and v is not None else v) for k, v in h.items()}
           for h in history]
    acc, loss = out_dir / "accuracy.png", out_dir / "loss.png"
    _curve(pct, "accuracy", acc, "accuracy (%)", f"{title} accuracy".strip())
    _curve(history, "loss", loss, "cross-entropy loss", f"{title} loss".strip())
    return [acc, loss]


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: str | Path,
                   title: str = "confusion matrix") -> Path:
    """Write a confusion-matrix PNG: ``confusion[t, p]`` counts images of class t predicted as p.

    Cells are coloured by the row-normalised rate and annotated with the count.
    """
    confusion = torch.as_tensor(confusion).to(torch.int64).cpu()
    k = len(classes)
    if tuple(confusion.shape) != (k, k):
        raise ValueError(f"plot_confusion: expected a ({k}, {k}) matrix for {k} classes, "
                         f"got {tuple(confusion.shape)}")
    rate = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k), dpi=120)
    ax.imshow(rate.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    for t in range(k):
        for p in range(k):
            ax.text(p, t, str(int(confusion[t, p])), ha="center", va="center", fontsize=7,
                    color="white" if rate[t, p] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = confusion.diag().sum().item() / max(confusion.sum().item(), 1)
    ax.set_title(f"{title} (accuracy {100 * acc:.2f}%)")
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path


def plot_run(run, history: Sequence[Mapping], results: Mapping, classes: Sequence[str]) -> list[Path]:
    """The figures of a run after an epoch, in its folder ``run.dir``: ``accuracy.png`` and
    ``loss.png`` of the history so far (an ensemble's: the mean over its members whose values
    are finite) and ``confusion.png`` of the last evaluation (test, else val; not for an
    ensemble). Fits ``Run.after_epoch`` (:mod:`experiments.train.lifecycle`)."""
    title = run.config.name
    if any(isinstance(row["train_loss"], list) for row in history):   # an ensemble: means
        means = [{k: member_mean(v) if isinstance(v, list) else v for k, v in row.items()}
                 for row in history]
        return plot_curves(means, run.dir, title=f"{title} (mean over the members)")
    written = plot_curves(history, run.dir, title=title)
    which = "test" if "test" in results else ("val" if "val" in results else None)
    if which is not None:
        written.append(plot_confusion(results[which].confusion, classes, run.dir / "confusion.png",
                                      title=f"{which}, epoch {history[-1]['epoch']}"))
    return written
