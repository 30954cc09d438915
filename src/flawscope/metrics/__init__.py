"""Exact anomaly-detection metrics: pure functions on numpy arrays or torch tensors.

Every distinct score is a threshold and equal scores enter together, so results match scikit-learn's exact
definitions (AUROC, average precision) and the MVTec AD definition of AUPRO without binning. Scores are compared
in the dtype they come in (float16/32/64; nothing is rounded). Memory stays bounded by sorting each class of
scores once (one copy of the scores) and counting by binary search; for AUPRO only the normal scores above the
max_fpr cut-off are sorted. ``pixel_metrics`` on 2,000 float32 maps of 256x256 peaks at about 2.1 GiB resident,
inputs included (see docs/benchmarks.md).

Undefined metrics raise :class:`~flawscope.errors.DataError` instead of returning NaN: AUROC, the ROC curve and
AUPRO need both classes; average precision, F1max and the PR curve need at least one positive. Constant scores
are well defined (AUROC 0.5). Shape mismatches, NaN scores and non-binary labels raise DataError too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flawscope.errors import DataError
from flawscope.metrics import _binary, _pro
from flawscope.metrics._binary import SortedScores
from flawscope.metrics._inputs import check_maps_masks, check_scores_labels, to_numpy

__all__ = [
    "aupro",
    "auroc",
    "average_precision",
    "f1max",
    "image_metrics",
    "pixel_metrics",
    "pixel_metrics_and_pro_curve",
    "pr_curve",
    "pro_curve",
    "roc_curve",
]


def _split(scores: Any, labels: Any) -> SortedScores:
    return SortedScores.from_labels(*check_scores_labels(scores, labels))


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (ties count one half), equal to ``sklearn.metrics.roc_auc_score``.

    Args:
        scores: (N,) scores, higher = more anomalous; any shape is flattened (pixel maps work too).
        labels: Same shape; bool or 0/1, 1 = anomalous.

    Returns:
        AUROC in [0, 1].

    Raises:
        DataError: if either class is absent (AUROC is undefined), or on invalid input.
    """
    return _binary.auroc(_split(scores, labels))


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision, step-wise without interpolation (``sklearn.metrics.average_precision_score``).

    Args:
        scores: (N,) scores, any shape flattened.
        labels: Same shape; bool or 0/1.

    Returns:
        AP in [0, 1]; with no negatives it is 1.

    Raises:
        DataError: if there is no positive, or on invalid input.
    """
    return _binary.average_precision(_split(scores, labels))


def f1max(scores: Any, labels: Any) -> tuple[float, float]:
    """Best F1 over every threshold.

    Args:
        scores: (N,) scores, any shape flattened.
        labels: Same shape; bool or 0/1.

    Returns:
        ``(f1, threshold)``: predicting anomalous when ``score >= threshold`` gives F1 = ``f1``; among equal F1
        values the highest threshold is returned. It is always one of the positive scores.

    Raises:
        DataError: if there is no positive, or on invalid input.
    """
    return _binary.f1max(_split(scores, labels))


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve with a point at every distinct score (sklearn's ``roc_curve(drop_intermediate=False)``).

    Args:
        scores: (N,) scores, any shape flattened.
        labels: Same shape; bool or 0/1.

    Returns:
        ``(fpr, tpr, thresholds)``, each (K + 1,) for K distinct scores: (0, 0) at threshold +inf first, then
        thresholds in descending order.

    Raises:
        DataError: if either class is absent, or on invalid input.
    """
    return _binary.roc_curve(_split(scores, labels))


