"""CutPaste pseudo-anomalies (Li et al., CVPR 2021): a patch of the image, colour-jittered, pasted elsewhere.

Variants, as in the CutPaste paper:

* ``"normal"``: a rectangle of 2-15 % of the image area, aspect ratio from U(0.3, 1) or U(1, 3.3) with equal
  probability, cut at a random place and pasted at another.
* ``"scar"``: a thin rectangle (width 2-16 px, length 10-25 px at 256 px, scaled with the image), rotated by
  U(-45, 45) degrees before pasting.
* ``"3way"``: ``"normal"`` or ``"scar"`` with equal probability (the generator behind the paper's 3-way classifier).

The patch is colour-jittered like torchvision's ``ColorJitter(0.1, 0.1, 0.1, 0.1)`` (brightness, contrast,
saturation, hue in that fixed order). The returned mask is exactly the set of changed pixels; with a foreground mask
the paste lands on the foreground and nothing outside it changes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import color

from flawscope.errors import ConfigError, DataError
from flawscope.synthesis.defects import check_image_shape, value_range

CUTPASTE_VARIANTS = ("normal", "scar", "3way")
CUTPASTE_AREA_RATIO = (0.02, 0.15)
CUTPASTE_ASPECT_RATIO = (0.3, 3.3)
_SCAR_WIDTH_PX = (2.0, 16.0)
_SCAR_LENGTH_PX = (10.0, 25.0)
_REFERENCE_SIDE = 256
_MAX_TRIES = 50


def check_cutpaste_params(
    area_ratio: tuple[float, ...],
    aspect_ratio: tuple[float, ...],
    jitter: float,
    names: tuple[str, str, str] = ("area_ratio", "aspect_ratio", "jitter"),
) -> None:
    """Raises ConfigError, naming the option (``names``), unless 0 < area low <= high <= 1, 0 < aspect low <= 1 <=
    high and 0 <= jitter <= 1."""
    if len(area_ratio) != 2 or not 0 < area_ratio[0] <= area_ratio[1] <= 1:
        raise ConfigError(
            f"{names[0]} needs two fractions of the image area LOW,HIGH with 0 < LOW <= HIGH <= 1 (CutPaste: "
            f"{CUTPASTE_AREA_RATIO[0]},{CUTPASTE_AREA_RATIO[1]}); got {','.join(map(str, area_ratio))}."
        )
    if len(aspect_ratio) != 2 or not 0 < aspect_ratio[0] <= 1 <= aspect_ratio[1]:
        raise ConfigError(
            f"{names[1]} needs two width/height ratios LOW,HIGH with 0 < LOW <= 1 <= HIGH (CutPaste: "
            f"{CUTPASTE_ASPECT_RATIO[0]},{CUTPASTE_ASPECT_RATIO[1]}); got {','.join(map(str, aspect_ratio))}."
        )
    if not 0 <= jitter <= 1:
        raise ConfigError(f"{names[2]} (the ColorJitter strength) must be in [0, 1] (CutPaste: 0.1); got {jitter}.")


def check_foreground(foreground: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool foreground a generator may change; all True when None.

    Raises:
        DataError: wrong shape, or no foreground pixel at all.
    """
    if foreground is None:
        return np.ones(shape, dtype=bool)
    foreground = np.asarray(foreground).astype(bool)
    if foreground.shape != shape:
        raise DataError(
            f"The foreground mask has shape {foreground.shape} but the image is {shape} (H, W); pass a mask of "
            "image.shape[:2]."
        )
    if not foreground.any():
        raise DataError("The foreground mask is empty, so no defect can be placed; pass None to use the whole image.")
    return foreground


