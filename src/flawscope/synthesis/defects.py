"""Random defect shapes (scratches, blobs, stains) and painting them into images with an exact mask.

Sizes are relative to the image, so a shape drawn at 64 px looks like the same shape drawn at 256 px. Area ranges
(fraction of the image area, guaranteed for every shape these functions return):

* scratch: ``SCRATCH_AREA_RATIO`` (thin strokes, 2-5 px wide at 256 px, cannot cover much)
* blob and stain: ``BLOB_AREA_RATIO`` / ``STAIN_AREA_RATIO``

``paint_defect`` changes every masked pixel by at least ``min_change`` and no other pixel, so the mask is exactly the
set of changed pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage, spatial
from skimage import draw

from flawscope.errors import ConfigError, DataError

SCRATCH_AREA_RATIO = (0.003, 0.03)
BLOB_AREA_RATIO = (0.01, 0.05)
STAIN_AREA_RATIO = (0.01, 0.05)

_MIN_SIDE = 16
_REFERENCE_SIDE = 256  # widths and lengths below are quoted for a 256 px image and scale with the image
_SCRATCH_WIDTH_PX = (2.0, 5.0)
_SCRATCH_LENGTH_RATIO = (0.5, 1.1)
_SCRATCH_STEP_PX = 0.25  # curve samples this close make the point cloud a good stand-in for the curve
_MAX_TRIES = 100
_STAIN_EDGE_ALPHA = 0.25


def check_image_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """An (H, W) image shape as ints; DataError when it is not two sides of at least ``_MIN_SIDE`` pixels."""
    if len(shape) != 2 or min(shape) < _MIN_SIDE:
        raise DataError(
            f"Defect shapes need an (H, W) shape with both sides >= {_MIN_SIDE}; got {tuple(shape)}. "
            "Pass image.shape[:2] of an image at least that large."
        )
    return int(shape[0]), int(shape[1])


def _area_ratio(mask: np.ndarray) -> float:
    return float(mask.mean())


def _scratch_curve(shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Sample a gently bending centre line. Returns points (N, 2) as (row, col) and the stroke width in px."""
    scale = min(shape) / _REFERENCE_SIDE
    length = rng.uniform(*_SCRATCH_LENGTH_RATIO) * min(shape)
    stroke = max(1.0, rng.uniform(*_SCRATCH_WIDTH_PX) * scale)
    arc = np.arange(0.0, length, _SCRATCH_STEP_PX)
    # Total turning stays below ~90 degrees so the stroke reads as one scratch and rarely crosses itself.
    bend = rng.uniform(-0.8, 0.8) * arc / length
    wiggle = rng.uniform(0.0, 0.25) * np.sin(2 * np.pi * arc / length * rng.uniform(0.5, 2.0) + rng.uniform(0, 6.3))
    heading = rng.uniform(0, 2 * np.pi) + bend + wiggle
    steps = _SCRATCH_STEP_PX * np.stack([np.sin(heading), np.cos(heading)], axis=1)
    points = np.cumsum(steps, axis=0)
    points -= points.min(axis=0)
    # A scratch longer than the image allows is shortened rather than clipped, so it never ends in the border.
    room = np.array(shape, dtype=float) - 1.0 - stroke
    points *= min(1.0, float(np.min(room / np.maximum(points.max(axis=0), 1e-9))))
    points += stroke / 2 + rng.uniform(0.0, room - points.max(axis=0))
    return points, stroke


def _stroke_mask(shape: tuple[int, int], points: np.ndarray, stroke: float) -> np.ndarray:
    """Pixels whose centre lies within stroke / 2 of the centre line (exact for fractional widths)."""
    radius = stroke / 2.0
    low = np.maximum(np.floor(points.min(axis=0) - radius), 0).astype(int)
    high = np.minimum(np.ceil(points.max(axis=0) + radius) + 1, shape).astype(int)
    rows, cols = np.mgrid[low[0] : high[0], low[1] : high[1]]
    centres = np.stack([rows.ravel(), cols.ravel()], axis=1)
    distance, _ = spatial.cKDTree(points).query(centres, distance_upper_bound=radius + 1.0)
    mask = np.zeros(shape, dtype=bool)
    mask[low[0] : high[0], low[1] : high[1]] = (distance <= radius).reshape(rows.shape)
    # A width under ~1.4 px can leave diagonal gaps between pixel centres; thin lines must stay connected.
    if stroke < 1.5:
        rr, cc = _polyline_pixels(points, shape)
        mask[rr, cc] = True
    return mask