def pr_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve at every distinct positive score (the points that ``average_precision`` sums).

    Args:
        scores: (N,) scores, any shape flattened.
        labels: Same shape; bool or 0/1.

    Returns:
        ``(precision, recall, thresholds)``, each (K,), thresholds descending and recall increasing to 1.

    Raises:
        DataError: if there is no positive, or on invalid input.
    """
    return _binary.pr_curve(_split(scores, labels))


class _Pixels:
    """Validated pixel inputs, flattened: scores (M,), bool masks (M,) and the region of each defect pixel."""

    def __init__(self, maps: Any, masks: Any) -> None:
        if isinstance(maps, (list, tuple)) or isinstance(masks, (list, tuple)):
            self._from_images(maps, masks)
        else:
            maps, masks = check_maps_masks(maps, masks)
            self.ids, self.num_regions = _pro.region_ids(masks)
            self.maps, self.masks = maps.reshape(-1), masks.reshape(-1)

    def _from_images(self, maps: Any, masks: Any) -> None:
        """One (H_i, W_i) map and mask per image, the sizes free to differ (evaluation at each image's own size)."""
        if len(maps) != len(masks) or not len(maps):
            raise DataError(
                f"maps and masks given per image must be two lists of equal, non-zero length; got {len(maps)} maps "
                f"and {len(masks)} masks."
            )
        flat_maps, flat_masks, ids, self.num_regions = [], [], [], 0
        for i, (m, k) in enumerate(zip(maps, masks, strict=True)):
            m, k = to_numpy(m), to_numpy(k)
            if m.ndim != 2 or m.shape != k.shape:
                raise DataError(
                    f"maps and masks given per image must be (H, W) arrays of one shape per image; image {i} has a "
                    f"map of shape {m.shape} and a mask of shape {k.shape}."
                )
            m, k = check_maps_masks(m[None], k[None])  # (1, H_i, W_i) each
            image_ids, count = _pro.region_ids(k)
            ids.append(image_ids + self.num_regions)
            self.num_regions += count
            flat_maps.append(m.reshape(-1))
            flat_masks.append(k.reshape(-1))
        self.maps, self.masks = np.concatenate(flat_maps), np.concatenate(flat_masks)
        self.ids = np.concatenate(ids)

    def pro_curve(self, max_fpr: float, neg_sorted: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """PRO curve; ``neg_sorted`` (all normal scores, ascending) skips the selection step."""
        num_neg = self.masks.size - self.ids.size
        _pro.require_pro_inputs(num_neg, self.num_regions)
        if neg_sorted is None:
            neg_sorted = _pro.top_sorted(self.maps[~self.masks], _pro.cutoff_count(num_neg, max_fpr))
        return _pro.pro_curve(neg_sorted, num_neg, self.maps[self.masks], self.ids, self.num_regions, max_fpr)


def pro_curve(maps: Any, masks: Any, max_fpr: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve (MVTec AD), exact, from FPR 0 up to ``max_fpr``.

    Regions are the 8-connected components of each mask; PRO is the mean over all regions of the fraction of the
    region at or above the threshold, FPR the fraction of all normal pixels at or above it.

    Args:
        maps: (N, H, W) or (N, 1, H, W) anomaly maps, float16/32/64; or a list of (H_i, W_i) maps, one per image
            at its own size (regions never join across images).
        masks: Same shape (or a list of the same shapes); bool or 0/1, True = defect.
        max_fpr: FPR limit in (0, 1].

    Returns:
        ``(fpr, pro)``, each (L,) float64: the corners of the exact curve (no points inside its flat runs),
        starting at (0, 0) and ending at fpr = ``max_fpr`` with PRO interpolated linearly there.

    Raises:
        DataError: with no defect or no normal pixel, or on invalid input.
        ConfigError: if ``max_fpr`` is outside (0, 1].
    """
    max_fpr = _pro.check_max_fpr(max_fpr)
    return _Pixels(maps, masks).pro_curve(max_fpr)


def _area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    # Written out because np.trapezoid needs numpy 2 and np.trapz is gone from it.
    return float(np.dot(np.diff(fpr), pro[1:] + pro[:-1])) / (2 * max_fpr)


def aupro(maps: Any, masks: Any, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve up to ``max_fpr`` (trapezoid rule), divided by ``max_fpr``.

    Args:
        maps: (N, H, W) or (N, 1, H, W) anomaly maps; or a list of (H_i, W_i) maps.
        masks: Same shape (or a list of the same shapes); bool or 0/1.
        max_fpr: FPR limit in (0, 1]; 0.3 as in MVTec AD.

    Returns:
        AUPRO in [0, 1].

    Raises:
        DataError: with no defect or no normal pixel, or on invalid input.
        ConfigError: if ``max_fpr`` is outside (0, 1].
    """
    max_fpr = _pro.check_max_fpr(max_fpr)
    return _area(*_Pixels(maps, masks).pro_curve(max_fpr), max_fpr)


def image_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """Image-level AUROC, AP and F1max from one sort.

    Args:
        scores: (N,) image scores.
        labels: (N,) bool or 0/1, 1 = defective image.

    Returns:
        Dict with keys ``image_auroc``, ``image_ap``, ``image_f1max``, ``image_f1_threshold``.

    Raises:
        DataError: if only normal or only defective images are given (AUROC is undefined), or on invalid input.
    """
    scores = _split(scores, labels)
    f1, threshold = _binary.f1max(scores)
    return {
        "image_auroc": _binary.auroc(scores),
        "image_ap": _binary.average_precision(scores),
        "image_f1max": f1,
        "image_f1_threshold": threshold,
    }


def pixel_metrics(maps: Any, masks: Any, max_fpr: float = 0.3) -> dict[str, float]:
    """Pixel-level AUROC, AP, F1max and AUPRO, sharing one sort of the normal and defect scores.

    Args:
        maps: (N, H, W) or (N, 1, H, W) anomaly maps, float16/32/64; or a list of (H_i, W_i) maps, one per image
            at its own size (AUPRO's regions never join across images).
        masks: Same shape (or a list of the same shapes); bool or 0/1, True = defect.
        max_fpr: FPR limit of AUPRO in (0, 1].

    Returns:
        Dict with keys ``pixel_auroc``, ``pixel_ap``, ``pixel_f1max``, ``pixel_aupro``.

    Raises:
        DataError: with no defect or no normal pixel, or on invalid input.
        ConfigError: if ``max_fpr`` is outside (0, 1].
    """
    return pixel_metrics_and_pro_curve(maps, masks, max_fpr)[0]


def pixel_metrics_and_pro_curve(
    maps: Any, masks: Any, max_fpr: float = 0.3
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """``pixel_metrics`` and the PRO curve of ``pro_curve`` from one pass over the inputs (one validation,
    flattening and region labelling, one sort), as a report needs both. Arguments and errors as ``pixel_metrics``."""
    max_fpr = _pro.check_max_fpr(max_fpr)
    pixels = _Pixels(maps, masks)
    scores = SortedScores.from_labels(pixels.maps, pixels.masks)
    scores.require("Pixel AUROC", need_neg=True)
    curve = pixels.pro_curve(max_fpr, scores.neg)
    metrics = {
        "pixel_auroc": _binary.auroc(scores),
        "pixel_ap": _binary.average_precision(scores),
        "pixel_f1max": _binary.f1max(scores)[0],
        "pixel_aupro": _area(*curve, max_fpr),
    }
    return metrics, curve
