"""Where synthetic defects may land: an object's foreground mask and PRN's random target areas.

PRN constrains every generated anomaly to a target area (TA): a random circle, rectangle or convex polygon whose
centre lies on the object (the foreground) for object categories, anywhere for textures. Sizes follow the spec's
proposal, relative to the shorter image side S: circle radius U(0.05, 0.25) S, rectangle sides U(0.1, 0.5) S,
polygon of 3-8 vertices inside such a rectangle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage, spatial
from skimage import draw
from skimage.filters import threshold_otsu

TARGET_SHAPES = ("circle", "rectangle", "polygon")
_MIN_FOREGROUND = 0.01  # a foreground smaller than this share of the image is not trusted


def foreground_mask(image: np.ndarray, blur_sigma: float = 2.0, closing: int = 5) -> np.ndarray:
    """The object's pixels, by Otsu's threshold on the blurred grey image (the spec's proposal).

    The side of the threshold that touches the image border less is the object (objects are photographed
    centred on a plain background); holes are filled and small gaps closed. When the split is not credible
    (less than 1 % of the image), the whole image is returned, which is also right for textures.

    Args:
        image: (H, W, 3) or (H, W), float in [0, 1] or uint8.

    Returns:
        (H, W) bool.
    """
    grey = np.asarray(image, np.float64)
    grey = grey.mean(-1) if grey.ndim == 3 else grey
    smooth = ndimage.gaussian_filter(grey, blur_sigma)
    if float(smooth.max() - smooth.min()) < 1e-6:
        return np.ones(grey.shape, bool)
    bright = smooth > threshold_otsu(smooth)
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    mask = ~bright if border.mean() > 0.5 else bright
    mask = ndimage.binary_closing(mask, np.ones((closing, closing), bool), border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    if mask.mean() < _MIN_FOREGROUND:
        return np.ones(grey.shape, bool)
    return mask


def target_area(
    shape: tuple[int, int],
    rng: np.random.Generator,
    foreground: np.ndarray | None = None,
    shapes: Sequence[str] = TARGET_SHAPES,
) -> np.ndarray:
    """A random circle, rectangle or convex polygon centred on a foreground pixel.

    Args:
        shape: (H, W).
        rng: source of randomness.
        foreground: (H, W) bool; None or all False means anywhere.
        shapes: the shapes drawn from, a subset of ``TARGET_SHAPES`` (one name for a fixed shape).

    Returns:
        (H, W) bool, never empty (the centre pixel is always inside).
    """
    height, width = shape
    side = min(shape)
    if foreground is not None and foreground.any():
        rows, cols = np.nonzero(foreground)
        pick = int(rng.integers(len(rows)))
        centre = np.array([rows[pick], cols[pick]], float)
    else:
        centre = np.array([rng.integers(height), rng.integers(width)], float)
    kind = str(rng.choice(tuple(shapes)))
    mask = np.zeros(shape, bool)
    if kind == "circle":
        radius = rng.uniform(0.05, 0.25) * side
        mask[draw.disk(tuple(centre), radius, shape=shape)] = True
    elif kind == "rectangle":
        half = rng.uniform(0.1, 0.5, 2) * side / 2
        top, left = np.floor(centre - half).astype(int).clip(0)
        bottom, right = np.ceil(centre + half).astype(int)
        mask[top:bottom, left:right] = True
    elif kind == "polygon":
        half = rng.uniform(0.1, 0.5, 2) * side / 2
        points = centre + rng.uniform(-1, 1, (int(rng.integers(3, 9)), 2)) * half
        hull = points[spatial.ConvexHull(points).vertices]  # 2-D vertices come in counter-clockwise order
        mask[draw.polygon(hull[:, 0], hull[:, 1], shape)] = True
    else:
        raise ValueError(f"Unknown target shape {kind!r}; use one of {TARGET_SHAPES}.")
    mask[int(centre[0]), int(centre[1])] = True
    return mask
