"""PRN's anomaly generators: simulated (Perlin-masked blends) and extended (augmented real defects) anomalies.

All generators take good images (H, W, 3) float32 in [0, 1] and a numpy Generator, and return ``(image, mask)``:
the new image and an (H, W) bool mask that is exactly the set of pixels that changed. Blending ``(1 - beta) *
source + beta * good`` can leave a masked pixel unchanged (a source pixel equal to the good one); such pixels are
moved by ``min_change`` so the mask stays exact. A mask that misses the target area is redrawn (up to 10 times);
one that stays empty leaves the good image unchanged, and the sample counts as normal (DRAEM).

* :func:`simulated_anomaly`: Perlin mask within a target area, blended with a texture (heterologous, HEA) or with
  a grid-shuffled good image (homologous, HOA, :func:`homologous_source`).
* :func:`extended_anomaly`: a seen real defect, colour-augmented and moved by a random affine map, cut by a target
  area and blended into a good image (PRN Eq. 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flawscope.errors import DataError
from flawscope.synthesis.augment import AFFINE_RANGES, colour_augment, random_affine
from flawscope.synthesis.perlin import PERLIN_MAX_EXPONENT, PERLIN_THRESHOLD, perlin_mask
from flawscope.synthesis.regions import TARGET_SHAPES, target_area

OPACITY_RANGE = (0.0, 0.8)  # beta ~ U(0, 0.8), the share of the good image kept under the mask (DRAEM, PRN)
MIN_CHANGE = 1.0 / 255.0
MAX_TRIES = 10


def _check_pair(image: np.ndarray, other: np.ndarray, what: str) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or other.shape[:2] != image.shape[:2]:
        raise DataError(
            f"{what} must be (H, W, 3) images of one size; got {image.shape} and {other.shape}. Resize them to the "
            "model geometry first (flawscope.data.preprocess)."
        )


def blend(
    image: np.ndarray, source: np.ndarray, mask: np.ndarray, beta: float, min_change: float = MIN_CHANGE
) -> np.ndarray:
    """``(1 - beta) * source + beta * image`` under ``mask``, ``image`` elsewhere; every masked pixel changes.

    A masked pixel whose largest channel change is below ``min_change`` is moved by ``min_change`` in every
    channel (up, or down where that would leave [0, 1]).

    Args:
        image: (H, W, 3) float32 in [0, 1]; not modified.
        source: (H, W, 3) float32 in [0, 1].
        mask: (H, W) bool.
        beta: opacity of the good image under the mask, in [0, 1).

    Returns:
        (H, W, 3) float32, bit-identical to ``image`` outside ``mask``.
    """
    out = image.copy()
    out[mask] = (1.0 - beta) * source[mask] + beta * image[mask]
    old, new = image[mask], out[mask]
    barely = np.abs(new - old).max(-1) < min_change
    pushed = old[barely] + min_change
    pushed = np.where(pushed > 1.0, old[barely] - min_change, pushed)
    new[barely] = pushed
    out[mask] = new
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def match_grey(image: np.ndarray, new: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Makes a synthetic defect grey when the good image is: a grey camera cannot see a coloured one.

    Args:
        image: the good image, (H, W, 3) float32.
        new, mask: a generator's output for it, (H, W, 3) float32 and (H, W) bool, exactly the changed pixels.

    Returns:
        (new, mask) unchanged for a colour image; for a grey one (its channels within half a grey level of each
        other everywhere) ``new`` with every changed pixel the mean of its three channels, and the mask cut to the
        pixels that still differ, so it stays exact (and may, rarely, become empty: a normal sample then).
    """
    if not np.issubdtype(image.dtype, np.floating) or not np.issubdtype(new.dtype, np.floating):
        raise TypeError(f"match_grey takes float images in [0, 1]; got {image.dtype} and {new.dtype}.")
    if np.ptp(image, axis=2).max() > 0.5 / 255:
        return new, mask
    grey = image.copy()  # outside the mask the good pixels, exactly (a float mean of three equal values may round)
    grey[mask] = new[mask].mean(axis=1, keepdims=True, dtype=np.float32)
    return grey, mask & (grey != image).any(axis=2)


def grid_shuffle(image: np.ndarray, rng: np.random.Generator, grid: int = 8) -> np.ndarray:
    """Cuts the image into ``grid`` x ``grid`` cells and reassembles them in random order (MemSeg, PRN's HOA).

    When the sides are not multiples of ``grid`` the last rows/columns stay where they are.
    """
    height, width = image.shape[:2]
    ch, cw = height // grid, width // grid
    if ch == 0 or cw == 0:
        return image.copy()
    cells = image[: ch * grid, : cw * grid].reshape(grid, ch, grid, cw, -1).transpose(0, 2, 1, 3, 4)
    cells = cells.reshape(grid * grid, ch, cw, -1)[rng.permutation(grid * grid)]
    out = image.copy()
    out[: ch * grid, : cw * grid] = (
        cells.reshape(grid, grid, ch, cw, -1).transpose(0, 2, 1, 3, 4).reshape(ch * grid, cw * grid, -1)
    )
    return out


