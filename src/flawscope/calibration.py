"""Decision thresholds from held-out images, in the raw score units of a model."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError, DataError

DEFAULT_TARGET_FPR = 0.01


def _typical_normal(normal_scores: np.ndarray, threshold: float) -> float:
    """Median of the normal scores below the threshold: the raw score the normalised scale maps to 0."""
    below = normal_scores[normal_scores < threshold]
    if below.size:
        return float(np.median(below))
    # No held-out normal is below the threshold: fall back to one score spread below it.
    return float(threshold - max(np.ptp(normal_scores), abs(threshold) * 1e-3, 1e-6))


def _off_the_score(threshold: float, scores: np.ndarray) -> float:
    """``threshold``, a calibration image's score, moved up off it: halfway to the next higher calibration score, or
    above the highest by a thousandth of the scores' spread (at least 1e-5 of its size). Every calibration image keeps
    its decision, and the image the threshold sat on no longer has a score equal to it, whose decision would hang on
    float rounding (torch at another batch size, ONNX Runtime: about 1e-7 of the score apart)."""
    higher = scores[scores > threshold]
    if higher.size:
        return float((threshold + higher.min()) / 2)
    return float(threshold + max(np.ptp(scores) * 1e-3, abs(threshold) * 1e-5, 1e-9))


def check_target_fpr(target_fpr: float) -> None:
    """Raises ConfigError unless ``target_fpr`` is in [0, 1) (NaN is not)."""
    if not 0 <= target_fpr < 1:
        raise ConfigError(f"target_fpr (--target-fpr) must be in [0, 1); got {target_fpr}.")


def _finite(scores: np.ndarray, what: str) -> np.ndarray:
    """``scores`` as float64, refused when any is NaN or infinite: a threshold set from them would be one too."""
    scores = np.asarray(scores, dtype=np.float64)
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise DataError(
            f"{bad} of {scores.size} {what} scores are NaN or infinite, so no threshold can be set; the model "
            "gives no usable score for those images (fit it again)."
        )
    return scores


def threshold_from_normals(normal_scores: np.ndarray, target_fpr: float = DEFAULT_TARGET_FPR) -> dict[str, Any]:
    """Just above the smallest held-out normal score that at most ``target_fpr`` of the normals exceed.

    An image is called defective when its score is strictly above the threshold, so on the held-out normals the
    false-positive rate is at most ``target_fpr`` (0 with fewer than ``1 / target_fpr`` images: just above their
    maximum). The threshold is moved off that score, halfway to the next higher one (``_off_the_score``).

    Args:
        normal_scores: (N,) raw scores of held-out good images.
        target_fpr: tolerated fraction of good images called defective, in [0, 1).

    Returns:
        dict with ``threshold``, ``score_low`` (median of the normal scores below the threshold, mapped to 0
        by the normalised score),
        ``rule`` and the counts used.
    """
    scores = np.sort(_finite(normal_scores, "good images'"))
    if scores.size == 0:
        raise DataError(
            "No good images to calibrate the threshold on: hold some out at fit time (--val-ratio > 0), or give "
            "`flawscope calibrate` a folder with test/good images."
        )
    check_target_fpr(target_fpr)
    # Normals allowed above the threshold; the epsilon keeps 0.29 * 100 (28.999...) at 29.
    allowed = int(np.floor(target_fpr * scores.size + 1e-9))
    threshold = _off_the_score(float(scores[scores.size - 1 - allowed]), scores)
    return {
        "threshold": float(threshold),
        "score_low": _typical_normal(scores, float(threshold)),
        "rule": f"quantile of held-out normal scores, target FPR {target_fpr:g}",
        "num_normal": int(scores.size),
    }


def threshold_f1(normal_scores: np.ndarray, defect_scores: np.ndarray) -> dict[str, Any]:
    """The F1-optimal threshold when labelled defects are available (never pass test images here).

    Returns:
        dict like :func:`threshold_from_normals`, plus the F1 reached on these images.
    """
    from .metrics import f1max

    normal, defect = _finite(normal_scores, "good images'"), _finite(defect_scores, "defective images'")
    if normal.size == 0 or defect.size == 0:
        fix = " (or the rule 'fpr', --rule fpr, which needs good images only)" if normal.size else ""
        raise DataError(
            f"F1-optimal calibration needs both good and defective held-out images; got {normal.size} good and "
            f"{defect.size} defective. Add the missing kind (test/good, test/<type>){fix}."
        )
    scores = np.concatenate([normal, defect])
    labels = np.concatenate([np.zeros(normal.size, bool), np.ones(defect.size, bool)])
    best_f1, cut = f1max(scores, labels)
    # f1max predicts defective at score >= cut; our decision is score > threshold, so the threshold lies between the
    # cut and the highest score below it, halfway (off both scores; _off_the_score). With no score below it (every
    # image called defective), step by more than float32 rounding: the model stores the threshold as float32, where a
    # float64 one-ulp step would round back onto the cut.
    below = scores[scores < cut]
    threshold = _off_the_score(float(below.max()), scores) if below.size else float(cut - max(abs(cut) * 1e-6, 1e-9))
    return {
        "threshold": threshold,
        "score_low": _typical_normal(normal, threshold),
        "rule": "F1-optimal on held-out labelled images",
        "f1": float(best_f1),
        "num_normal": int(normal.size),
        "num_defective": int(defect.size),
    }