def _polyline_pixels(points: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rounded = np.clip(np.rint(points).astype(int), 0, np.array(shape) - 1)
    return rounded[:, 0], rounded[:, 1]


def _resample_until_in_range(
    sample: Callable[[], np.ndarray], area_range: tuple[float, float], what: str
) -> np.ndarray:
    """Redraw a shape until its area is inside the documented range; almost always the first draw already is."""
    for _ in range(_MAX_TRIES):
        mask = sample()
        if area_range[0] <= _area_ratio(mask) <= area_range[1]:
            return mask
    raise RuntimeError(f"No {what} with area ratio in {area_range} after {_MAX_TRIES} draws")


def random_scratch_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Draw a thin, slightly curved scratch.

    Args:
        shape: Image size (H, W), both sides >= 16.
        rng: Source of randomness; the same generator state gives the same scratch.

    Returns:
        (H, W) bool mask, area ratio within ``SCRATCH_AREA_RATIO``. Width is 2-5 px at 256 px and scales with size.
    """
    shape = check_image_shape(shape)
    return _resample_until_in_range(
        lambda: _stroke_mask(shape, *_scratch_curve(shape, rng)), SCRATCH_AREA_RATIO, "scratch"
    )


def _blob_outline(shape: tuple[int, int], rng: np.random.Generator, area: float) -> np.ndarray:
    """Star-shaped outline (N, 2) as (row, col) with a smooth random radius, scaled to enclose ``area`` px."""
    angles = np.linspace(0.0, 2 * np.pi, 180, endpoint=False)
    radius = np.ones_like(angles)
    for harmonic in range(2, 6):
        radius += rng.uniform(0.0, 0.3) / harmonic * np.cos(harmonic * angles + rng.uniform(0, 2 * np.pi))
    radius = np.maximum(radius, 0.35)
    stretch = rng.uniform(1.0, 1.8)  # elongated blobs look less like circles without changing the area
    row, col = radius * np.sin(angles) * stretch, radius * np.cos(angles) / stretch
    turn = rng.uniform(0, np.pi)
    row, col = row * np.cos(turn) - col * np.sin(turn), row * np.sin(turn) + col * np.cos(turn)
    unit_area = 0.5 * np.sum(radius**2) * (2 * np.pi / angles.size)
    size = np.sqrt(area / unit_area)
    outline = np.stack([row, col], axis=1) * size
    low, high = -outline.min(axis=0), np.array(shape) - 1 - outline.max(axis=0)
    return outline + rng.uniform(low, np.maximum(low, high))


def random_blob_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Draw a filled irregular blob, lying inside the image.

    Args:
        shape: Image size (H, W), both sides >= 16.
        rng: Source of randomness.

    Returns:
        (H, W) bool mask, one connected region with area ratio within ``BLOB_AREA_RATIO``.
    """
    shape = check_image_shape(shape)
    low, high = BLOB_AREA_RATIO

    def sample() -> np.ndarray:
        # Aim inside the range so rasterisation error at small sizes rarely pushes the area out of it.
        area = rng.uniform(low * 1.15, high * 0.9) * shape[0] * shape[1]
        outline = _blob_outline(shape, rng, area)
        mask = np.zeros(shape, dtype=bool)
        mask[draw.polygon(outline[:, 0], outline[:, 1], shape)] = True
        return mask

    return _resample_until_in_range(sample, BLOB_AREA_RATIO, "blob")


def _stain_field(shape: tuple[int, int], rng: np.random.Generator, area: float) -> np.ndarray:
    """Smooth positive (H, W) field: an elliptical bump roughened by smooth noise; its top part is a ragged patch."""
    radius = np.sqrt(area / np.pi)
    centre = rng.uniform(1.2 * radius, np.maximum(np.array(shape) - 1.2 * radius, 1.2 * radius))
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(float)
    turn, stretch = rng.uniform(0, np.pi), rng.uniform(1.0, 1.6)
    d_row, d_col = rows - centre[0], cols - centre[1]
    along = (d_row * np.cos(turn) + d_col * np.sin(turn)) / stretch
    across = (-d_row * np.sin(turn) + d_col * np.cos(turn)) * stretch
    bump = np.exp(-(along**2 + across**2) / (2 * radius**2))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(radius / 3, 1.0))
    noise /= noise.std() + 1e-12
    return bump * np.exp(0.4 * noise)  # multiplicative, so no specks appear far from the stain


