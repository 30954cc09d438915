"""Heat-map colouring, overlays with a region outline, and PNG output."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from flawscope.errors import DataError

# Inferno sampled at 11 evenly spaced points. Its luminance rises monotonically, so a brighter pixel always means a
# higher score, also in grayscale print-outs and for colour-blind readers.
_INFERNO_STOPS = (
    "000004",
    "160b39",
    "420a68",
    "6a176e",
    "932667",
    "bc3754",
    "dd513a",
    "f37819",
    "fca50a",
    "f6d746",
    "fcffa4",
)

# Cyan is absent from inferno, so the outline stays visible over every heat value and over gray parts.
OUTLINE_COLOR: tuple[int, int, int] = (0, 255, 255)


def _build_lut(stops: tuple[str, ...], size: int = 256) -> np.ndarray:
    """Interpolates hex colour stops linearly into a (size, 3) uint8 lookup table."""
    points = np.array([[int(s[i : i + 2], 16) for i in (0, 2, 4)] for s in stops], dtype=np.float64)
    where = np.linspace(0.0, 1.0, len(stops))
    t = np.linspace(0.0, 1.0, size)
    channels = [np.interp(t, where, points[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=1)).astype(np.uint8)


COLORMAP: np.ndarray = _build_lut(_INFERNO_STOPS)  # (256, 3) uint8
COLORMAP.flags.writeable = False


def colorize(anomaly_map: np.ndarray) -> np.ndarray:
    """Maps anomaly values to colours of the inferno colormap.

    Args:
        anomaly_map: (H, W) float in [0, 1]; values outside are clipped and NaN counts as 0.

    Returns:
        (H, W, 3) uint8 RGB image: 0 is near black, 1 pale yellow.
    """
    values = _check_map(anomaly_map)
    index = np.round(values * (len(COLORMAP) - 1)).astype(np.intp)
    return COLORMAP[index]


def heatmap_overlay(
    image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.45
) -> np.ndarray:
    """Blends a coloured anomaly map over an image and outlines a region.

    Args:
        image: (H, W, 3) uint8 RGB; (H, W) or (H, W, 1) grayscale is repeated to RGB.
        anomaly_map: (h, w) float in [0, 1]; resized bilinearly to (H, W) when the sizes differ.
        mask: optional (H, W) bool region (ground truth or prediction) whose boundary is drawn in `OUTLINE_COLOR`,
            1 px wide below 256 px image size and 2 px from there on.
        alpha: weight of the heat map in the blend, in [0, 1].

    Returns:
        (H, W, 3) uint8 RGB overlay.
    """
    if not 0.0 <= alpha <= 1.0:
        raise DataError(f"heatmap_overlay: alpha must be in [0, 1]; got {alpha}.")
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    values = _resize_map(_check_map(anomaly_map), height, width)
    blend = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colorize(values).astype(np.float32)
    out = np.round(blend).astype(np.uint8)
    if mask is not None:
        out[_outline(_check_mask(mask, height, width), _outline_width(height, width))] = OUTLINE_COLOR
    return out


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Writes an RGB image as PNG, creating missing parent folders.

    Args:
        path: destination file.
        image: (H, W, 3) uint8 RGB or (H, W) uint8 grayscale.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _to_pil(image).save(path, format="PNG")


def png_data_uri(image: np.ndarray) -> str:
    """Encodes an image as a `data:image/png;base64,...` URI for embedding in HTML.

    Args:
        image: (H, W, 3) uint8 RGB or (H, W) uint8 grayscale.
    """
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _to_pil(image: np.ndarray) -> Image.Image:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise DataError(f"Expected an (H, W, 3) or (H, W) uint8 image; got shape {image.shape}, dtype {image.dtype}.")
    return Image.fromarray(image)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise DataError(
            f"heatmap_overlay expects a uint8 image; got dtype {image.dtype}. "
            "Convert floats in [0, 1] with (image * 255).round().astype(np.uint8)."
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise DataError(f"heatmap_overlay expects an (H, W, 3) or (H, W) image; got shape {image.shape}.")


def _check_map(anomaly_map: np.ndarray) -> np.ndarray:
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2:
        raise DataError(f"Expected an (H, W) anomaly map; got shape {values.shape}. Squeeze batch/channel axes first.")
    return np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)


def _check_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != (height, width):
        raise DataError(f"The mask has shape {mask.shape} but the image is {(height, width)}; resize the mask first.")
    return mask.astype(bool)


def _resize_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    if values.shape == (height, width):
        return values
    resized = Image.fromarray(values).resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _outline_width(height: int, width: int) -> int:
    return 1 if max(height, width) < 256 else 2


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of `mask` within `width` steps of its edge; the image border counts as outside, closing the outline."""
    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~inner
