"""The graph that is exported, and the metadata written into every exported file.

An exported file holds one model's whole inference module (input normalisation inside the backbone, the method's
head, upsampling, smoothing, and the calibrated score normalisation with its threshold) behind one input,
``images`` (B, 3, S, S) float32 RGB in [0, 1], and the four outputs of :class:`~flawscope.models.base.AnomalyOutput`,
in that order and under those names.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..data.dataset import MAX_CROP_ASPECT
from ..errors import ConfigError, ModelFormatError
from ..models.base import AnomalyModel, AnomalyOutput, normalize_scores

INPUT_NAME = "images"
OUTPUT_NAMES = AnomalyOutput._fields  # anomaly_map, pred_score, norm_map, norm_score
METADATA_KEY = "flawscope"  # ONNX metadata_props key / TorchScript extra file holding the JSON metadata
EXPORT_FORMAT_VERSION = 1


class ExportGraph(nn.Module):
    """Wraps a fitted model into the exported signature: images -> (anomaly_map, pred_score, norm_map, norm_score).

    With ``half``, the model's weights and activations are float16 while the input, the four outputs and the score
    normalisation stay float32, so the threshold is compared at full precision.

    Args:
        model: a fitted model (it is copied, never changed).
        half: float16 weights.
    """

    def __init__(self, model: AnomalyModel, half: bool = False) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).cpu().eval()
        self.half = half
        # Float32 copies: half-precision thresholds would round the decision boundary to 3 significant digits.
        self.register_buffer("threshold", model.threshold.detach().float().cpu().clone())
        self.register_buffer("score_low", model.score_low.detach().float().cpu().clone())
        if half:
            self.model.half()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """images (B, 3, S, S) float32 in [0, 1] -> four float32 tensors, see :class:`AnomalyOutput`."""
        inputs = images.half() if self.half else images
        anomaly_map, score = self.model.raw_scores(inputs)
        anomaly_map, score = anomaly_map.float(), score.float()
        return (
            anomaly_map,
            score,
            normalize_scores(anomaly_map, self.threshold, self.score_low),
            normalize_scores(score, self.threshold, self.score_low),
        )


MAX_BATCH = 4096  # of a fixed-batch export


def parse_batch(batch: str | int) -> int | None:
    """'dynamic' -> None (any batch size); 'N' or N -> N, the fixed batch size of the exported graph."""
    if isinstance(batch, str) and batch.strip().lower() == "dynamic":
        return None
    try:
        value = int(batch)
    except (TypeError, ValueError):
        value = 0
    if not 1 <= value <= MAX_BATCH:
        raise ConfigError(f"--batch must be 'dynamic' or an integer from 1 to {MAX_BATCH}; got {batch!r}.")
    return value


def _preprocessing_text(image_size: int, resize_size: int) -> str:
    """flawscope's decoding and geometry in words, precise enough to reproduce without it (docs/deploy.md has code)."""
    if resize_size == 0:
        geometry = f"resize the whole image to {image_size}x{image_size}"
    else:
        geometry = (
            f"if the longer side exceeds {MAX_CROP_ASPECT} x the shorter, keep its central {MAX_CROP_ASPECT} x shorter "
            f"pixels (start floor((long - keep) / 2)); resize the shorter side to {resize_size} and the longer to "
            f"floor({resize_size} x long / short); cut the centre {image_size}x{image_size} square at offset "
            f"round-half-to-even((resized - {image_size}) / 2) on each axis"
        )
    return (
        "decode: apply the EXIF orientation; 16-bit grey -> round(v / 257), float grey -> round(v * 255) when its "
        "maximum is at most 1, else as 16-bit (values clipped to the range first); grey, palette, CMYK -> RGB; "
        "transparent images composited on black ((c * alpha + 127) // 255); then divide the uint8 RGB values by 255 "
        f"(float32) and, in float (never back to uint8), {geometry}; every resize is bilinear with antialiasing, "
        "half-pixel centres (torch interpolate(antialias=True), Pillow's BILINEAR resize of a mode 'F' image); no "
        "mean/std normalisation (it is inside the graph)"
    )


