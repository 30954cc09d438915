"""A small generated data set in the MVTec AD layout, built from the CC0 texture photos inside scikit-image.

Layout of each category folder ``<root>/<texture>/``::

    train/good/000.png ...                 good crops
    test/good/000.png ...                  good crops
    test/{scratch,blob,stain}/000.png ...  crops with one drawn-in defect
    ground_truth/<type>/000_mask.png       uint8 0/255, exactly the pixels the defect changed
    .flawscope-demo                        marker (JSON settings); only folders carrying it are ever replaced

Train and test never share source pixels: train crops come from the top 60% of the 512 x 512 photo, test crops
from the bottom 40%. Each crop is a 192 px square, turned by a multiple of 90 degrees, maybe mirrored, resized to
``image_size`` and tinted with a fixed mild colour per texture (the photos are grayscale; the tint makes the set RGB).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from tqdm import tqdm

from flawscope.errors import ConfigError, DataError
from flawscope.synthesis.defects import paint_defect, random_blob_mask, random_scratch_mask, random_stain

DEMO_TEXTURES = ("brick", "grass", "gravel")
DEFECT_TYPES = ("scratch", "blob", "stain")
MARKER_NAME = ".flawscope-demo"

_MARKER_FORMAT = 1
_TINTS = {"brick": (1.0, 0.86, 0.74), "grass": (0.84, 1.0, 0.78), "gravel": (0.88, 0.94, 1.0)}
_SOURCE_CROP_SIZE = 192  # fits in the 205 test rows of the 512 px photo
_TRAIN_ROWS_RATIO = 0.6
_MIN_IMAGE_SIZE = 32
_STAIN_COLORS = ((120.0, 72.0, 30.0), (40.0, 36.0, 32.0), (225.0, 220.0, 205.0))  # rust, oil, bleach


def _source_rows(split: str, height: int) -> tuple[int, int]:
    border = int(round(_TRAIN_ROWS_RATIO * height))
    return (0, border) if split == "train" else (border, height)


def _random_view(source: np.ndarray, split: str, texture: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Cut a random tinted RGB view of the photo from the rows reserved for ``split``.

    Returns:
        (image_size, image_size, 3) uint8.
    """
    first, last = _source_rows(split, source.shape[0])
    top = rng.integers(first, last - _SOURCE_CROP_SIZE + 1)
    left = rng.integers(0, source.shape[1] - _SOURCE_CROP_SIZE + 1)
    crop = np.rot90(source[top : top + _SOURCE_CROP_SIZE, left : left + _SOURCE_CROP_SIZE], k=rng.integers(4))
    if rng.integers(2):
        crop = crop[:, ::-1]
    gray = Image.fromarray(np.ascontiguousarray(crop)).resize((image_size, image_size), Image.Resampling.BICUBIC)
    rgb = np.asarray(gray, dtype=np.float64)[..., None] * np.asarray(_TINTS[texture])
    return np.rint(rgb).astype(np.uint8)


def _shifted_color(clean: np.ndarray, mask: np.ndarray, rng: np.random.Generator, shift: tuple[float, float]):
    """Mean colour under the mask, made darker or brighter by a random amount from ``shift`` (grey levels)."""
    mean = clean[mask].mean(axis=0)
    sign = rng.choice((-1.0, 1.0))
    return np.clip(mean + sign * rng.uniform(*shift) + rng.uniform(-12, 12, size=3), 0, 255)


