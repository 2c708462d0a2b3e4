"""Two classifiers on the same images: the paired difference in accuracy and McNemar's exact test.

On a held-out split of ``n`` images, two runs that differ in one setting differ by a few tenths of
a point, about the binomial noise of one run's accuracy (``sqrt(a (1 - a) / n)``: 0.42 points at
90% on 5,000 images). Because both nets see the *same* images, the comparison can use only the
images on which they disagree. Of those, A alone is right on ``b`` and B alone on ``c``:

    accuracy(A) - accuracy(B) = (b - c) / n
    stderr                    = sqrt(b + c - (b - c)^2 / n) / n        (paired proportions)

Under the hypothesis "A and B are equally accurate", each of the ``m = b + c`` discordant images
is A's with probability 1/2, so ``b ~ Binomial(m, 1/2)`` and McNemar's exact two-sided p-value is

    p = min(1, 2 * sum_{i = 0}^{min(b, c)} C(m, i) / 2^m)               (p = 1 when m = 0)

computed here in exact integer arithmetic. A small ``p`` says the difference is unlikely to be
the luck of which images landed in the split; it says nothing of seed-to-seed variation in
training, which a single pair of runs cannot measure.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["PairedComparison", "compare_predictions", "mcnemar_exact_p"]


class PairedComparison(NamedTuple):
    """``n`` images; ``both`` right for both nets, ``only_a`` / ``only_b`` right for one of them;
    ``difference`` = accuracy(A) - accuracy(B) as a fraction, ``stderr`` its standard error,
    ``p_value`` McNemar's exact two-sided p-value."""

    n: int
    both: int
    only_a: int
    only_b: int
    difference: float
    stderr: float
    p_value: float

    def describe(self, name_a: str = "A", name_b: str = "B") -> str:
        """One line: the difference in points with its 95% interval, the discordant counts, p."""
        return (f"{name_a} - {name_b}: {100 * self.difference:+.2f} points "
                f"(95% interval +-{100 * 1.96 * self.stderr:.2f}) on {self.n} images; "
                f"{name_a} alone right on {self.only_a}, {name_b} alone on {self.only_b}; "
                f"McNemar exact p = {self.p_value:.3g}")


def mcnemar_exact_p(b: int, c: int) -> float:
    """``min(1, 2 P[X <= min(b, c)])`` for ``X ~ Binomial(b + c, 1/2)``, exactly."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    # Python divides integers of any size with one correct rounding to float
    return min(1.0, (2 * tail) / (1 << m))


def compare_predictions(pred_a: torch.Tensor, pred_b: torch.Tensor,
                        labels: torch.Tensor) -> PairedComparison:
    """Paired comparison of two nets' class predictions ``(N,)`` on the same images with
    ``labels (N,)``; ValueError when the three do not have one shape."""
    pred_a, pred_b, labels = (torch.as_tensor(t).cpu() for t in (pred_a, pred_b, labels))
    if not (pred_a.shape == pred_b.shape == labels.shape) or labels.dim() != 1:
        raise ValueError(f"compare_predictions: expected predictions and labels of one shape (N,), "
                         f"got {tuple(pred_a.shape)}, {tuple(pred_b.shape)} and {tuple(labels.shape)}")
    right_a, right_b = pred_a == labels, pred_b == labels
    n = labels.numel()
    both = int((right_a & right_b).sum())
    b = int((right_a & ~right_b).sum())
    c = int((~right_a & right_b).sum())
    if n == 0:
        return PairedComparison(0, 0, 0, 0, 0.0, 0.0, 1.0)
    stderr = math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    return PairedComparison(n, both, b, c, (b - c) / n, stderr, mcnemar_exact_p(b, c))
