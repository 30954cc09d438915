"""The torch dataset shared by fitting, evaluation and prediction.

Geometry (the SimpleNet/PatchCore recipe, e.g. resize 256 then crop 224): the shorter side is resized to
``resize_size`` with bilinear interpolation and antialiasing, the longer side keeps the aspect ratio, then the centre
``image_size`` x ``image_size`` square is cut out. A mask goes through the very same bilinear resize and crop and is
then thresholded at 0.5, so a mask pixel is a defect when most of its area was; this keeps masks on the image's
sampling grid, where nearest-neighbour resizing would shift them by up to half a pixel.

``resize_size=0`` resizes the whole image to ``image_size`` x ``image_size`` instead (aspect ratio not kept, nothing
cut off), as EfficientAD and anomalib do; use it for parts whose defects may lie near the borders of elongated images.
"""

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from flawscope.data.io import ImageReadingDataset, read_image, read_mask
from flawscope.data.layouts import Sample
from flawscope.errors import ConfigError, DataError


def _resize_size(image_size: int, resize_size: int | None) -> int:
    """Check the two sizes and return the effective resize size (``image_size`` when None)."""
    resize = image_size if resize_size is None else resize_size
    if image_size >= 1 and resize == 0:
        return 0
    if image_size < 1 or resize < image_size:
        raise ConfigError(
            f"image_size must be >= 1 and resize_size 0 or >= image_size (the crop is cut from the resized image); "
            f"got image_size={image_size}, resize_size={resize_size}."
        )
    return resize


MAX_CROP_ASPECT = 16  # longer / shorter side kept before a resize-and-crop; the crop is at most 1 x 1


