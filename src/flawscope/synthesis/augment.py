"""Colour and spatial augmentations applied to anomaly sources (PRN's Aug_1 and Aug_2, DRAEM's colour ops).

Images are (H, W, 3) float32 in [0, 1]; masks (H, W) bool. Every function takes a numpy Generator and is
reproducible from its state.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from skimage.transform import AffineTransform, warp


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))


def _from_pil(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.float32) / 255.0


def _equalize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _from_pil(ImageOps.equalize(_to_pil(image)))


def _solarize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug Solarize(0.5, threshold=(32, 128)): with probability 0.5 invert the pixels above the threshold (per
    # image here), else leave the image unchanged.
    threshold = rng.uniform(32, 128) / 255.0
    if rng.random() >= 0.5:
        return image.copy()
    return np.where(image >= threshold, 1.0 - image, image).astype(np.float32)


def _posterize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _from_pil(ImageOps.posterize(_to_pil(image), int(rng.integers(1, 9))))


def _sharpness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _from_pil(ImageEnhance.Sharpness(_to_pil(image)).enhance(rng.uniform(0.0, 2.0)))


def _autocontrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _from_pil(ImageOps.autocontrast(_to_pil(image), cutoff=float(rng.uniform(0, 20))))


def _invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - image


def _gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug GammaContrast((0.5, 2.0), per_channel=True)
    return np.power(np.clip(image, 0, 1), rng.uniform(0.5, 2.0, size=3)).astype(np.float32)


# PRN's Aug_1 list (paper, App. A.1), with DRAEM's parameter ranges.
COLOUR_OPS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "equalize": _equalize,
    "solarize": _solarize,
    "posterize": _posterize,
    "sharpness": _sharpness,
    "autocontrast": _autocontrast,
    "invert": _invert,
    "gamma": _gamma,
}


def colour_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int = 2) -> np.ndarray:
    """Applies ``num_ops`` distinct random operations of ``COLOUR_OPS`` in random order (PRN: 2 of 7).

    Args:
        image: (H, W, 3) float32 in [0, 1]; not modified.

    Returns:
        (H, W, 3) float32 in [0, 1].
    """
    names = rng.choice(sorted(COLOUR_OPS), size=min(num_ops, len(COLOUR_OPS)), replace=False)
    for name in names:
        image = COLOUR_OPS[str(name)](image, rng)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


AFFINE_RANGES = (45.0, 16.0, 0.25)  # Aug_2: rotation and shear in degrees, shift as a fraction of the side


def random_affine(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    rotate: float = AFFINE_RANGES[0],
    shear: float = AFFINE_RANGES[1],
    translate: float = AFFINE_RANGES[2],
) -> tuple[np.ndarray, np.ndarray]:
    """PRN's Aug_2: rotation, shear and shift about the image centre, applied identically to image and mask.

    Ranges are the spec's proposal (imgaug ``Affine(rotate=(-45, 45), shear=(-16, 16), translate_percent=(-0.25,
    0.25))``). The image is sampled bilinearly, the mask with nearest neighbour so it stays binary.

    Args:
        image: (H, W, 3) float32.
        mask: (H, W) bool.

    Returns:
        The transformed image (H, W, 3) float32 (zeros outside the source) and mask (H, W) bool.
    """
    height, width = mask.shape
    centre = np.array([width / 2.0, height / 2.0])
    shift = rng.uniform(-translate, translate, 2) * np.array([width, height])
    to_origin = AffineTransform(translation=-centre)
    move = AffineTransform(
        rotation=np.deg2rad(rng.uniform(-rotate, rotate)), shear=np.deg2rad(rng.uniform(-shear, shear))
    )
    back = AffineTransform(translation=centre + shift)
    forward = to_origin.params @ np.eye(3)
    forward = back.params @ move.params @ forward
    inverse = AffineTransform(matrix=np.linalg.inv(forward))
    moved = warp(image, inverse, order=1, mode="constant", cval=0.0, preserve_range=True).astype(np.float32)
    moved_mask = warp(mask.astype(np.float32), inverse, order=0, mode="constant", cval=0.0) > 0.5
    return moved, moved_mask
