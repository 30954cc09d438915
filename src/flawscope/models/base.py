"""The contract every method's inference module follows.

A model's ``forward`` takes a float batch (B, 3, H, W) in [0, 1] at ``config.image_size`` and returns an
:class:`AnomalyOutput`. Everything needed to turn pixels into a decision (input normalisation inside the backbone,
upsampling, smoothing, score normalisation with the calibrated threshold) lives in this one graph, so the module that
``flawscope test`` evaluates is the one that is exported and served.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import ConfigError, DataError, NotFittedError


class AnomalyOutput(NamedTuple):
    """What every model returns; the field names become the export's output names."""

    anomaly_map: Tensor  # (B, 1, H, W) raw per-pixel anomaly score, higher = more anomalous
    pred_score: Tensor  # (B,) raw image score
    norm_map: Tensor  # (B, 1, H, W) anomaly_map on the calibrated scale: threshold -> 0.5, clipped to [0, 1]
    norm_score: Tensor  # (B,) pred_score on the calibrated scale; > 0.5 means "defective"


def normalize_scores(raw: Tensor, threshold: Tensor, score_low: Tensor) -> Tensor:
    """Maps raw scores linearly so that ``score_low`` -> 0 and ``threshold`` -> 0.5, then clips to [0, 1].

    A function of its own so that an export wrapper can apply it in float32 to a half-precision graph's output.
    """
    scale = (threshold - score_low).clamp_min(1e-12)
    return (0.5 * (raw - score_low) / scale).clamp(0.0, 1.0)


INPUT_RANGE_TOLERANCE = 1e-3  # float rounding around [0, 1]; a resize with non-negative weights never leaves it


def check_images(images: Tensor | np.ndarray, image_size: int, owner: str = "This model") -> None:
    """Refuses a batch that is not model input, with a message that says what to change.

    Args:
        images: (B, 3, S, S) float in [0, 1], B >= 1, S = ``image_size``: what ``flawscope.data.preprocess`` makes.
        image_size: the model's input size S.
        owner: what the message names as expecting the input.

    Raises:
        DataError: another shape, an empty batch, an integer or bool dtype, NaN or infinite values, or values
            outside [0, 1] (0-255 values, or mean/std-normalised ones: the graph normalises itself).
    """
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1:] != (3, image_size, image_size):
        raise DataError(
            f"{owner} expects images of shape (B, 3, {image_size}, {image_size}) float in [0, 1]; got {shape}. "
            "Use flawscope.data.preprocess() to resize and crop (and torch.stack or numpy.stack for a batch)."
        )
    if shape[0] == 0:
        raise DataError("The batch holds no images (B = 0); flawscope.data.find_images() lists a folder's images.")
    if isinstance(images, np.ndarray) and images.dtype.kind not in "biuf":  # object, str, complex: torch cannot hold
        raise DataError(
            f"{owner} expects float images in [0, 1]; got a numpy array of dtype {images.dtype}. Make model input with "
            "flawscope.data.preprocess()."
        )
    values = torch.as_tensor(images).detach()
    if not values.is_floating_point():
        raise DataError(
            f"{owner} expects float images in [0, 1]; got dtype {values.dtype}. Divide uint8 images by 255 "
            "(flawscope.data.preprocess() does)."
        )
    finite = torch.isfinite(values).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise DataError(
            f"{owner} cannot score images {bad[:10]} of the batch (0-based): they hold NaN or infinite values. Check "
            "how they were decoded or computed."
        )
    low, high = (float(v) for v in torch.aminmax(values))
    if low < -INPUT_RANGE_TOLERANCE or high > 1 + INPUT_RANGE_TOLERANCE:
        if low >= -INPUT_RANGE_TOLERANCE and high > 2:
            hint = "Values up to 255 look like 8-bit pixels: divide by 255."
        elif low < -0.5:
            hint = "Values this negative look like mean/std-normalised pixels: pass the [0, 1] image, the model "
            hint += "normalises it itself."
        else:
            hint = "Values just outside look like a bicubic or Lanczos resize's overshoot: clip them to [0, 1]."
        raise DataError(
            f"{owner} expects images in [0, 1]; got values from {low:.4g} to {high:.4g}. {hint} "
            "flawscope.data.preprocess() makes model input from a decoded image."
        )


class AnomalyModel(nn.Module):
    """Base class of the inference modules. Subclasses implement :meth:`raw_scores`.

    Buffers kept in every model's ``state_dict`` (so export and model folders carry them):
        fitted: whether ``fit`` has run.
        threshold: raw image score at which an image is called defective.
        score_low: raw score of a typical normal image (median of the held-out normals below the threshold);
            maps to 0.
    """

    method: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("threshold", torch.tensor(1.0))
        self.register_buffer("score_low", torch.tensor(0.0))

    def raw_scores(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) in [0, 1] -> (anomaly_map (B, 1, H, W), score (B,)), both uncalibrated."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) float in [0, 1], S = ``config.image_size`` -> the four outputs.

        The input is not checked here (``forward`` never branches on tensor values, so it traces and exports as is):
        the inferencers check it, and ``check_input`` does for direct calls.
        """
        anomaly_map, score = self.raw_scores(images)
        return AnomalyOutput(anomaly_map, score, self.normalize(anomaly_map), self.normalize(score))

    def normalize(self, raw: Tensor) -> Tensor:
        """Maps raw scores linearly so that ``score_low`` -> 0 and ``threshold`` -> 0.5, then clips to [0, 1]."""
        return normalize_scores(raw, self.threshold, self.score_low)

    def set_calibration(self, threshold: float, score_low: float) -> None:
        """Stores the decision threshold and the typical normal score (raw units); both must be finite."""
        if not (math.isfinite(threshold) and math.isfinite(score_low)):
            raise ConfigError(f"A threshold and typical score must be finite numbers; got {threshold}, {score_low}.")
        if not threshold > score_low:
            # A threshold at or below the typical normal score would call half the normals defective.
            threshold = score_low + max(abs(score_low) * 1e-3, 1e-6)
        self.threshold.fill_(threshold)
        self.score_low.fill_(score_low)

    def check_fitted(self) -> None:
        """Raises NotFittedError unless ``fit`` has run (checked by predict/export, never inside forward)."""
        if not bool(self.fitted):
            raise NotFittedError(
                f"{type(self).__name__} is not fitted yet. Train it with `flawscope fit` or "
                f"flawscope.fit(...) before predicting or exporting."
            )

    def check_input(self, images: Tensor) -> None:
        """Validates a batch for ``forward``, with a message that says what to change (the inferencers call it;
        call it yourself before ``model(images)`` on input you did not make with ``flawscope.data.preprocess``)."""
        check_images(images, self.config.image_size, type(self).__name__)
        weight = next(self.parameters(), None)
        if weight is not None and images.dtype != weight.dtype:
            raise DataError(
                f"{type(self).__name__} holds {weight.dtype} weights and was given {images.dtype} images; convert them "
                f"with images.to({weight.dtype})."
            )