def export_metadata(
    model: AnomalyModel, export_format: str, batch: int | None, half: bool, calibrated: bool = True
) -> dict[str, Any]:
    """What a deployer needs besides the graph: input geometry and channel order, threshold (and whether it was
    calibrated), versions."""
    cfg = model.config
    return {
        "format": "flawscope-export",
        "format_version": EXPORT_FORMAT_VERSION,
        "export_format": export_format,
        "method": model.method,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "input": {
            "name": INPUT_NAME,
            "shape": ["B" if batch is None else batch, 3, cfg.image_size, cfg.image_size],
            "dtype": "float32",
            "layout": "NCHW",
            "channel_order": "RGB",
            "range": [0.0, 1.0],
            "image_size": cfg.image_size,
            "resize_size": cfg.resize_size,
            "preprocessing": _preprocessing_text(cfg.image_size, cfg.resize_size),
        },
        "output_order": list(OUTPUT_NAMES),
        "outputs": {
            "anomaly_map": "(B, 1, S, S) raw per-pixel anomaly score",
            "pred_score": "(B,) raw image score",
            "norm_map": "(B, 1, S, S) calibrated map: threshold -> 0.5, clipped to [0, 1]",
            "norm_score": "(B,) calibrated image score; > 0.5 means defective",
        },
        "batch": "dynamic" if batch is None else batch,
        "precision": "float16" if half else "float32",
        "threshold": float(model.threshold),
        "calibrated": calibrated,  # False: the threshold was never set, decisions and normalised outputs mean nothing
        "score_low": float(model.score_low),
        "decision": "defective when norm_score > 0.5 (pred_score > threshold)",
        "config": cfg.to_dict(),
    }


def metadata_json(metadata: dict[str, Any]) -> str:
    """The metadata as the JSON text stored in an exported file (sorted keys, so equal metadata gives equal text)."""
    return json.dumps(metadata, sort_keys=True)


def read_metadata(text: str, source: str) -> dict[str, Any]:
    """An exported file's metadata JSON, checked where inference relies on it: the input geometry and batch, within
    the bounds a model's options have (a crafted file must not make the reader allocate gigabytes).

    Raises:
        ModelFormatError: not JSON, not an object, or the input geometry or batch is missing or out of range.
    """
    try:
        metadata = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ModelFormatError(f"{source} has metadata that is not valid JSON ({str(e)[:100]}).") from e
    geometry = metadata.get("input") if isinstance(metadata, dict) else None
    batch = metadata.get("batch", "dynamic") if isinstance(metadata, dict) else None

    def whole(value: Any, low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    if not (
        isinstance(geometry, dict)
        and whole(geometry.get("image_size"), 32, 4096)
        and whole(geometry.get("resize_size"), 0, 8192)
        and (batch == "dynamic" or whole(batch, 1, MAX_BATCH))
    ):
        raise ModelFormatError(
            f"{source} has flawscope metadata without a usable input size or batch (image_size 32-4096, resize_size "
            f"0-8192, batch 'dynamic' or 1-{MAX_BATCH}): it is damaged or was not written by `flawscope export`. "
            "Export again."
        )
    version = metadata.get("format_version")
    if not whole(version, 1, EXPORT_FORMAT_VERSION):
        raise ModelFormatError(
            f"{source} has export format {version!r}; this flawscope ({__version__}) reads format "
            f"{EXPORT_FORMAT_VERSION}. Upgrade flawscope (pip install -U flawscope) to run files exported by a newer "
            "version, or export the run again."
        )
    return metadata


def example_input(model: AnomalyModel, batch: int | None) -> Tensor:
    """A seeded random batch at the model's input size (2 images for a dynamic batch, so batch is not baked in)."""
    size = model.config.image_size
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch or 2, 3, size, size, generator=generator)
