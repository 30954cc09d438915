"""Input conversion and validation shared by every metric: arrays or tensors in, checked numpy arrays out."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from flawscope.errors import DataError


def to_numpy(x: Any) -> np.ndarray:
    """Converts a numpy array, torch tensor or array-like to a numpy array, sharing memory where possible.

    Torch is looked up in ``sys.modules`` rather than imported: a tensor cannot exist unless torch is loaded,
    and importing it just to say "not a tensor" would cost a second on every call.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        # numpy has no bfloat16; float32 holds every bfloat16 value exactly.
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_scores(x: np.ndarray, name: str) -> np.ndarray:
    """Keeps float16/32/64 as given (compared exactly in their own dtype); other numbers become float64."""
    if x.dtype.kind != "f":
        if x.dtype.kind not in "biu":
            raise DataError(f"{name} must be numeric; got dtype {x.dtype}.")
        x = x.astype(np.float64)
    # max() propagates NaN without the full-size temporary of isnan(); the count is only made for the message.
    if np.isnan(x.max()):
        num_nan = int(np.count_nonzero(np.isnan(x)))
        raise DataError(
            f"{name} contain {num_nan} NaN value(s) out of {x.size}; every score must be a number. "
            "Check the model output (a NaN usually comes from a division by zero or an unfitted statistic)."
        )
    return x


def _as_binary(x: np.ndarray, name: str) -> np.ndarray:
    """Returns a bool array; integer or float inputs must hold only 0 and 1."""
    if x.dtype == np.bool_:
        return x
    if x.dtype.kind not in "biuf" or not np.all((x == 0) | (x == 1)):
        values = np.unique(x)[:5] if x.dtype.kind in "biuf" else x.dtype
        raise DataError(
            f"{name} must be binary (bool, or numbers that are 0 or 1); got {values}. "
            f"Convert it first, e.g. {name} > 0 for masks stored as 0/255."
        )
    return x.astype(bool)


def _check_same_shape(scores: np.ndarray, labels: np.ndarray, score_name: str, label_name: str) -> None:
    if scores.shape != labels.shape:
        raise DataError(
            f"{score_name} and {label_name} must have the same shape; got {score_name} {scores.shape} and "
            f"{label_name} {labels.shape}. Resize one to the other (nearest-neighbour for masks) before scoring."
        )
    if scores.size == 0:
        raise DataError(f"{score_name} and {label_name} are empty (shape {scores.shape}); nothing to evaluate.")


def check_scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validates scores and binary labels of equal shape.

    Args:
        scores: Scores of any shape (usually (N,)), higher meaning more anomalous.
        labels: Same shape as ``scores``; bool or 0/1, 1 = anomalous.

    Returns:
        Flattened ``(scores (M,) float, labels (M,) bool)``.

    Raises:
        DataError: on a shape mismatch, empty input, NaN scores or non-binary labels.
    """
    scores, labels = to_numpy(scores), to_numpy(labels)
    _check_same_shape(scores, labels, "scores", "labels")
    return _as_scores(scores, "scores").reshape(-1), _as_binary(labels, "labels").reshape(-1)


def check_maps_masks(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validates anomaly maps and ground-truth masks.

    Args:
        maps: (N, H, W) or (N, 1, H, W) anomaly maps, any float dtype.
        masks: Same shape as ``maps``; bool or 0/1, True = defect pixel.

    Returns:
        ``(maps (N, H, W), masks (N, H, W) bool)``; views of the inputs where no conversion is needed.

    Raises:
        DataError: on a shape mismatch or a shape that is not (N, H, W), empty input, NaN scores, non-binary masks.
    """
    maps, masks = to_numpy(maps), to_numpy(masks)
    _check_same_shape(maps, masks, "maps", "masks")
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps, masks = maps[:, 0], masks[:, 0]
    if maps.ndim != 3:
        raise DataError(
            f"maps and masks must have shape (N, H, W) or (N, 1, H, W); got {maps.shape}. "
            "Stack single maps with np.stack or add a batch axis with x[None]."
        )
    return _as_scores(maps, "maps"), _as_binary(masks, "masks")
