"""Evaluation: a net's logits over a whole split in batches, and the numbers reported from them.

* :func:`logits_in_batches` is the one loop over a split: ``predict`` (from
  :func:`experiments.train.step.make_eval`) on ``prepare(x[i:i + batch_size])``.
* :func:`evaluate` reduces it to an :class:`EvalResult` (loss, accuracy, confusion matrix);
  :func:`scores` to :class:`Scores` (accuracy and mean per-class recall).

``prepare`` maps stored examples to the net's input (e.g. a data set's normalisation of uint8
images); the data set or recipe supplies it, nothing here knows the data set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch

import layers

__all__ = ["logits_in_batches", "predict_all", "EvalResult", "evaluate", "Scores", "scores", "score_net"]


def logits_in_batches(predict: Callable, params, state, x: torch.Tensor, *, batch_size: int = 1000,
                      prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
    """``predict(params, state, prepare(x[i:i + batch_size].to(device)))`` for consecutive batches."""
    if batch_size < 1:
        raise ValueError(f"logits_in_batches: expected batch_size >= 1, got {batch_size}")
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        if device is not None:
            xb = xb.to(device)
        yield predict(params, state, xb if prepare is None else prepare(xb))


def predict_all(predict: Callable, params, state, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """``(N, K)`` float32 logits of all of ``x``, on the CPU (:func:`logits_in_batches`)."""
    out = [logits.float().cpu() for logits in logits_in_batches(predict, params, state, x, **kwargs)]
    if not out:
        raise ValueError("predict_all: expected at least one example, got none")
    return torch.cat(out)


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


def evaluate(predict: Callable, params, state, data, *, device: torch.device | str | None = None,
             batch_size: int = 1000,
             prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EvalResult:
    """Run ``predict`` over ``data`` (``.images``, ``.labels`` (N,) int64, ``.classes``) in
    batches: plain (unsmoothed) mean cross-entropy, accuracy and the confusion matrix."""
    k = len(data.classes)
    loss_sum, preds = 0.0, []
    for i, logits in enumerate(logits_in_batches(predict, params, state, data.images,
                                                 batch_size=batch_size, prepare=prepare,
                                                 device=device)):
        y = data.labels[i * batch_size:(i + 1) * batch_size].to(logits.device)
        loss_sum += layers.cross_entropy(logits, y, reduction="sum").item()
        preds.append(logits.argmax(-1).cpu())
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
    n = max(len(data.labels), 1)
    confusion = torch.bincount(data.labels * k + pred, minlength=k * k).reshape(k, k)
    return EvalResult(loss_sum / n, (pred == data.labels).sum().item() / n, confusion, pred)


class Scores(NamedTuple):
    """Accuracy (fraction of examples right) and mean per-class recall (the mean over classes
    of the fraction of that class's examples right: equal to accuracy on a balanced set)."""

    accuracy: float
    mean_recall: float


def score_net(net, params, state, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
              batch_size: int = 500,
              prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Scores:
    """:class:`Scores` of ``net`` (eval mode) on ``x`` against ``y``, in batches."""
    from .step import make_eval

    logits = predict_all(make_eval(net), params, state, x, batch_size=batch_size, prepare=prepare)
    return scores(logits, y, num_classes)


def scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Scores:
    """:class:`Scores` of ``logits (N, K)`` against ``labels (N,)``; absent classes are skipped."""
    pred = logits.argmax(-1).cpu()
    labels = labels.cpu()
    right = (pred == labels).double()
    per_class = [right[labels == c].mean().item() for c in range(num_classes) if (labels == c).any()]
    return Scores(right.mean().item(), sum(per_class) / len(per_class))
