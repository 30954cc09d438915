"""Exact binary-classification metrics from scores split by label and sorted once.

Every metric here is computed from counts of positives and negatives at or above candidate thresholds, found by
binary search in the two sorted score arrays. Equal scores therefore always enter together (ties are exact), no
score is rounded or binned, and memory is one copy of the scores plus O(distinct positive scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from flawscope.errors import DataError


@dataclass(frozen=True)
class Counts:
    """Counts at the distinct positive scores, the only thresholds where recall changes.

    Any other threshold has the recall of the next positive score above it and at least as many false positives,
    so AUROC, AP, F1max and the PR curve lose nothing by skipping it.

    Attributes:
        thresholds: (K,) distinct positive scores, descending.
        tp: (K,) int64 positives >= threshold.
        fp: (K,) int64 negatives >= threshold.
        fp_above: (K,) int64 negatives > threshold.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fp_above: np.ndarray


@dataclass(frozen=True)
class SortedScores:
    """Scores split by label, each sorted ascending.

    Attributes:
        pos: (P,) scores of positive (anomalous) samples.
        neg: (Q,) scores of negative (normal) samples.
    """

    pos: np.ndarray
    neg: np.ndarray

    @classmethod
    def from_labels(cls, scores: np.ndarray, labels: np.ndarray) -> SortedScores:
        """Splits (M,) scores by (M,) bool labels; the boolean indexing makes the copies that are sorted in place."""
        pos, neg = scores[labels], scores[~labels]
        pos.sort()
        neg.sort()
        return cls(pos, neg)

    @cached_property
    def counts(self) -> Counts:
        """Counts shared by every metric, computed on first use (one binary search per distinct positive score)."""
        thresholds = distinct_descending(self.pos)
        return Counts(thresholds, count_at_least(self.pos, thresholds), *count_at_least_and_above(self.neg, thresholds))

    def require(self, metric: str, *, need_neg: bool) -> None:
        """Raises DataError when ``metric`` is undefined: no positives, or no negatives when ``need_neg``."""
        if self.pos.size == 0 or (need_neg and self.neg.size == 0):
            needs = "at least one positive and one negative sample" if need_neg else "at least one positive sample"
            raise DataError(
                f"{metric} is undefined: it needs {needs}; got {self.pos.size} positive (anomalous) and "
                f"{self.neg.size} negative (normal). Evaluate on data with both classes, or report it as missing."
            )


def count_at_least(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Counts values >= each threshold.

    Args:
        sorted_values: (M,) ascending.
        thresholds: (K,) any order.

    Returns:
        (K,) int64 counts.
    """
    return sorted_values.size - np.searchsorted(sorted_values, thresholds).astype(np.int64)


def count_at_least_and_above(sorted_values: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts values >= and values > each threshold.

    A value equal to a threshold is rare with continuous scores, so the second binary search only runs for the
    thresholds that occur in ``sorted_values``; with quantised scores there are few distinct thresholds anyway.

    Args:
        sorted_values: (M,) ascending.
        thresholds: (K,) any order.

    Returns:
        ``(at_least, above)``, each (K,) int64.
    """
    if sorted_values.size == 0:
        return np.zeros(thresholds.size, dtype=np.int64), np.zeros(thresholds.size, dtype=np.int64)
    left = np.searchsorted(sorted_values, thresholds).astype(np.int64)
    right = left.copy()
    tied = np.flatnonzero(sorted_values[np.minimum(left, sorted_values.size - 1)] == thresholds)
    right[tied] = np.searchsorted(sorted_values, thresholds[tied], side="right")
    return sorted_values.size - left, sorted_values.size - right


def distinct_descending(values: np.ndarray) -> np.ndarray:
    """Distinct values of an ascending array, in descending order: (M,) -> (K,)."""
    keep = np.ones(values.size, dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep][::-1]


def auroc(scores: SortedScores) -> float:
    """Area under the ROC curve, exact, ties counted as half (the trapezoid rule on the exact ROC curve).

    Uses the Mann-Whitney form: the fraction of (positive, negative) pairs ordered correctly. Only the distinct
    positive scores are searched in the sorted negatives, so the cost after sorting is O(K log Q).
    """
    scores.require("AUROC", need_neg=True)
    counts = scores.counts
    num_pos_here = np.diff(counts.tp, prepend=0)  # positives equal to each threshold
    # Doubled so the half-weighted ties stay integers; products stay far below 2**63 for any realistic size.
    num_below_twice = 2 * scores.neg.size - counts.fp - counts.fp_above
    pairs_twice = int(np.dot(num_pos_here, num_below_twice))
    return pairs_twice / (2 * scores.pos.size * scores.neg.size)


def average_precision(scores: SortedScores) -> float:
    """Average precision as scikit-learn defines it: sum of precision times recall increase, no interpolation."""
    scores.require("Average precision", need_neg=False)
    tp, fp = scores.counts.tp, scores.counts.fp
    recall_gain = np.diff(tp, prepend=0) / scores.pos.size
    return float(np.dot(recall_gain, tp / (tp + fp)))


def f1max(scores: SortedScores) -> tuple[float, float]:
    """Best F1 over all thresholds, and the highest threshold reaching it (predict anomalous when score >= it).

    F1 can only peak at a positive score (see ``Counts``), so those thresholds cover the full sweep.
    """
    scores.require("F1max", need_neg=False)
    counts = scores.counts
    f1 = 2 * counts.tp / (counts.tp + counts.fp + scores.pos.size)
    best = int(np.argmax(f1))
    return float(f1[best]), float(counts.thresholds[best])


def roc_curve(scores: SortedScores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve at every distinct score, like ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.

    Returns:
        ``(fpr, tpr, thresholds)``, each (K + 1,): the first point is (0, 0) at threshold +inf, then one point per
        distinct score in descending order. Memory is O(distinct scores), so subsample before plotting pixels.
    """
    scores.require("The ROC curve", need_neg=True)
    thresholds = distinct_descending(np.sort(np.concatenate((scores.pos, scores.neg))))
    # Counted in the scores' own dtype; a float64 +inf would make searchsorted upcast whole arrays.
    tp, fp = (np.concatenate(([0], count_at_least(values, thresholds))) for values in (scores.pos, scores.neg))
    thresholds = np.concatenate(([np.inf], thresholds.astype(np.float64)))
    return fp / scores.neg.size, tp / scores.pos.size, thresholds


def pr_curve(scores: SortedScores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve at every distinct positive score.

    Thresholds between positive scores add points with the same recall and lower precision, so they are left out;
    this keeps the pixel-level curve small and gives exactly the points that ``average_precision`` sums over.

    Returns:
        ``(precision, recall, thresholds)``, each (K,), thresholds descending (recall increasing).
    """
    scores.require("The precision-recall curve", need_neg=False)
    counts = scores.counts
    return counts.tp / (counts.tp + counts.fp), counts.tp / scores.pos.size, counts.thresholds
