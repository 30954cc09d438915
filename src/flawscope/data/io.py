"""Robust image and mask decoding: every supported file becomes an RGB uint8 array or a clear DataError.

Decoding rules (the same for training, evaluation and prediction, so a model never sees two encodings of one scene):

- EXIF orientation is applied, so arrays are upright as image viewers show them.
- Grayscale, palette, CMYK and YCbCr images are converted to RGB.
- Transparent images (RGBA, LA, palette with transparency) are composited on black: the colour stored under a fully
  transparent pixel is arbitrary, black makes it deterministic and matches the zero padding models see at borders.
- 16-bit integer images are scaled linearly, 65535 -> 255 (``round(v / 257)``), never clipped; float images are
  taken as [0, 1] when their maximum is at most 1 and as 16-bit values otherwise.
"""

import contextlib
import io
import os
import re
import warnings
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import (
    BmpImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    MpoImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)
from torch.utils.data import Dataset

from flawscope.errors import ConfigError, DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
# The only decoders Pillow may use, whatever a file's name says: Pillow otherwise guesses the format from the content,
# and some formats (EPS) run external programs (Ghostscript) on a stranger's file. MPO is the JPEG of many cameras.
# The imports above register their decoders (Pillow loads most plugins lazily; Image.open(formats=...) needs them).
# Which names a plugin registers depends on the Pillow version (MPO opens through JPEG in newer ones).
DECODER_FORMATS = tuple(name for name in ("PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF", "WEBP") if name in Image.OPEN)
_PLUGINS = (BmpImagePlugin, JpegImagePlugin, MpoImagePlugin, PngImagePlugin, TiffImagePlugin, WebPImagePlugin)

PIXEL_LIMIT_ENV = "FLAWSCOPE_MAX_IMAGE_PIXELS"
_SIXTEEN_BIT_MAX = 65535
# Pillow's modes holding more than 8 bits per pixel in a single channel.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def is_image_file(path: Path) -> bool:
    """Return True for a visible file whose extension (any case) is in ``IMAGE_EXTENSIONS``.

    Hidden files are excluded because macOS copies leave ``._name.png`` metadata files next to real images.
    """
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def set_pixel_limit_from_environment() -> None:
    """Sets Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, the largest image flawscope reads)
    from the environment variable ``FLAWSCOPE_MAX_IMAGE_PIXELS`` when it is set; 0 removes the limit.

    Applied when this module is imported (so also in worker processes), and again by every command line command,
    which reports a bad value.

    Raises:
        ConfigError: the variable is not a whole number >= 0.
    """
    value = os.environ.get(PIXEL_LIMIT_ENV)
    if value is None:
        return
    if not re.fullmatch(r"\s*[0-9]+\s*", value):
        raise ConfigError(f"{PIXEL_LIMIT_ENV}={value!r}: expected a whole number of pixels (0: no limit).")
    Image.MAX_IMAGE_PIXELS = int(value) or None


class ImageReadingDataset(Dataset):
    """Base of the datasets that read image files: carries the pixel limit into DataLoader worker processes.

    Workers started with ``spawn`` (the default on Windows and macOS) import flawscope afresh, so a limit set in
    Python (``PIL.Image.MAX_IMAGE_PIXELS``) would be lost there; it travels with the pickled dataset instead.
    """

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pixel_limit": Image.MAX_IMAGE_PIXELS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        Image.MAX_IMAGE_PIXELS = state.pop("_pixel_limit", Image.MAX_IMAGE_PIXELS)
        self.__dict__.update(state)


def _too_many_pixels(path: Path | str, pixels: int | None, limit: int | None = None) -> DataError:
    size = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
    if limit is not None:  # the caller's own limit (read_image's max_pixels)
        return DataError(f"Cannot read {path}: the image has {size}, above max_pixels={limit:,}.")
    return DataError(
        f"Cannot read {path}: the image has {size}, above the safety limit of {Image.MAX_IMAGE_PIXELS:,} pixels (a "
        f"guard against decompression bombs). Downscale the image, or, if the file is trusted, raise the limit: the "
        f"environment variable {PIXEL_LIMIT_ENV}=N (0: no limit), or PIL.Image.MAX_IMAGE_PIXELS in Python."
    )


def _check_pixel_count(size: tuple[int, int], path: Path | str, max_pixels: int | None = None) -> None:
    """Refuses an image above ``max_pixels`` or ``PIL.Image.MAX_IMAGE_PIXELS``. Pillow itself only warns up to twice
    its limit; a check of the size, unlike turning its warning into an error, is safe with several threads reading
    at once."""
    pixels = size[0] * size[1]
    if max_pixels is not None and pixels > max_pixels:
        raise _too_many_pixels(path, pixels, max_pixels)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and pixels > limit:
        raise _too_many_pixels(path, pixels)


