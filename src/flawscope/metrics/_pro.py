"""Exact per-region overlap (PRO) curve and AUPRO, as defined for MVTec AD.

PRO(t) is the mean, over all ground-truth regions (8-connected components of each mask), of the fraction of the
region's pixels scoring >= t; FPR(t) is the fraction of all normal pixels scoring >= t. Sweeping every distinct
score gives a polyline that is flat wherever only normal pixels enter, so its corners sit at the distinct defect
scores: just above a defect score u (FPR counts normal pixels > u) and at u (>= u, ties entering together).
Those 2K corners are computed from the sorted defect pixels and binary searches in the sorted normal scores.
Only normal scores above the max_fpr cut-off matter, so they are selected with ``np.partition`` and only that
top part is sorted. Nothing is binned or rounded; memory is one copy of the normal scores plus the defect pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from flawscope.errors import ConfigError, DataError
from flawscope.metrics._binary import count_at_least_and_above

# Pixels labelled per call: bounds the int32 label buffer to 64 MiB whatever the number and size of the maps.
_LABEL_CHUNK_PIXELS = 2**24
# 8-connectivity inside an image, none across the image axis, so one call labels a whole chunk of images.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


def check_max_fpr(max_fpr: float) -> float:
    """Returns ``max_fpr`` as a float after checking it lies in (0, 1]."""
    if not 0.0 < max_fpr <= 1.0:
        raise ConfigError(f"max_fpr must be in (0, 1]; got {max_fpr}. The MVTec AD convention is 0.3.")
    return float(max_fpr)


def region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels the 8-connected regions of each mask.

    Args:
        masks: (N, H, W) bool.

    Returns:
        ``(ids, num_regions)``: ids (D,) int64 in [0, num_regions), the region of each defect pixel in the
        C order of ``masks[masks]``.
    """
    ids, num_regions = [np.zeros(0, dtype=np.int64)], 0
    # Defect-free images hold no region and no defect pixel, so only the others are labelled.
    defective = np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1))
    step = max(1, _LABEL_CHUNK_PIXELS // (masks.shape[1] * masks.shape[2]))
    for start in range(0, defective.size, step):
        chunk = masks[defective[start : start + step]]
        labels, num = ndimage.label(chunk, structure=_STRUCTURE)
        ids.append(labels[chunk].astype(np.int64) + (num_regions - 1))
        num_regions += num
    return np.concatenate(ids), num_regions


def top_sorted(values: np.ndarray, count: int) -> np.ndarray:
    """Every value >= the ``count``-th largest one (ties included), sorted ascending.

    Args:
        values: (M,) array that may be reordered in place (the caller's own copy).
        count: in [1, M].

    Returns:
        (>= count,) ascending.
    """
    kth = values.size - count
    values.partition(kth)
    head, cutoff = values[:kth], values[kth]
    top = np.concatenate((head[head == cutoff], values[kth:]))
    top.sort()
    return top


def cutoff_count(num_neg: int, max_fpr: float) -> int:
    """How many of the highest normal scores decide the curve up to ``max_fpr``.

    The curve crosses FPR = max_fpr at the first threshold whose false-positive count exceeds max_fpr * num_neg, so
    the normal scores down to that threshold suffice (one spare count absorbs rounding of the product).
    """
    return min(num_neg, int(np.floor(max_fpr * num_neg)) + 2)


def pro_curve(
    neg_top: np.ndarray, num_neg: int, defect: np.ndarray, ids: np.ndarray, num_regions: int, max_fpr: float
) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve from FPR 0 to ``max_fpr``, exact: its corners only, as points on flat runs add nothing.

    Args:
        neg_top: ascending normal scores holding at least every one >= the ``cutoff_count``-th largest.
        num_neg: number of all normal pixels.
        defect: (D,) defect-pixel scores.
        ids: (D,) region of each defect pixel, in [0, num_regions).
        num_regions: number of ground-truth regions.
        max_fpr: upper FPR limit; the last point is interpolated linearly at exactly this FPR.

    Returns:
        ``(fpr, pro)``, each (L,) float64, fpr non-decreasing from 0 to max_fpr.
    """
    order = np.argsort(defect)[::-1]  # tie order is irrelevant: ties are grouped below
    scores = defect[order]
    region_size = np.bincount(ids, minlength=num_regions)
    pro_gain = np.cumsum(1.0 / (num_regions * region_size[ids[order]]))
    last_of_tie = np.ones(scores.size, dtype=bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    thresholds, pro_at = scores[last_of_tie], pro_gain[last_of_tie]

    # Corners: (FP > u, PRO before u) then (FP >= u, PRO at u), for each distinct defect score u, descending.
    fp = np.empty(2 * thresholds.size + 2, dtype=np.int64)
    pro = np.empty(fp.size, dtype=np.float64)
    fp[0], pro[0] = 0, 0.0
    fp[2:-1:2], fp[1:-1:2] = count_at_least_and_above(neg_top, thresholds)
    pro[1:-1:2] = np.concatenate(([0.0], pro_at[:-1]))
    pro[2:-1:2] = pro_at
    fp[-1], pro[-1] = num_neg, pro_at[-1]
    return _clip(fp / num_neg, pro, max_fpr)


def _clip(x: np.ndarray, y: np.ndarray, x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a polyline with non-decreasing x at ``x_max``, interpolating the last point; drops repeated points."""
    end = int(np.searchsorted(x, x_max, side="right"))
    x_cut, y_cut = x[:end], y[:end]
    if end < x.size and x_cut[-1] < x_max:
        y_max = y[end - 1] + (y[end] - y[end - 1]) * (x_max - x[end - 1]) / (x[end] - x[end - 1])
        x_cut, y_cut = np.append(x_cut, x_max), np.append(y_cut, y_max)
    keep = np.ones(x_cut.size, dtype=bool)
    keep[1:] = (np.diff(x_cut) != 0) | (np.diff(y_cut) != 0)
    return x_cut[keep], y_cut[keep]


def require_pro_inputs(num_neg: int, num_regions: int) -> None:
    """Raises DataError when the PRO curve is undefined (no defect region or no normal pixel)."""
    if num_regions == 0 or num_neg == 0:
        raise DataError(
            f"AUPRO is undefined: it needs at least one defect region and one normal pixel; got {num_regions} "
            f"region(s) and {num_neg} normal pixel(s). Evaluate on a set with defective and normal pixels, "
            "or report the metric as missing."
        )