def draw_defect(clean: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of type ``kind`` into a copy of ``clean``.

    Args:
        clean: (H, W, 3) uint8 good image. Not modified.
        kind: One of ``DEFECT_TYPES``.
        rng: Source of randomness.

    Returns:
        painted: (H, W, 3) uint8, equal to ``clean`` exactly outside the mask.
        mask: (H, W) bool, exactly the pixels that differ from ``clean``.
    """
    shape = clean.shape[:2]
    if kind == "scratch":
        mask = random_scratch_mask(shape, rng)
        alpha, color = mask * rng.uniform(0.75, 0.95), _shifted_color(clean, mask, rng, (70, 110))
    elif kind == "blob":
        mask = random_blob_mask(shape, rng)
        alpha, color = mask * rng.uniform(0.6, 0.8), _shifted_color(clean, mask, rng, (60, 100))
    else:
        alpha, mask = random_stain(shape, rng)
        alpha, color = alpha * rng.uniform(0.6, 0.85), _STAIN_COLORS[rng.integers(len(_STAIN_COLORS))]
    return paint_defect(clean, alpha, color), mask


def _settings(texture: str, image_size: int, num_train: int, num_test_good: int, num_test_per_defect: int, seed: int):
    return {
        "format": _MARKER_FORMAT,
        "texture": texture,
        "image_size": image_size,
        "num_train": num_train,
        "num_test_good": num_test_good,
        "num_test_per_defect": num_test_per_defect,
        "seed": seed,
    }


def _planned_files(folder: Path, settings: dict) -> list[tuple[Path, str, str | None]]:
    """Every image of a category in writing order, with its split and defect type (None for good images)."""
    plan = [(folder / "train" / "good" / f"{i:03d}.png", "train", None) for i in range(settings["num_train"])]
    plan += [(folder / "test" / "good" / f"{i:03d}.png", "test", None) for i in range(settings["num_test_good"])]
    for kind in DEFECT_TYPES:
        plan += [
            (folder / "test" / kind / f"{i:03d}.png", "test", kind) for i in range(settings["num_test_per_defect"])
        ]
    return plan


def _mask_path(folder: Path, image_path: Path, kind: str) -> Path:
    return folder / "ground_truth" / kind / f"{image_path.stem}_mask.png"


def _read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # unreadable marker: still our folder, but not known to be complete


def _is_complete(folder: Path, settings: dict) -> bool:
    marker = _read_marker(folder)
    if not marker.get("complete") or {k: marker.get(k) for k in settings} != settings:
        return False
    plan = _planned_files(folder, settings)
    return all(path.is_file() and (kind is None or _mask_path(folder, path, kind).is_file()) for path, _, kind in plan)


def _needs_writing(folder: Path, settings: dict, overwrite: bool) -> bool:
    """Decide what to do with an existing category folder; raise rather than touch anything that is not ours."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        raise DataError(f"Cannot write the demo category to {folder}: it is a file. Choose another demo root.")
    if not (folder / MARKER_NAME).is_file():
        if any(folder.iterdir()):
            raise DataError(
                f"{folder} exists and was not made by 'flawscope demo' (no {MARKER_NAME} file inside). "
                "It is left untouched; choose another demo root or move the folder away."
            )
        return True
    if overwrite:
        return True
    if _is_complete(folder, settings):
        return False
    marker = _read_marker(folder)
    if marker.get("complete") and {k: marker.get(k) for k in settings} != settings:
        raise DataError(
            f"The demo folder {folder} was made with other settings ({ {k: marker.get(k) for k in settings} }); "
            f"asked for {settings}. Pass overwrite=True (--overwrite) to regenerate it, or choose another root."
        )
    return True  # an interrupted or damaged earlier run: ours to redo


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_category(folder: Path, settings: dict, progress: bool) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    # The marker goes in first so an interrupted run still marks the folder as ours; 'complete' is set last.
    marker = folder / MARKER_NAME
    marker.write_text(json.dumps({**settings, "complete": False}, indent=2), encoding="utf-8")
    texture, size = settings["texture"], settings["image_size"]
    source = getattr(skimage.data, texture)()
    # Keyed by the texture's fixed position, so asking for a subset of textures gives the same images.
    rng = np.random.default_rng([settings["seed"], DEMO_TEXTURES.index(texture)])
    plan = _planned_files(folder, settings)
    for path, split, kind in tqdm(plan, desc=f"demo {texture}", unit="image", disable=not progress):
        image = _random_view(source, split, texture, size, rng)
        if kind is not None:
            image, mask = draw_defect(image, kind, rng)
            _save_png(mask.astype(np.uint8) * 255, _mask_path(folder, path, kind))
        _save_png(image, path)
    marker.write_text(json.dumps({**settings, "complete": True}, indent=2), encoding="utf-8")


def _check_arguments(textures: Sequence[str], image_size: int, counts: dict[str, int]) -> None:
    unknown = [t for t in textures if t not in DEMO_TEXTURES]
    if unknown or not textures:
        raise ConfigError(
            f"Unknown demo texture(s) {unknown or list(textures)}. Available: {', '.join(DEMO_TEXTURES)}."
        )
    if len(set(textures)) != len(textures):
        raise ConfigError(f"Demo textures must not repeat; got {list(textures)}.")
    if image_size < _MIN_IMAGE_SIZE:
        raise ConfigError(f"The 'image_size' of the demo set must be >= {_MIN_IMAGE_SIZE} px; got {image_size}.")
    for name, value in counts.items():
        if value < 1:
            raise ConfigError(f"The '{name}' of the demo set must be >= 1; got {value}.")


def make_demo_dataset(
    root: str | Path,
    *,
    textures: Sequence[str] = DEMO_TEXTURES,
    image_size: int = 256,
    num_train: int = 60,
    num_test_good: int = 20,
    num_test_per_defect: int = 10,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Generate the demo data set (one MVTec-style category per texture) under ``root``.

    The output is the same, byte for byte, for the same arguments. A category folder that already holds a complete
    demo with the same settings is reused as is; one made with other settings is only replaced with
    ``overwrite=True``. A folder that was not made by this function is never modified.

    Args:
        root: Folder to write into; created if missing.
        textures: Subset of ``DEMO_TEXTURES``.
        image_size: Side of the square RGB images in px (>= 32).
        num_train: Good training images per texture.
        num_test_good: Good test images per texture.
        num_test_per_defect: Test images per defect type (scratch, blob, stain) and texture.
        seed: Seed of the random crops and defects.
        overwrite: Regenerate demo folders even when they are complete.
        progress: Show a progress bar per texture (the default set takes a few seconds).

    Returns:
        The category folders ``root/<texture>``, in the order of ``textures``.

    Raises:
        ConfigError: An argument is out of range or names an unknown texture.
        DataError: A category folder exists and is not a flawscope demo folder, or is one with other settings.
    """
    counts = {"num_train": num_train, "num_test_good": num_test_good, "num_test_per_defect": num_test_per_defect}
    _check_arguments(textures, image_size, counts)
    root = Path(root)
    folders = [root / texture for texture in textures]
    all_settings = [_settings(t, image_size, num_train, num_test_good, num_test_per_defect, seed) for t in textures]
    # Decide for every category before writing any, so a refusal leaves nothing half done.
    todo = [_needs_writing(f, s, overwrite) for f, s in zip(folders, all_settings, strict=True)]
    for folder, settings, needed in zip(folders, all_settings, todo, strict=True):
        if needed:
            _write_category(folder, settings, progress)
    return folders