def random_stain(shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw a soft-edged stain.

    The support is the top part of a smooth random field (a threshold picks exactly the wanted number of pixels);
    opacity rises from 0.25 at the border to 1 inside, so the edge is soft but every supported pixel is painted.

    Args:
        shape: Image size (H, W), both sides >= 16.
        rng: Source of randomness.

    Returns:
        alpha: (H, W) float64 opacity in [0, 1], zero outside the stain.
        mask: (H, W) bool, exactly ``alpha > 0``, area ratio within ``STAIN_AREA_RATIO``.
    """
    shape = check_image_shape(shape)
    num_pixels = shape[0] * shape[1]
    low, high = STAIN_AREA_RATIO
    area = int(round(rng.uniform(low * 1.05, high * 0.95) * num_pixels))
    field = _stain_field(shape, rng, area)
    order = np.argsort(field, axis=None, kind="stable")[::-1]
    mask = np.zeros(num_pixels, dtype=bool)
    mask[order[:area]] = True
    mask = mask.reshape(shape)
    threshold, peak = field.ravel()[order[area - 1]], field.ravel()[order[0]]
    ramp = np.clip((field - threshold) / (0.6 * (peak - threshold) + 1e-12), 0.0, 1.0)
    soft = ramp * ramp * (3 - 2 * ramp)  # smoothstep: no visible kink where the ramp saturates
    alpha = np.where(mask, _STAIN_EDGE_ALPHA + (1 - _STAIN_EDGE_ALPHA) * soft, 0.0)
    return alpha, mask


def value_range(image: np.ndarray) -> float:
    """The white level of an (H, W, 3) image: 255 for uint8, 1.0 for floats in [0, 1]; DataError otherwise."""
    if image.dtype == np.uint8:
        return 255.0
    if np.issubdtype(image.dtype, np.floating):
        return 1.0
    raise DataError(f"paint_defect expects a uint8 image or a float image in [0, 1]; got dtype {image.dtype}.")


def _as_alpha(mask_or_alpha: np.ndarray, image: np.ndarray) -> np.ndarray:
    if mask_or_alpha.shape != image.shape[:2]:
        raise DataError(
            f"The defect mask has shape {mask_or_alpha.shape} but the image is {image.shape[:2]} (H, W); "
            "draw the mask with shape=image.shape[:2]."
        )
    alpha = mask_or_alpha.astype(np.float64)
    if alpha.size and (alpha.min() < 0 or alpha.max() > 1):
        raise DataError(
            f"The defect alpha must lie in [0, 1]; got values in [{alpha.min():.3g}, {alpha.max():.3g}]. "
            "Pass a bool mask or an opacity map in [0, 1]."
        )
    return alpha


def _push_apart(old: np.ndarray, new: np.ndarray, color: np.ndarray, mask: np.ndarray, step: float, top: float):
    """Move masked pixels that barely changed by ``step`` per channel, towards the colour unless that leaves range."""
    barely = mask & (np.abs(new - old).max(axis=-1) < step)
    old_px = old[barely]
    direction = np.where(color - old_px >= 0, 1.0, -1.0)
    pushed = old_px + direction * step
    out_of_range = (pushed < 0) | (pushed > top)
    new[barely] = np.where(out_of_range, old_px - direction * step, pushed)


def paint_defect(
    image: np.ndarray,
    mask_or_alpha: np.ndarray,
    color: float | Sequence[float],
    *,
    min_change: float = 0.02,
) -> np.ndarray:
    """Blend a colour into an image where a mask or opacity map is set.

    Each pixel becomes ``(1 - a) * pixel + a * color``. Masked pixels that would change by less than ``min_change``
    (for instance a dark scratch over an already dark pixel) are moved by exactly that amount, so the painted region
    always equals ``mask_or_alpha > 0``.

    Args:
        image: (H, W) or (H, W, C) uint8, or float in [0, 1]. Not modified.
        mask_or_alpha: (H, W) bool mask or float opacity in [0, 1].
        color: One value or C values, in the image's units (0-255 for uint8, 0-1 for float).
        min_change: Smallest change of a painted pixel (largest over channels), as a fraction of the value range.

    Returns:
        New image with the input's shape and dtype; pixels outside the mask are bit-identical to the input.
    """
    if not 0.0 <= min_change <= 0.5:
        raise ConfigError(
            f"paint_defect's 'min_change' must be in [0, 0.5] (a fraction of the value range); got {min_change}."
        )
    top = value_range(image)
    alpha = _as_alpha(np.asarray(mask_or_alpha), image)
    old = image.astype(np.float64).reshape(*image.shape[:2], -1)  # (H, W, C)
    color = np.broadcast_to(np.asarray(color, dtype=np.float64), old.shape[-1:])
    new = old + alpha[..., None] * (color - old)
    if image.dtype == np.uint8:
        new = np.rint(new)
    new = np.clip(new, 0.0, top)
    # For uint8 the step must be a whole grey level, or rounding could undo it.
    step = max(np.ceil(min_change * top), 1.0) if image.dtype == np.uint8 else min_change * top
    _push_apart(old, new, color, alpha > 0, step, top)
    return new.reshape(image.shape).astype(image.dtype)