def as_rgb_float(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 / float in [0, 1] -> (H, W, C) float64 in [0, 1]."""
    top = value_range(image)
    pixels = image.astype(np.float64) / top
    return pixels if pixels.ndim == 3 else pixels[..., None]


def from_rgb_float(pixels: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Inverse of :func:`as_rgb_float`: back to the dtype, range and shape of ``like``."""
    top = value_range(like)
    pixels = np.clip(pixels, 0.0, 1.0) * top
    if like.dtype == np.uint8:
        pixels = np.rint(pixels)
    return pixels.reshape(like.shape).astype(like.dtype)


def color_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
    """torchvision-style ColorJitter(strength x 4) on an (h, w, C) float patch in [0, 1]; grey stays grey.

    Brightness, contrast and saturation factors are drawn from U(1 - s, 1 + s), the hue shift from U(-s, s).
    """
    if strength == 0:
        return patch
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    out = np.clip(patch * rng.uniform(low, high), 0.0, 1.0)
    grey = out.mean(axis=-1, keepdims=True) if out.shape[-1] != 3 else out @ np.array([0.299, 0.587, 0.114])[:, None]
    out = np.clip((out - grey.mean()) * rng.uniform(low, high) + grey.mean(), 0.0, 1.0)
    grey = out.mean(axis=-1, keepdims=True) if out.shape[-1] != 3 else out @ np.array([0.299, 0.587, 0.114])[:, None]
    out = np.clip((out - grey) * rng.uniform(low, high) + grey, 0.0, 1.0)
    shift = rng.uniform(-strength, strength)
    if out.shape[-1] == 3:
        hsv = color.rgb2hsv(out)
        hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
        out = color.hsv2rgb(hsv)
    return out


def _rectangle_size(shape: tuple[int, int], rng: np.random.Generator, area_ratio, aspect_ratio) -> tuple[int, int]:
    """(height, width) of a CutPaste rectangle: area ratio U(area_ratio), aspect from U(lo, 1) or U(1, hi)."""
    area = rng.uniform(*area_ratio) * shape[0] * shape[1]
    aspect = rng.uniform(aspect_ratio[0], 1.0) if rng.random() < 0.5 else rng.uniform(1.0, aspect_ratio[1])
    width = int(round(np.sqrt(area * aspect)))
    height = int(round(np.sqrt(area / aspect)))
    return min(max(height, 1), shape[0]), min(max(width, 1), shape[1])


def _scar_size(shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    scale = min(shape) / _REFERENCE_SIDE
    width = max(1, int(round(rng.uniform(*_SCAR_WIDTH_PX) * scale)))
    length = max(2, int(round(rng.uniform(*_SCAR_LENGTH_PX) * scale)))
    return min(length, shape[0]), min(width, shape[1])


def _target_corner(
    shape: tuple[int, int], footprint: np.ndarray, foreground: np.ndarray, rng: np.random.Generator
) -> tuple[int, int]:
    """Top-left corner for pasting ``footprint`` so that its centre lies on the foreground (when one exists)."""
    room = (shape[0] - footprint.shape[0] + 1, shape[1] - footprint.shape[1] + 1)
    centre = (footprint.shape[0] // 2, footprint.shape[1] // 2)
    corner = (int(rng.integers(room[0])), int(rng.integers(room[1])))
    for _ in range(_MAX_TRIES):
        if foreground[corner[0] + centre[0], corner[1] + centre[1]]:
            return corner
        corner = (int(rng.integers(room[0])), int(rng.integers(room[1])))
    # Small foregrounds: place the centre on a random foreground pixel, clipped so the footprint stays in the image.
    rows, cols = np.nonzero(foreground)
    pick = int(rng.integers(rows.size))
    return (
        int(np.clip(rows[pick] - centre[0], 0, room[0] - 1)),
        int(np.clip(cols[pick] - centre[1], 0, room[1] - 1)),
    )


def cutpaste(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    variant: str = "normal",
    foreground: np.ndarray | None = None,
    area_ratio: tuple[float, float] = CUTPASTE_AREA_RATIO,
    aspect_ratio: tuple[float, float] = CUTPASTE_ASPECT_RATIO,
    jitter: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a patch of ``image``, jitter its colours and paste it at another place.

    Args:
        image: (H, W) or (H, W, C) uint8, or float in [0, 1]; sides >= 16. Not modified.
        rng: Source of randomness; the same generator state gives the same result.
        variant: ``"normal"``, ``"scar"`` or ``"3way"`` (see the module docstring).
        foreground: Optional (H, W) bool; the pasted patch is centred on it and clipped to it.
        area_ratio: Range of the rectangle's area, as a fraction of the image (``"normal"``).
        aspect_ratio: (low, high) of the width/height ratio; U(low, 1) or U(1, high) with equal probability.
        jitter: ColorJitter strength for brightness, contrast, saturation and hue.

    Returns:
        image: New image with the input's shape and dtype.
        mask: (H, W) bool, exactly the pixels that differ from the input (all False if the paste changed nothing).
    """
    if variant not in CUTPASTE_VARIANTS:
        raise ConfigError(f"CutPaste variant must be one of {', '.join(CUTPASTE_VARIANTS)}; got {variant!r}.")
    shape = check_image_shape(image.shape[:2])
    check_cutpaste_params(area_ratio, aspect_ratio, jitter)
    foreground = check_foreground(foreground, shape)
    if variant == "3way":
        variant = "normal" if rng.random() < 0.5 else "scar"
    pixels = as_rgb_float(image)
    if variant == "normal":
        height, width = _rectangle_size(shape, rng, area_ratio, aspect_ratio)
    else:
        height, width = _scar_size(shape, rng)
    top, left = int(rng.integers(shape[0] - height + 1)), int(rng.integers(shape[1] - width + 1))
    patch = color_jitter(pixels[top : top + height, left : left + width], rng, jitter)
    footprint = np.ones((height, width), dtype=bool)
    if variant == "scar":
        angle = rng.uniform(-45.0, 45.0)
        patch = ndimage.rotate(patch, angle, axes=(1, 0), reshape=True, order=1, mode="nearest")
        footprint = ndimage.rotate(footprint.astype(np.uint8), angle, axes=(1, 0), reshape=True, order=0) > 0
        keep = (slice(0, min(footprint.shape[0], shape[0])), slice(0, min(footprint.shape[1], shape[1])))
        patch, footprint = patch[keep], footprint[keep]
    row, col = _target_corner(shape, footprint, foreground, rng)
    window = (slice(row, row + footprint.shape[0]), slice(col, col + footprint.shape[1]))
    paste = footprint & foreground[window]
    result = pixels.copy()
    result[window][paste] = patch[paste]
    new = from_rgb_float(result, image)
    return new, changed_pixels(image, new)


def changed_pixels(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels where any channel of ``new`` differs from ``old``."""
    difference = old != new
    return difference.any(axis=-1) if difference.ndim == 3 else difference
