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
             prepare: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Run ``predict`` over ``data`` (``.images``, ``.labels`` (N,) int64, ``.classes``) in
    batches: plain (unsmoothed) mean cross-entropy, accuracy and the confusion matrix.

    Returns an :class:`EvalResult`, or a list of them, one per member, when ``predict`` gives an
    ensemble's logits ``(K, B, classes)``.
    """
    k = len(data.classes)
    loss_sums, preds, members = None, [], None
    for i, logits in enumerate(logits_in_batches(predict, params, state, data.images,
                                                 batch_size=batch_size, prepare=prepare,
                                                 device=device)):
        y = data.labels[i * batch_size:(i + 1) * batch_size].to(logits.device)
        per_member = logits if logits.dim() == 3 else logits[None]
        members = per_member.shape[0] if logits.dim() == 3 else None
        sums = [layers.cross_entropy(m, y, reduction="sum").item() for m in per_member]
        loss_sums = sums if loss_sums is None else [a + b for a, b in zip(loss_sums, sums)]
        preds.append(per_member.argmax(-1).cpu())
    n = max(len(data.labels), 1)
    if not preds:
        return EvalResult(0.0, 0.0, torch.zeros(k, k, dtype=torch.int64),
                          torch.zeros(0, dtype=torch.int64))
    pred = torch.cat(preds, dim=-1)
    results = []
    for loss_sum, p in zip(loss_sums, pred):
        confusion = torch.bincount(data.labels * k + p, minlength=k * k).reshape(k, k)
        results.append(EvalResult(loss_sum / n, (p == data.labels).sum().item() / n, confusion, p))
    return results if members is not None else results[0]


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
