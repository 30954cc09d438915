"""Confetti noise (FCDD, Liznerski et al., ICLR 2021): small rotated squares of random colour, blurred, added.

Follows FCDD's ``confetti`` noise mode (``python/fcdd/datasets/noise_modes.py``) with its parameters: each pixel
seeds a coloured square with probability 1.8e-5 and a grey (255) one with probability 1.2e-5; sides are drawn from
8-54 px, rotation from U(-45, 45) degrees; at least one square is drawn. The two layers are summed, blurred with a
Gaussian (kernel 25, sigma 5) and added to the image, which is clipped to its range. When adding barely changes the
image (bright parts saturate: mean change on the noise's support below 2.5 % of the range) and subtracting changes
more, the noise is subtracted instead. Blur tails weaker than half a grey level are dropped, so uint8 and float
images get the same mask. The mask is exactly the set of changed pixels; with a foreground mask the squares are
seeded on the foreground and nothing outside it changes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from flawscope.errors import ConfigError
from flawscope.synthesis.cutpaste import as_rgb_float, changed_pixels, check_foreground, from_rgb_float
from flawscope.synthesis.defects import check_image_shape

CONFETTI_COLOR_PROB = 1.8e-5
CONFETTI_GREY_PROB = 1.2e-5
CONFETTI_SIDE_PX = (8, 54)
_BLUR_SIGMA = 5.0
_BLUR_RADIUS = 12  # kernel 25 = 2 * 12 + 1
_MIN_MEAN_CHANGE = 0.025
_HALF_LEVEL = 0.5 / 255


def _square(shape: tuple[int, int], centre: np.ndarray, side: float, angle: float) -> tuple[slice, slice, np.ndarray]:
    """A square of ``side`` px rotated by ``angle`` degrees around ``centre``: its window and (h, w) bool mask."""
    reach = int(np.ceil(side / np.sqrt(2))) + 1
    rows = slice(max(int(centre[0]) - reach, 0), min(int(centre[0]) + reach + 1, shape[0]))
    cols = slice(max(int(centre[1]) - reach, 0), min(int(centre[1]) + reach + 1, shape[1]))
    r, c = np.mgrid[rows, cols]
    theta = np.deg2rad(angle)
    u = (r - centre[0]) * np.cos(theta) + (c - centre[1]) * np.sin(theta)
    v = -(r - centre[0]) * np.sin(theta) + (c - centre[1]) * np.cos(theta)
    return rows, cols, (np.abs(u) <= side / 2) & (np.abs(v) <= side / 2)


def check_confetti_params(
    probs: tuple[float, ...], side_px: tuple[int, ...], names: tuple[str, str] = ("color_prob, grey_prob", "side_px")
) -> None:
    """Raises ConfigError, naming the option (``names``), unless ``probs`` is (colour, grey) with both in [0, 1] and
    ``side_px`` is (low, high) with 1 <= low <= high."""
    if len(probs) != 2 or not all(0 <= p <= 1 for p in probs):
        raise ConfigError(
            f"{names[0]} needs two per-pixel probabilities COLOUR,GREY of seeding a square, each in [0, 1] (FCDD: "
            f"{CONFETTI_COLOR_PROB}, {CONFETTI_GREY_PROB}); got {', '.join(map(str, probs))}."
        )
    if len(side_px) != 2 or not 1 <= side_px[0] <= side_px[1]:
        raise ConfigError(
            f"{names[1]} needs two square sides LOW,HIGH in pixels with 1 <= LOW <= HIGH (FCDD: "
            f"{CONFETTI_SIDE_PX[0]},{CONFETTI_SIDE_PX[1]}); got {','.join(map(str, side_px))}."
        )


def _layer(
    shape: tuple[int, int],
    channels: int,
    seeds: np.ndarray,
    colours: np.ndarray,
    rng: np.random.Generator,
    side_px: tuple[int, int],
) -> np.ndarray:
    """(H, W, C) layer in [0, 1] with one rotated square per seed; later squares cover earlier ones."""
    layer = np.zeros((*shape, channels))
    for centre, colour in zip(seeds, colours, strict=True):
        side = rng.integers(side_px[0], side_px[1] + 1)
        rows, cols, square = _square(shape, centre, side, rng.uniform(-45.0, 45.0))
        layer[rows, cols][square] = colour
    return layer


def confetti_noise(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    color_prob: float = CONFETTI_COLOR_PROB,
    grey_prob: float = CONFETTI_GREY_PROB,
    side_px: tuple[int, int] = CONFETTI_SIDE_PX,
) -> tuple[np.ndarray, np.ndarray]:
    """Add FCDD confetti noise to ``image``.

    Args:
        image: (H, W) or (H, W, C) uint8, or float in [0, 1]; sides >= 16. Not modified.
        rng: Source of randomness; the same generator state gives the same result.
        foreground: Optional (H, W) bool; squares are seeded on it and the noise is zero outside it.
        color_prob: Per-pixel probability of seeding a square of random colour.
        grey_prob: Per-pixel probability of seeding a grey (full-intensity) square.
        side_px: (low, high) range of the squares' sides in pixels, drawn uniformly (integers, both included).

    Returns:
        image: New image with the input's shape and dtype.
        mask: (H, W) bool, exactly the pixels that differ from the input.
    """
    shape = check_image_shape(image.shape[:2])
    check_confetti_params((color_prob, grey_prob), side_px)
    foreground = check_foreground(foreground, shape)
    pixels = as_rgb_float(image)
    candidates = np.argwhere(foreground)
    num_color = rng.binomial(len(candidates), color_prob)
    num_grey = rng.binomial(len(candidates), grey_prob)
    if num_color + num_grey == 0:  # FCDD's ensureblob
        num_color = 1
    channels = pixels.shape[-1]
    seeds = candidates[rng.integers(len(candidates), size=num_color + num_grey)]
    # Colours are whole grey levels, as FCDD draws them on uint8 images; grey squares are at full intensity.
    colours = rng.integers(0, 256, size=(num_color, channels)) / 255.0
    noise = _layer(shape, channels, seeds[:num_color], colours, rng, side_px)
    noise += _layer(shape, channels, seeds[num_color:], np.ones((num_grey, channels)), rng, side_px)
    noise = ndimage.gaussian_filter(noise, sigma=(_BLUR_SIGMA, _BLUR_SIGMA, 0), truncate=_BLUR_RADIUS / _BLUR_SIGMA)
    noise[(noise < _HALF_LEVEL) | ~foreground[..., None]] = 0.0
    support = noise.max(axis=-1) > 0
    added, subtracted = np.clip(pixels + noise, 0, 1), np.clip(pixels - noise, 0, 1)
    size = max(int(support.sum()), 1)
    change_add = np.abs(added - pixels)[support].sum() / size
    change_sub = np.abs(subtracted - pixels)[support].sum() / size
    result = subtracted if change_add < _MIN_MEAN_CHANGE and change_sub > change_add else added
    new = from_rgb_float(result, image)
    return new, changed_pixels(image, new)