def _resize(tensor: Tensor, image_size: int, resize_size: int) -> Tensor:
    """The resize of ``_resize_crop`` without its crop.

    Args:
        tensor: (C, H, W) float.
        image_size: Side S of the later crop.
        resize_size: Shorter side after resizing, >= S; 0 resizes the whole image to S x S.

    Returns:
        (C, H', W') float: S x S for ``resize_size`` 0, else the shorter side ``resize_size``.
    """
    if resize_size == 0:
        return F.interpolate(
            tensor[None], size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )[0]
    height, width = tensor.shape[-2:]
    short = min(height, width)
    if max(height, width) > MAX_CROP_ASPECT * short:
        # A very elongated image would be resized whole to a huge intermediate (a 30000 x 1 strip: gigabytes) of
        # which only the centre reaches the crop; keep the central MAX_CROP_ASPECT x short side first.
        keep = MAX_CROP_ASPECT * short
        start = (max(height, width) - keep) // 2
        tensor = tensor[:, start : start + keep] if height > width else tensor[:, :, start : start + keep]
        height, width = tensor.shape[-2:]
    # Same rounding as torchvision's Resize(int), so sizes match the papers' preprocessing.
    if height <= width:
        size = (resize_size, int(resize_size * width / height))
    else:
        size = (int(resize_size * height / width), resize_size)
    return F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def crop_box(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(top, left) of the centre ``image_size`` square that ``preprocess`` cuts from a resized (height, width)."""
    return int(round((height - image_size) / 2.0)), int(round((width - image_size) / 2.0))


def _resize_crop(tensor: Tensor, image_size: int, resize_size: int) -> Tensor:
    """Resize the shorter side to ``resize_size`` and cut the centre square.

    Args:
        tensor: (C, H, W) float.
        image_size: Side S of the output.
        resize_size: Shorter side after resizing, >= S; 0 resizes the whole image to S x S without a crop.

    Returns:
        (C, S, S) float.
    """
    resized = _resize(tensor, image_size, resize_size)
    top, left = crop_box(*resized.shape[-2:], image_size)
    return resized[:, top : top + image_size, left : left + image_size]


def preprocess(image: np.ndarray, image_size: int, resize_size: int | None = None, *, crop: bool = True) -> Tensor:
    """Turn a decoded image into model input.

    Args:
        image: (H, W, 3) uint8 RGB, as returned by ``read_image`` (any strides: ``bgr[:, :, ::-1]`` is fine), or
            (H, W) uint8 grey, which is repeated to RGB as ``read_image`` does.
        image_size: Side S of the centre crop.
        resize_size: Shorter side before cropping; None means ``image_size`` (no crop on square images).
        crop: False returns the resized image the crop would be cut from (``crop_box`` says where). Saved at that
            geometry, an image goes through ``preprocess`` unchanged but for the crop (the resize to its own size is
            the identity), which is how ``flawscope synth`` writes images for a run that crops.

    Returns:
        (3, S, S) float32 in [0, 1]; with ``crop=False`` (3, H', W'), the shorter side ``resize_size`` (S x S when
        it is 0).

    Raises:
        ConfigError: Invalid sizes.
        DataError: ``image`` is not such an array.
    """
    if not isinstance(image, np.ndarray):
        raise DataError(
            f"preprocess() takes a decoded (H, W, 3) uint8 RGB numpy array; got {type(image).__name__}. Decode "
            "files, bytes and PIL images with flawscope.data.read_image() first."
        )
    if image.ndim == 2 and image.dtype == np.uint8:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise DataError(
            f"preprocess() expects an (H, W, 3) uint8 RGB array (H, W >= 1) as read_image() returns; got shape "
            f"{image.shape}, dtype {image.dtype}. Other pixel types (16-bit, float) are decoded by read_image() from "
            "their files or PIL images."
        )
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    resize_size = _resize_size(image_size, resize_size)
    return _resize_crop(tensor, image_size, resize_size) if crop else _resize(tensor, image_size, resize_size)


ENLARGE_LIMIT = 4  # an image enlarged more than this to the model's input is named in a warning (a thumbnail?)


def is_enlarged(size: Sequence[int], image_size: int, resize_size: int) -> bool:
    """True when the model's resize enlarges an image of ``size`` (height, width) more than ``ENLARGE_LIMIT`` times."""
    return min(size) * ENLARGE_LIMIT < (resize_size or image_size)  # the shorter side the model resizes to


def warn_enlarged(
    images: Sequence[tuple[Path, Sequence[int]]], image_size: int, resize_size: int, used: str = "scored"
) -> None:
    """One warning naming the images (path, (height, width)) that the model's resize enlarges more than
    ``ENLARGE_LIMIT`` times: a thumbnail or a wrong file, with none of the detail the model learned (or should).
    ``used`` says what happens to them anyway ("scored", "trained on")."""
    side = resize_size or image_size
    enlarged = [(path, size) for path, size in images if is_enlarged(size, image_size, resize_size)]
    if enlarged:
        path, (height, width) = enlarged[0]
        warnings.warn(
            f"{len(enlarged)} image(s) were enlarged more than {ENLARGE_LIMIT}x to the model's input ({side} px "
            f"shorter side), e.g. {path} ({width} x {height} px): a thumbnail or a wrong file? They were {used}, "
            "but an enlarged image has none of the detail of a full-size one; use the full-size images.",
            stacklevel=3,
        )


def to_uint8_image(image: Tensor) -> np.ndarray:
    """A model input back to pixels: (3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded (for overlays)."""
    return (image.detach().cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def preprocess_mask(mask: np.ndarray, image_size: int, resize_size: int | None = None) -> Tensor:
    """Map a mask through the geometry of ``preprocess``.

    Args:
        mask: (H, W) bool, the size of its image.
        image_size: Side S of the centre crop.
        resize_size: Shorter side before cropping; None means ``image_size``.

    Returns:
        (1, S, S) float32 with values in {0, 1}.
    """
    soft = _resize_crop(torch.tensor(mask)[None].float(), image_size, _resize_size(image_size, resize_size))
    return (soft > 0.5).float()


class ImageDataset(ImageReadingDataset):
    """Decoded, resized and cropped images with their masks.

    Items are dicts: ``image`` (3, S, S) float32 in [0, 1], ``mask`` (1, S, S) float32 in {0, 1} (zeros for good
    images), ``label`` int (1 = defective), ``index`` int (position in ``samples``) and ``size`` (2,) int64, the
    upright file's (height, width).

    Args:
        samples: Images to load, e.g. ``load_dataset(...).test``.
        image_size: Side S of the centre crop.
        resize_size: Shorter side before cropping; None means ``image_size``.
        skip_bad: When True, an image or mask that cannot be used gives a None item and is recorded in
            ``bad_files`` as (path, reason) instead of raising DataError. Recording happens in the loading
            process, so use it with ``num_workers=0``.
    """

    def __init__(
        self, samples: Sequence[Sample], image_size: int, resize_size: int | None = None, skip_bad: bool = False
    ):
        self.samples = list(samples)
        self.image_size = image_size
        self.resize_size = _resize_size(image_size, resize_size)
        self.skip_bad = skip_bad
        self.bad_files: list[tuple[Path, str]] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        sample = self.samples[index]
        try:
            image, mask, size = self._load(sample)
        except DataError as error:
            if not self.skip_bad:
                raise
            if (sample.path, str(error)) not in self.bad_files:  # a second epoch must not list a file twice
                self.bad_files.append((sample.path, str(error)))
            return None
        return {"image": image, "mask": mask, "label": sample.label, "index": index, "size": size}

    def _load(self, sample: Sample) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Return the (3, S, S) image, the (1, S, S) mask and the upright (height, width) of one sample."""
        pixels = read_image(sample.path)
        image = preprocess(pixels, self.image_size, self.resize_size)
        size = (int(pixels.shape[0]), int(pixels.shape[1]))
        if sample.mask_path is None:
            return image, torch.zeros(1, self.image_size, self.image_size), size
        mask = read_mask(sample.mask_path, size=pixels.shape[:2], image_path=sample.path)
        return image, preprocess_mask(mask, self.image_size, self.resize_size), size


def collate(items: list[dict | None]) -> dict | None:
    """Stack dataset items into a batch, dropping the None items of skipped files.

    Args:
        items: Items of ``ImageDataset``.

    Returns:
        None when every item was skipped, else a dict with ``image`` (B, 3, S, S), ``mask`` (B, 1, S, S),
        ``label`` (B,) int64, ``index`` (B,) int64 and ``size`` (B, 2) int64: each file's upright height and width.
    """
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    return {
        "image": torch.stack([item["image"] for item in kept]),
        "mask": torch.stack([item["mask"] for item in kept]),
        "label": torch.tensor([item["label"] for item in kept], dtype=torch.int64),
        "index": torch.tensor([item["index"] for item in kept], dtype=torch.int64),
        "size": torch.tensor([item["size"] for item in kept], dtype=torch.int64),
    }


def make_loader(
    samples: Sequence[Sample],
    image_size: int,
    resize_size: int | None = None,
    batch_size: int = 8,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    skip_bad: bool = False,
) -> DataLoader:
    """Build a DataLoader over an ``ImageDataset``; its batches come from ``collate`` (None if all were skipped).

    Args:
        samples: Images to load.
        image_size: Side S of the centre crop.
        resize_size: Shorter side before cropping; None means ``image_size``.
        batch_size: Images per batch.
        shuffle: Shuffle each epoch, in an order fixed by ``seed``.
        seed: Seed of the shuffling.
        num_workers: Loader worker processes.
        skip_bad: Skip unusable files and list them in ``loader.dataset.bad_files`` (needs ``num_workers=0``).

    Raises:
        ConfigError: Invalid sizes, or ``skip_bad`` with worker processes.
    """
    if skip_bad and num_workers > 0:
        raise ConfigError(
            f"skip_bad=True records bad files in the loading process, so it needs num_workers=0; got "
            f"num_workers={num_workers}. Set num_workers=0 or skip_bad=False."
        )
    dataset = ImageDataset(samples, image_size, resize_size, skip_bad)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        collate_fn=collate,
    )