def homologous_source(image: np.ndarray, rng: np.random.Generator, grid: int = 8, num_ops: int = 2) -> np.ndarray:
    """HOA blend source: a good image, colour-augmented, then grid-shuffled."""
    return grid_shuffle(colour_augment(image, rng, num_ops), rng, grid)


def simulated_anomaly(
    image: np.ndarray,
    source: np.ndarray,
    rng: np.random.Generator,
    foreground: np.ndarray | None = None,
    num_ops: int = 2,
    max_exponent: int = PERLIN_MAX_EXPONENT,
    threshold: float = PERLIN_THRESHOLD,
    opacity: tuple[float, float] = OPACITY_RANGE,
    use_target_area: bool = True,
    tries: int = MAX_TRIES,
    shapes: Sequence[str] = TARGET_SHAPES,
) -> tuple[np.ndarray, np.ndarray]:
    """PRN Eq. 6: S = M̄ ⊙ N + (1 - β)(M ⊙ A) + β(M ⊙ N), M = threshold(Perlin) ∩ target area.

    Args:
        image: the good image N, (H, W, 3) float32 in [0, 1].
        source: blend source before Aug_1: a texture (HEA) or :func:`homologous_source` output (HOA, pass
            ``num_ops=0`` there since it is already augmented).
        rng: source of randomness.
        foreground: (H, W) bool, where the target area may be centred; None = anywhere. Without a target area the
            mask is still cut to the foreground.
        num_ops: colour operations applied to ``source`` (Aug_1).
        use_target_area: False drops the target area (PRN's ablation without TA).
        tries: mask draws until one is non-empty; 1 is DRAEM's rule (an empty mask leaves a normal sample).
        shapes: the target-area shapes drawn from.

    Returns:
        (image, mask): (H, W, 3) float32 and (H, W) bool, the mask exactly the changed pixels.
    """
    _check_pair(image, source, "simulated_anomaly's image and source")
    if tries < 1:
        raise ValueError(f"simulated_anomaly needs tries >= 1; got {tries}.")
    for _ in range(tries):
        # Redrawn while it misses the target area, as PRN redraws Aug_2 for extended anomalies; the Perlin
        # threshold alone leaves ~5 % of masks empty, the intersection with a target area ~40 %.
        mask = perlin_mask(image.shape[:2], rng, max_exponent, threshold)
        if use_target_area:
            mask &= target_area(image.shape[:2], rng, foreground, shapes=shapes)
        if foreground is not None:
            mask &= foreground
        if mask.any():
            break
    if not mask.any():
        return image.copy(), mask
    textured = colour_augment(source, rng, num_ops) if num_ops else source
    return blend(image, textured, mask, float(rng.uniform(*opacity))), mask


def extended_anomaly(
    image: np.ndarray,
    defect: np.ndarray,
    defect_mask: np.ndarray,
    rng: np.random.Generator,
    foreground: np.ndarray | None = None,
    num_ops: int = 2,
    opacity: tuple[float, float] = OPACITY_RANGE,
    use_target_area: bool = True,
    shapes: Sequence[str] = TARGET_SHAPES,
    affine: Sequence[float] = AFFINE_RANGES,
) -> tuple[np.ndarray, np.ndarray]:
    """PRN Eq. 4: a seen defect, Aug_1 then Aug_2, cut by a target area, blended into a good image.

    The target area is drawn once; Aug_2 (the affine map) is redrawn, up to 10 times, until the moved defect
    overlaps it (and the foreground), as the paper does. If it never does, a new target area is centred on a pixel
    of the last moved defect, so the cut is kept and a non-empty defect gives a non-empty mask unless every
    try moved it entirely outside the image or the foreground.

    Args:
        image: the good image N, (H, W, 3) float32 in [0, 1].
        defect: (H, W, 3) float32, a seen defective image at the same size.
        defect_mask: (H, W) bool, its ground truth.
        foreground: (H, W) bool, where the target area may be centred and the defect may land.
        shapes: the target-area shapes drawn from.
        affine: Aug_2's ranges: rotation and shear (degrees), shift (fraction of the side), see random_affine.

    Returns:
        (image, mask) as :func:`simulated_anomaly`.
    """
    _check_pair(image, defect, "extended_anomaly's image and defect")
    coloured = colour_augment(defect, rng, num_ops) if num_ops else defect
    area = target_area(image.shape[:2], rng, foreground, shapes=shapes) if use_target_area else None
    for _ in range(MAX_TRIES):
        moved, moved_mask = random_affine(coloured, defect_mask, rng, *affine)
        if foreground is not None:
            moved_mask &= foreground
        region = moved_mask if area is None else moved_mask & area
        if region.any():
            break
    else:
        if area is not None and moved_mask.any():  # Aug_2 kept missing the area: centre one on the moved defect
            region = moved_mask & target_area(image.shape[:2], rng, moved_mask, shapes=shapes)
    if not region.any():
        return image.copy(), region
    return blend(image, moved, region, float(rng.uniform(*opacity))), region
