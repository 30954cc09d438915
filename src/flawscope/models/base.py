"""The contract every method's inference module follows.

A model's ``forward`` takes a float batch (B, 3, H, W) in [0, 1] at ``config.image_size`` and returns an
:class:`AnomalyOutput`. Everything needed to turn pixels into a decision (input normalisation inside the backbone,
upsampling, smoothing, score normalisation with the calibrated threshold) lives in this one graph, so the module that
``flawscope test`` evaluates is the one that is exported and served.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import DataError, NotFittedError


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
        anomaly_map, score = self.raw_scores(images)
        return AnomalyOutput(anomaly_map, score, self.normalize(anomaly_map), self.normalize(score))

    def normalize(self, raw: Tensor) -> Tensor:
        """Maps raw scores linearly so that ``score_low`` -> 0 and ``threshold`` -> 0.5, then clips to [0, 1]."""
        return normalize_scores(raw, self.threshold, self.score_low)

    def set_calibration(self, threshold: float, score_low: float) -> None:
        """Stores the decision threshold and the typical normal score (raw units)."""
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
        """Validates a batch before it reaches the graph, with a message that says what to change."""
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise DataError(
                f"{type(self).__name__} expects images of shape (B, 3, {size}, {size}) in [0, 1]; "
                f"got {tuple(images.shape)}. Use flawscope.data.preprocess() to resize and crop."
            )
        if not images.is_floating_point():
            raise DataError(f"Images must be float in [0, 1]; got dtype {images.dtype}. Divide uint8 images by 255.")
