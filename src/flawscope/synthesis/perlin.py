"""Perlin noise and the thresholded Perlin masks of DRAEM-style simulated anomalies, and texture sources.

A texture source gives the pixels that are blended into a good image under a Perlin mask (PRN's heterologous
anomalies, DRAEM). :class:`FolderTextures` draws from a folder of images the user gives (DTD in the papers; any
photographs work, e.g. BSDS500); :class:`ProceduralTextures` makes coloured fractal noise when no folder is given.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from scipy import ndimage

from flawscope.data.find import find_images
from flawscope.data.io import read_image

# DRAEM (data_loader.py): scales 2^a x 2^b with a, b in 0..5, noise rotated by U(-90, 90) degrees, threshold 0.5.
PERLIN_MAX_EXPONENT = 5
PERLIN_THRESHOLD = 0.5
PERLIN_ROTATION = 90.0


def _fade(t: np.ndarray) -> np.ndarray:
    return ((6 * t - 15) * t + 10) * t**3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise with ``res`` lattice cells per axis.

    Args:
        shape: (H, W) of the output.
        res: lattice cells along H and W (>= 1); more cells = finer noise.
        rng: source of the gradient directions.

    Returns:
        (H, W) float64, roughly in [-0.7, 0.7], zero on the lattice points.
    """
    # The lattice must divide the grid, so noise is drawn on the next multiple and cropped.
    height, width = (math.ceil(s / r) * r for s, r in zip(shape, res, strict=True))
    cell = (height // res[0], width // res[1])
    rows = (np.arange(height) / cell[0]) % 1.0
    cols = (np.arange(width) / cell[1]) % 1.0
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)  # (H, W, 2) position inside the cell
    angles = 2 * np.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)

    def corner(dr: int, dc: int) -> np.ndarray:
        g = gradients[dr : dr + res[0], dc : dc + res[1]].repeat(cell[0], 0).repeat(cell[1], 1)
        return (np.stack([grid[..., 0] - dr, grid[..., 1] - dc], axis=-1) * g).sum(-1)

    t = _fade(grid)
    top = corner(0, 0) * (1 - t[..., 1]) + corner(0, 1) * t[..., 1]
    bottom = corner(1, 0) * (1 - t[..., 1]) + corner(1, 1) * t[..., 1]
    noise = math.sqrt(2) * (top * (1 - t[..., 0]) + bottom * t[..., 0])
    return noise[: shape[0], : shape[1]]


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    max_exponent: int = PERLIN_MAX_EXPONENT,
    threshold: float = PERLIN_THRESHOLD,
) -> np.ndarray:
    """DRAEM's anomaly shape: Perlin noise of random scale, rotated, thresholded. May be empty.

    Returns:
        (H, W) bool.
    """
    res = tuple(int(2 ** rng.integers(0, max_exponent + 1)) for _ in range(2))
    noise = perlin_noise(shape, res, rng)
    angle = rng.uniform(-PERLIN_ROTATION, PERLIN_ROTATION)
    # Corners left empty by the rotation are filled with 0, below the threshold: no defect there (as in DRAEM).
    noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="constant", cval=0.0)
    return noise > threshold


class TextureSource(Protocol):
    """Anything that returns a texture image of a given size: (H, W) and an RNG -> (H, W, 3) float32 in [0, 1]."""

    def __call__(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray: ...


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 -> (H, W, 3) float32 in [0, 1], bilinear (DRAEM resizes whole textures, no crop)."""
    resized = Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(resized, np.float32) / 255.0


class FolderTextures:
    """Random images from a folder (searched recursively), resized to the requested size.

    Decoded images are kept in memory (up to ``cache_size``), since training draws the same few hundred often.

    Raises:
        DataError: the folder holds no images.
    """

    def __init__(self, folder: str | Path, cache_size: int = 512) -> None:
        self.folder = Path(folder)
        self.paths = find_images([self.folder])
        self.cache_size = cache_size
        self._cache: dict[Path, np.ndarray] = {}

    def __call__(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        path = self.paths[int(rng.integers(len(self.paths)))]
        image = self._cache.get(path)
        if image is None:
            image = read_image(path)
            if len(self._cache) < self.cache_size:
                self._cache[path] = image
        return _resize(image, shape)


class ProceduralTextures:
    """Coloured fractal noise: each channel a sum of Perlin octaves, mixed by a random colour matrix.

    The stand-in for DTD when the user gives no texture folder: it has structure at several scales and random
    colours, so blended patches differ from the good surface in both texture and colour.
    """

    def __init__(self, octaves: int = 4) -> None:
        self.octaves = octaves

    def __call__(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        channels = []
        for _ in range(3):
            base = int(2 ** rng.integers(1, 4))
            field = sum(perlin_noise(shape, (base * 2**o, base * 2**o), rng) / 2**o for o in range(self.octaves))
            low, high = field.min(), field.max()
            channels.append((field - low) / max(high - low, 1e-12))
        mixed = np.stack(channels, -1) @ rng.uniform(0, 1, (3, 3))
        mixed /= max(float(mixed.max()), 1e-12)
        return mixed.astype(np.float32)


def texture_source(folder: str | Path | None) -> TextureSource:
    """Images from ``folder`` when given, else procedural textures."""
    return FolderTextures(folder) if folder else ProceduralTextures()