def _existing_file(path: str | PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        what = (
            "is a folder, not an image file"
            if path.is_dir()
            else "is not a regular file (a device, pipe or socket)"
            if path.exists()
            else "does not exist"
        )
        raise DataError(f"Image file {path} {what}. Check the path, or pass the folder to find_images().")
    return path


def _open_upright(
    source: Path | BinaryIO | Image.Image, path: Path | str, max_pixels: int | None = None, decode: bool = True
) -> Image.Image | None:
    """Decode a file, binary stream or PIL image (``path`` names it in messages) fully and apply its EXIF
    orientation, turning every decoder failure into a DataError. ``decode=False`` reads the file's header only (the
    format and size checks) and returns the closed, undecoded image, whose ``size`` is the stored one."""
    if isinstance(source, io.TextIOBase) or getattr(source, "closed", False):
        what = "open in text mode: open it with 'rb'" if isinstance(source, io.TextIOBase) else "closed: open it again"
        raise DataError(f"Cannot read {path}: the file object is {what}, or pass its path.")
    try:
        if isinstance(source, Image.Image):  # possibly lazy (Image.open): decode it here too
            _check_pixel_count(source.size, path, max_pixels)
            source.load()
            return ImageOps.exif_transpose(source)
        with Image.open(source, formats=DECODER_FORMATS) as image:
            _check_pixel_count(image.size, path, max_pixels)  # before decoding: Image.open reads only the header
            if not decode:
                return image
            image.load()  # Image.open is lazy; decode now so truncation surfaces here, not later in a worker.
            return ImageOps.exif_transpose(image)
    except DataError:
        raise  # a subclass of ValueError, caught below otherwise
    except UnidentifiedImageError as error:
        raise DataError(
            f"Cannot read {path}: it is not an image format flawscope can decode (is the extension wrong, or is it "
            f"another kind of file?). Supported: {', '.join(IMAGE_EXTENSIONS)}. Convert it or remove it from the "
            f"data folder."
        ) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # Pillow's own, above 2x
        found = re.search(r"\((\d+) pixels\)", str(error))
        raise _too_many_pixels(path, int(found[1]) if found else None) from error
    except PermissionError as error:
        raise DataError(
            f"Cannot read {path}: permission denied. Give the user running flawscope read access to it, or remove it "
            f"from the data folder."
        ) from error
    except (OSError, ValueError, SyntaxError, AssertionError) as error:  # Pillow asserts on a closed lazy image
        raise DataError(
            f"Cannot decode {path}: the file is truncated or corrupt ({error}). Re-export or re-copy the file, or "
            f"remove it from the data folder."
        ) from error


def check_image_header(path: str | PathLike) -> tuple[int, int]:
    """Reads only the header of an image file: a cheap check, for folders too large to decode twice, that it is an
    image flawscope can decode and not too large. A file damaged after its header passes; ``read_image`` finds it.

    Returns:
        (height, width) as stored (before the EXIF orientation, which may swap them).

    Raises:
        DataError: what ``read_image`` would say about the header.
    """
    width, height = _open_upright(_existing_file(path), path, decode=False).size
    return height, width


def _wide_to_uint8(image: Image.Image, path: Path | str) -> np.ndarray:
    """Scale a 16-bit or float single-channel image to uint8 (H, W) without clipping the upper range."""
    values = np.asarray(image, dtype=np.float64)
    peak = values.max(initial=0.0)
    full_scale = 1.0 if image.mode == "F" and peak <= 1.0 else _SIXTEEN_BIT_MAX
    if full_scale == _SIXTEEN_BIT_MAX and 1.0 < peak <= 255:
        # Likely 8-bit values saved in a wide format (e.g. PIL's convert("I")); the rule cannot tell them from a
        # nearly black 16-bit image, so it keeps the 16-bit scale and says so.
        warnings.warn(
            f"{path} is a {image.mode} image whose values are all at most {peak:g}: read as 16-bit (65535 = white) "
            "it is nearly black. If it holds 8-bit values, save it as an 8-bit image.",
            stacklevel=2,
        )
    return np.round(np.clip(values, 0.0, full_scale) * (255.0 / full_scale)).astype(np.uint8)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def _to_rgb(image: Image.Image, path: Path | str) -> np.ndarray:
    """Convert any decoded PIL image to an (H, W, 3) uint8 RGB array following the module's rules."""
    if image.mode in _WIDE_MODES:
        gray = _wide_to_uint8(image, path)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if _has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        composited = (rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255
        return composited.astype(np.uint8)
    try:
        return np.array(image.convert("RGB"), dtype=np.uint8)  # a copy: arrays over PIL buffers are read-only
    except ValueError as error:
        raise DataError(
            f"Cannot convert {path} (Pillow mode {image.mode!r}) to RGB. Save it as 8-bit RGB or grayscale."
        ) from error


def read_image(source: str | PathLike | bytes | BinaryIO | Image.Image, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as upright RGB, following the module's decoding rules whatever the source.

    Args:
        source: An image file path (the format is detected from the content, whatever the name; folder listings
            pick files by ``IMAGE_EXTENSIONS``), the encoded bytes of such a file (a service's upload), an open
            binary file object, or a PIL image.
        max_pixels: refuse images of more pixels than this, before decoding (a service can set its camera's size:
            decoding a 9000 x 9000 upload takes over a gigabyte); None: only the process-wide limit applies.

    Returns:
        Array of shape (H, W, 3), dtype uint8, RGB.

    Raises:
        DataError: The file is missing, not an image, truncated, corrupt or in an unsupported pixel mode, or the
            source is of another type; the message names the file and the fix.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(_open_upright(source, "the PIL image", max_pixels), "the PIL image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _to_rgb(_open_upright(io.BytesIO(source), "the image bytes", max_pixels), "the image bytes")
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "the image stream"))
        return _to_rgb(_open_upright(source, name, max_pixels), name)
    if isinstance(source, (str, PathLike)):
        path = _existing_file(source)
        return _to_rgb(_open_upright(path, path, max_pixels), path)
    raise DataError(
        f"read_image() takes a file path, encoded bytes, a binary file object or a PIL image; got "
        f"{type(source).__name__}. An (H, W, 3) uint8 RGB array is already decoded: give it to preprocess()."
    )


_LOSSY_MASK_EXTENSIONS = (".jpg", ".jpeg")


def _mask_to_bool(image: Image.Image, lossy: bool = False) -> np.ndarray:
    """Nonzero colour (alpha ignored) means defect; palettes are resolved to colours first. A ``lossy`` (JPEG)
    mask is cut at half its range instead: its compression leaves faint nonzero pixels along every edge."""
    if image.mode in ("P", "RGBA", "LA", "PA") or (lossy and image.mode != "L"):
        image = image.convert("RGB")
    values = np.asarray(image)
    if lossy:
        return (values.max(axis=2) if values.ndim == 3 else values) >= 128
    return values.any(axis=2) if values.ndim == 3 else values != 0


def read_mask(path: str | Path, size: tuple[int, int] | None = None, image_path: Path | None = None) -> np.ndarray:
    """Read a ground-truth mask; any nonzero pixel marks a defect (MVTec uses 255, VisA instance ids, MVTec LOCO one
    value per defect type).

    A JPEG mask is the exception: compression leaves faint nonzero pixels around every edge, so a pixel marks a
    defect when a channel reaches 128 (of 255). Masks are best saved as PNG.

    Args:
        path: Mask image file, or a folder of mask images whose union is the mask (MVTec LOCO keeps one mask per
            defect of an image in ``ground_truth/<type>/<image stem>/``).
        size: Expected (H, W), the size of the image the mask belongs to; None skips the check (a folder's masks
            are still checked against each other).
        image_path: The image the mask belongs to, named in the error message when the sizes differ.

    Returns:
        Array of shape (H, W), dtype bool, True where the image is defective.

    Raises:
        DataError: A mask is unreadable, or its size differs from ``size`` (or, in a folder, from the first mask's),
            or a mask folder holds no mask image.
    """
    path = Path(path)
    if not path.is_dir():
        return _read_mask_file(path, size, image_path)
    files = sorted((p for p in path.iterdir() if is_image_file(p)), key=Path.as_posix)
    if not files:
        raise DataError(
            f"Mask folder {path} holds no mask image (extensions {', '.join(IMAGE_EXTENSIONS)}). Add the defect's "
            "masks, or remove the folder and its image from the test set."
        )
    mask = _read_mask_file(files[0], size, image_path)
    for file in files[1:]:
        mask |= _read_mask_file(file, mask.shape, image_path if size is not None else None)
    return mask


def _read_mask_file(path: Path, size: tuple[int, int] | None, image_path: Path | None) -> np.ndarray:
    """One mask image as (H, W) bool, checked against ``size``."""
    path = _existing_file(path)
    mask = _mask_to_bool(_open_upright(path, path), lossy=path.suffix.lower() in _LOSSY_MASK_EXTENSIONS)
    if size is not None and mask.shape != tuple(size):
        owner = f"its image {image_path}" if image_path is not None else "the expected size"
        raise DataError(
            f"Mask {path} is {mask.shape[0]}x{mask.shape[1]} (height x width) but {owner} is "
            f"{size[0]}x{size[1]}. A mask must have exactly the size of its image; re-export the mask at "
            f"{size[0]}x{size[1]}."
        )
    return mask


with contextlib.suppress(ConfigError):  # the command line reports a bad value; an import does not fail on it
    set_pixel_limit_from_environment()
