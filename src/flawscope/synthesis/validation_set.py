"""Writing a synthetic labelled validation set, so a threshold can be calibrated when no real defects exist.

The folder is laid out like MVTec AD, so ``flawscope calibrate RUN --data OUT`` (F1-optimal threshold) and
``flawscope test`` read it as they read real data:

    OUT/train/good/           the clean images the defects were drawn into (the layout needs a train split)
    OUT/test/good/            other good images, unchanged
    OUT/test/synthetic/       good images with a simulated defect (Perlin mask, texture or homologous blend)
    OUT/ground_truth/synthetic/<stem>_mask.png   the exact masks

Images are written at the model geometry (``image_size`` / ``resize_size``), so masks match pixel for pixel. With a
``resize_size`` (resize, then cut the centre square) they are written before the crop: resized, uncropped, with
every defect inside the square the model will cut, so the model's own resize is the identity and no defect is cut
off. Use
good images the model was not trained on, e.g. a run's held-out validation images (``val_images`` in config.json).
Synthetic defects are not real ones: a threshold calibrated on them is a starting point to check on the line.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flawscope.data import Sample, crop_box, preprocess, read_image
from flawscope.errors import ConfigError, DataError
from flawscope.outputs import portable_stem
from flawscope.synthesis.anomalies import homologous_source, match_grey, simulated_anomaly
from flawscope.synthesis.perlin import TextureSource, texture_source
from flawscope.synthesis.regions import foreground_mask

_MAX_TRIES = 20


def _load(path: Path, image_size: int, resize_size: int) -> np.ndarray:
    """(H', W', 3) float32 in [0, 1]: the model's resize without its crop (S x S when ``resize_size`` is 0)."""
    return preprocess(read_image(path), image_size, resize_size, crop=False).permute(1, 2, 0).numpy()


def _centre(image: np.ndarray, size: int) -> tuple[slice, slice]:
    """Where the model cuts its (size, size) square from ``image`` (H', W', ...)."""
    top, left = crop_box(image.shape[0], image.shape[1], size)
    return slice(top, top + size), slice(left, left + size)


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8) if image.dtype != bool else image * np.uint8(255)
    Image.fromarray(array).save(path)


def synthetic_defect(
    image: np.ndarray,
    other: np.ndarray,
    rng: np.random.Generator,
    textures: TextureSource | None = None,
    hea_prob: float = 0.5,
    use_foreground: bool = False,
    grey: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One simulated defect with a non-empty mask (redrawn until the mask is not empty).

    Args:
        image: (S, S, 3) float32 good image.
        other: (S, S, 3) float32 good image, the homologous source.
        textures: a texture source (see ``texture_source``); None = procedural.
        hea_prob: chance of a texture blend; otherwise a grid-shuffled ``other``.
        use_foreground: centre the defect on the Otsu foreground of ``image``.
        grey: a grey defect on a grey ``image`` (``match_grey``), as a grey camera would see it.

    Returns:
        (defective (S, S, 3) float32 in [0, 1], mask (S, S) bool): the mask is exactly the pixels that changed.

    Raises:
        RuntimeError: no draw in 20 gave a non-empty mask (e.g. a foreground too small for a defect).
    """
    textures = textures or texture_source(None)
    foreground = foreground_mask(image) if use_foreground else None
    for _ in range(_MAX_TRIES):
        if rng.random() < hea_prob:
            source, ops = textures(image.shape[:2], rng), 2
        else:
            source, ops = homologous_source(other, rng), 0
        defective, mask = simulated_anomaly(image, source, rng, foreground, ops)
        if grey:
            defective, mask = match_grey(image, defective, mask)
        if mask.any():
            return defective, mask
    raise RuntimeError(f"No non-empty synthetic defect after {_MAX_TRIES} draws")


def write_synthetic_validation_set(
    images: Sequence[str | Path | Sample],
    out: str | Path,
    *,
    num_defects: int | None = None,
    image_size: int = 256,
    resize_size: int = 0,
    texture_dir: str | Path | None = None,
    use_foreground: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Writes good images and synthetic defects made from them into ``out`` (MVTec layout, see module doc).

    The images are shuffled with ``seed``; ``num_defects`` of them (default: half) receive a defect, the rest go to
    ``test/good``. ``out`` must not exist or be empty; nothing else is written or modified.

    Returns:
        A summary, also written to ``out/synthetic.json``.

    Raises:
        ConfigError: fewer than 2 images, or ``num_defects`` out of range.
        DataError: ``out`` is a non-empty folder, or an image cannot be read (nothing is left in ``out`` then).
    """
    paths = [Path(getattr(item, "path", item)) for item in images]
    out = Path(out)
    if len(paths) < 2:
        raise ConfigError(f"A synthetic validation set needs at least 2 good images; got {len(paths)}.")
    count = len(paths) // 2 if num_defects is None else num_defects
    if not 1 <= count < len(paths):
        raise ConfigError(f"num_defects must be in [1, {len(paths) - 1}] for {len(paths)} images; got {count}.")
    # A staging folder left by a run that was killed is this function's own; anything else is the user's.
    stale = [path for path in out.glob(".partial-*") if path.is_dir() and not path.is_symlink()] if out.is_dir() else []
    if out.exists() and any(path not in stale for path in out.iterdir()):
        raise DataError(f"{out} exists and is not empty; choose a new folder for the synthetic validation set.")
    for path in stale:
        shutil.rmtree(path)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    textures = texture_source(texture_dir)
    defect_paths = [paths[i] for i in order[:count]]
    good_paths = [paths[i] for i in order[count:]]
    # Written into a hidden folder inside ``out`` and moved up at the end, so a failure (an unreadable source image)
    # leaves no partial set behind that would block the next attempt.
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        # Numbered names: two sources may share a stem (000.png and 000.jpg).
        for n, path in enumerate(good_paths):
            name = f"{n:04d}_{portable_stem(path)}.png"
            _save(_load(path, image_size, resize_size), staging / "test" / "good" / name)
        for n, path in enumerate(defect_paths):
            image = _load(path, image_size, resize_size)
            other = _load(paths[int(rng.integers(len(paths)))], image_size, resize_size)
            # Drawn inside the square the model cuts: a defect outside it would be labelled but never seen.
            box, other_box = _centre(image, image_size), _centre(other, image_size)
            defective, mask = image.copy(), np.zeros(image.shape[:2], dtype=bool)
            # grey on a grey image, as PRN's and MLFF's training defects can be: a grey camera sees no colour
            defective[box], mask[box] = synthetic_defect(
                image[box], other[other_box], rng, textures, use_foreground=use_foreground, grey=True
            )
            name = f"{n:04d}_{portable_stem(path)}"
            _save(image, staging / "train" / "good" / f"{name}.png")
            _save(defective, staging / "test" / "synthetic" / f"{name}.png")
            _save(mask, staging / "ground_truth" / "synthetic" / f"{name}_mask.png")
        summary = {
            "num_good": len(good_paths),
            "num_defects": count,
            "image_size": image_size,
            "resize_size": resize_size,
            "textures": str(texture_dir) if texture_dir else "procedural",
            "use_foreground": use_foreground,
            "seed": seed,
            "sources": [str(p) for p in paths],
        }
        (staging / "synthetic.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        for child in staging.iterdir():
            child.rename(out / child.name)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # only what this call wrote
        if created:
            out.rmdir()
        raise
    return summary
