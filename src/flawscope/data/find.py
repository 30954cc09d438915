"""Finding the images a command is given: files, folders searched recursively, glob patterns (predict, distill).

Folders that hold copies (hidden folders, thumbnails, a NAS's index) and flawscope's own outputs are passed over;
image formats flawscope does not read are named, not silently skipped. Lists are sorted as in ``layouts``.
"""

import glob
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from flawscope.data.io import IMAGE_EXTENSIONS, is_image_file
from flawscope.data.layouts import sorted_paths
from flawscope.errors import DataError
from flawscope.outputs import drop_output_images

# Image formats a folder search passes over (IMAGE_EXTENSIONS are read); find_images names those it met, as a user
# who drops camera RAW or GIF files into a folder would otherwise not learn why they are missing from the results.
UNREAD_IMAGE_EXTENSIONS = (".gif", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".dng", ".cr2", ".nef", ".arw", ".psd")


def _images_below(folder: Path, unread: list[Path] | None = None) -> list[Path]:
    """The images anywhere below ``folder``, hidden folders left out: they hold tool caches (.ipynb_checkpoints,
    .thumbnails, a Synology NAS's @eaDir) with copies of the images. Files of UNREAD_IMAGE_EXTENSIONS go to
    ``unread`` when it is given."""
    images = []
    for path in folder.rglob("*"):
        if any(part.startswith(".") or part == "@eaDir" for part in path.relative_to(folder).parts):
            continue
        if is_image_file(path):
            images.append(path)
        elif unread is not None and path.suffix.lower() in UNREAD_IMAGE_EXTENSIONS and path.is_file():
            unread.append(path)
    return images


def _drop_ground_truth(paths: list[Path], searched: Path) -> list[Path]:
    """``paths`` without the masks in ``ground_truth/`` folders below ``searched`` (a data set root given to
    predict), with one warning: a mask is not a picture of a part. A ground_truth folder named directly is read."""
    masks = [
        path for path in paths if any(part.lower() == "ground_truth" for part in path.relative_to(searched).parts[:-1])
    ]
    if masks:
        warnings.warn(
            f"{len(masks)} image(s) under {searched} are in ground_truth/ folders (defect masks, e.g. {masks[0]}) and "
            "were not read as inputs; name the folder to score them.",
            stacklevel=4,
        )
    dropped = set(masks)
    return [path for path in paths if path not in dropped]


def _expand(item: Path, unread: list[Path] | None = None) -> list[Path]:
    """Images named by one argument: a file, a folder (searched recursively) or a glob pattern; image files of
    formats flawscope does not read, found below a folder, go to ``unread``.

    flawscope's own overlays and masks are left out, below a folder and wherever a glob reaches them, and so are a
    data set's masks in ground_truth/ folders below a folder; a folder named directly is read whole.
    """
    if item.is_dir():
        return _drop_ground_truth(drop_output_images(_images_below(item, unread), item, top=item), item)
    if item.is_file():
        if item.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(
                f"{item} is not an image file: expected one of the extensions {', '.join(IMAGE_EXTENSIONS)}."
            )
        return [item]
    if any(char in str(item) for char in "*?["):
        matches = [Path(match) for match in glob.glob(str(item), recursive=True)]
        found = [path for path in matches if is_image_file(path)]
        found += [path for folder in matches if folder.is_dir() for path in _images_below(folder, unread)]
        return drop_output_images(sorted_paths(set(found)), item)
    what = "is not a regular file (a device, pipe or socket)" if item.exists() else "does not exist"
    raise DataError(f"{item} {what}. Pass image files, folders or glob patterns such as 'images/*.png'.")


def find_images(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Collect the images to predict on.

    Args:
        paths: Image files, folders (searched recursively; non-image and hidden files are skipped) and glob
            patterns (``**`` allowed). A single str or Path is accepted too.

    Returns:
        Image paths sorted by their characters, each path once (also when named twice, e.g. relative and absolute);
        ``~`` is expanded.

    Raises:
        DataError: A path does not exist, a file is not an image, or nothing was found.
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    # The same name given twice (relative and absolute, or a file also in a folder given; in any case where the file
    # system ignores case) is read once, under its first spelling; links to one file under other names are kept.
    unique: dict[str, Path] = {}
    unread: list[Path] = []
    for item in items:
        for path in _expand(Path(item).expanduser(), unread):
            unique.setdefault(os.path.normcase(os.path.abspath(path)), path)
    found = sorted_paths(unique.values())
    if unread:
        kinds = sorted({path.suffix.lower() for path in unread})
        warnings.warn(
            f"{len(unread)} file(s) in a format flawscope does not read ({', '.join(kinds)}) were passed over, e.g. "
            f"{unread[0]}. Convert them to one of {', '.join(IMAGE_EXTENSIONS)} to include them.",
            stacklevel=2,
        )
    if not found:
        searched = ", ".join(str(item) for item in items) or "(no paths given)"
        patterns = any(char in str(item) for item in items for char in "*?[")
        raise DataError(
            f"No images found in: {searched}. Looked for the extensions {', '.join(IMAGE_EXTENSIONS)} (any case)"
            + (
                "; a pattern's own letters match in their case only, e.g. '*.png' does not find 'a.PNG'."
                if patterns
                else "."
            )
        )
    return found
