"""Dataset layouts: MVTec AD style folders (also BTAD, MPDD, MTD, MVTec LOCO and MVTec AD 2), the VisA split CSV, and
a plain folder of good images (image search for ``predict``: ``find``).

Only listing happens here: files are checked to exist, never opened for writing, and nothing is created in a data
folder. Every list is sorted by the path's characters (``Path`` sorts without case on Windows), so a run holds out
and numbers the same images on every system. Folder names (good, ok) and mask names match in any case and Unicode
normal form (macOS stores names decomposed).
"""

import csv
import random
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flawscope.data.io import IMAGE_EXTENSIONS, is_image_file
from flawscope.errors import ConfigError, DataError

LAYOUTS = ("auto", "mvtec", "visa", "folder")
# "good" is MVTec's name for defect-free images; BTAD ships the same tree with "ok" instead.
NORMAL_NAMES = ("good", "ok")
MVTEC_HELP = (
    "flawscope expects the MVTec AD layout: <root>/train/good/ (defect-free training images), "
    "<root>/test/<type>/ (test images, 'good' for defect-free ones) and <root>/ground_truth/<type>/<stem>_mask.png "
    "(one mask per defective test image; MVTec AD 2: test_public/ and test_public/ground_truth/)"
)
VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_MAX_LISTED = 12
_SYSTEM_FILES = ("thumbs.db", "desktop.ini", "icon\r")  # written by Windows Explorer or macOS Finder into folders


def _name_key(name: str) -> str:
    """A file name compared as the user sees it: in any case and Unicode normal form."""
    return unicodedata.normalize("NFC", name).casefold()


def sorted_paths(paths: Iterable[Path]) -> list[Path]:
    """Paths sorted by their characters, the same order on every system (``Path`` sorts without case on Windows)."""
    return sorted(paths, key=Path.as_posix)


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        path: Image file.
        label: 0 for a good image, 1 for a defective one.
        defect_type: Name of the defect folder ("good" for good images).
        mask_path: Ground-truth mask of a defective image, a file or (MVTec LOCO) a folder of masks whose union is
            the mask (``read_mask`` reads both); None for good images (their mask is all zeros) and for the
            defective images of a test set without a ground_truth/ folder (image labels only).
    """

    path: Path
    label: int = 0
    defect_type: str = "good"
    mask_path: Path | None = None


@dataclass(frozen=True)
class DatasetSplit:
    """The samples of one dataset category.

    Attributes:
        root: Folder of the category (MVTec) or of the whole dataset (VisA).
        train: Good training images, sorted by path.
        test: Test images, good and defective, sorted by defect type then path; empty when there is no test set.
        layout: "mvtec", "visa" or "folder".
        category: The category: the MVTec category folder's name, the VisA object, the plain folder's name.
    """

    root: Path
    train: list[Sample]
    test: list[Sample]
    layout: str
    category: str


def _join(names: Iterable[str]) -> str:
    """Comma-separated names, shortened for long lists, "nothing" for an empty one."""
    names = list(names)
    if len(names) > _MAX_LISTED:
        return ", ".join(names[:_MAX_LISTED]) + f", ... ({len(names)} in all)"
    return ", ".join(names) or "nothing"


def _visible(path: Path) -> bool:
    """Not a hidden file or folder, nor a file the operating system writes into image folders."""
    return not path.name.startswith(".") and path.name.lower() not in _SYSTEM_FILES


def _list_images(folder: Path, ignored: list[tuple[Path, str]] | None = None) -> list[Path]:
    """The images directly in ``folder``, sorted. Other visible entries go to ``ignored`` with the reason."""
    images = []
    for path in folder.iterdir():
        if is_image_file(path):
            images.append(path)
        elif ignored is not None and _visible(path):
            if path.is_dir():
                ignored.append((path, "a folder: subfolders are not searched"))
            elif not path.exists():
                ignored.append((path, "a broken link"))
            elif not path.is_file():
                ignored.append((path, "not a regular file (a pipe, socket or device)"))
            else:
                ignored.append((path, "not an image extension"))
    return sorted_paths(images)


_NO_IMAGE = "a mask with no test image of its name"
_STRUCTURE = ("train", "test", "test_public", "split_csv")  # folders that make a data set more than a plain folder
_MVTEC_READS = (
    "the images directly in train/good and test/<type> and the masks in ground_truth/<type> that belong to a test "
    "image (MVTec AD 2: test_public/<type> and test_public/ground_truth/<type>)"
)


def warn_ignored(root: Path, ignored: list[tuple[Path, str]], reads: str = _MVTEC_READS) -> None:
    """One warning listing what a folder layout left unread (``reads``: what it does read), so nothing is dropped
    without a word."""
    if ignored:
        listed = _join(f"{path} ({reason})" for path, reason in sorted(ignored))
        warnings.warn(
            f"{len(ignored)} entr{'y' if len(ignored) == 1 else 'ies'} in {root} were not read: {listed}. flawscope "
            f"reads {reads} (extensions {', '.join(IMAGE_EXTENSIONS)}); move or convert "
            "what should count, or move the rest out of the data folder to silence this.",
            stacklevel=3,
        )


def _subfolders(folder: Path) -> list[Path]:
    return sorted_paths(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _contents(root: Path) -> str:
    """Describe a folder two levels deep, e.g. "train/ok, test/ko", for 'what was found' in error messages."""
    entries = []
    for folder in _subfolders(root):
        children = _subfolders(folder)
        entries += [f"{folder.name}/{child.name}" for child in children] if children else [folder.name]
    return _join(entries)


def _normal_folder(parent: Path) -> Path | None:
    """The folder of defect-free images in ``parent`` (good, then ok; in any case), or None."""
    folders = {_name_key(folder.name): folder for folder in _subfolders(parent)} if parent.is_dir() else {}
    return next((folders[name] for name in NORMAL_NAMES if name in folders), None)


def _category_names(root: Path) -> list[str]:
    """The subfolders of ``root`` that are MVTec-style categories (hold train/good)."""
    return [folder.name for folder in _subfolders(root) if _normal_folder(folder / "train")]


def _mvtec_root(root: Path, category: str | None) -> Path:
    """Resolve the category folder of an MVTec-style dataset, or explain why there is none."""
    categories = _category_names(root)
    if _normal_folder(root / "train"):
        if category is None or category == root.resolve().name:  # the name of "." too
            return root
        raise DataError(
            f"Category {category!r} was given but {root} is already a single category (it has train/good). "
            f"Pass its parent folder together with the category, or drop the category."
        )
    if category is not None and category in categories:
        return root / category
    if category is not None or categories:
        if category is None and len(categories) == 1:
            return root / categories[0]
        asked = f"No category {category!r} in {root}" if category is not None else f"{root} holds several categories"
        raise DataError(
            f"{asked}; found categories: {_join(categories)}. Choose one with category=... (--category on the "
            f"command line)."
        )
    visa = (
        f" {root / VISA_CSV} exists: for the VisA layout use layout='visa' (--layout visa)."
        if (root / VISA_CSV).is_file()
        else ""
    )
    plain = _image_folders(root)
    if _holds_images(root):
        structure = [f"{name}/" for name in _STRUCTURE if (root / name).is_dir()]
        plain_hint = (
            f" The images directly in {root} are not read as a plain folder of good images because it also has "
            f"{_join(structure)}: pass --layout folder (layout='folder') to train on them."
        )
    elif plain:
        plain_hint = (
            f" A plain folder of good images also trains: if one of {_join(plain)} holds only good images, pass it "
            "as the data folder."
        )
    else:
        plain_hint = " A plain folder of good images (the images directly in it) also trains."
    raise DataError(f"No 'train/good' in {root}; found: {_contents(root)}. {MVTEC_HELP}.{visa}{plain_hint}")


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` holds an image file directly (not in a subfolder)."""
    return any(map(is_image_file, folder.iterdir()))


def _image_folders(root: Path) -> list[str]:
    """The paths of ``root``'s subfolders that hold images directly."""
    return [str(folder) for folder in _subfolders(root) if _holds_images(folder)]


def _mask_for(image: Path, ground_truth: Path, index: dict[str, Path], folders: dict[str, Path]) -> Path:
    """Find ``<stem>_mask.<ext>`` (MVTec, MPDD) or ``<stem>.<ext>`` (BTAD), any extension case, .png first; else the
    folder ``<stem>/`` of MVTec LOCO, whose masks (one per defect) together make the image's mask."""
    for suffix in ("_mask", ""):
        for extension in (".png", *IMAGE_EXTENSIONS):
            found = index.get(_name_key(f"{image.stem}{suffix}{extension}"))
            if found is not None:
                return found
    folder = folders.get(_name_key(image.stem))
    if folder is not None:
        if not _holds_images(folder):
            raise DataError(
                f"Mask folder {folder} of the defective test image {image} holds no mask image (extensions "
                f"{', '.join(IMAGE_EXTENSIONS)}). Add the defect's masks, or move the image out of the test set."
            )
        return folder
    raise DataError(
        f"Defective test image {image} has no mask: expected {ground_truth / (image.stem + '_mask.png')} (or a "
        f"folder {ground_truth / image.stem} of masks, as in MVTec LOCO). Every test image outside the good folder "
        "needs one; add the mask or move the image out of the test set (a test set without any ground_truth/ folder "
        "is read with image labels only)."
    )


def typed_samples(
    parent: Path, ground_truth: Path, ignored: list[tuple[Path, str]], masks: bool = True
) -> list[Sample]:
    """The images of every type folder in ``parent`` (good ones in a NORMAL_NAMES folder, defective ones with their
    mask in ``ground_truth/<type>``, a file or a folder of masks, or with none when ``masks`` is False); entries not
    read, masks without an image among them, go to ``ignored``."""
    samples = []
    for type_dir in _subfolders(parent):
        if type_dir == ground_truth:  # an anomaly folder may keep ground_truth/ next to its type folders
            continue
        images = _list_images(type_dir, ignored)
        if _name_key(type_dir.name) in NORMAL_NAMES:
            samples += [Sample(path) for path in images]
            continue
        if not masks:
            samples += [Sample(path, 1, type_dir.name) for path in images]
            continue
        masks_dir = ground_truth / type_dir.name
        index, folders, unread = {}, {}, []
        if masks_dir.is_dir():
            index = {_name_key(p.name): p for p in _list_images(masks_dir, unread)}
            folders = {_name_key(p.name): p for p in _subfolders(masks_dir)}
        found = [_mask_for(path, masks_dir, index, folders) for path in images]
        samples += [Sample(path, 1, type_dir.name, mask) for path, mask in zip(images, found, strict=True)]
        ignored += [(path, reason) for path, reason in unread if path not in folders.values()]
        for folder in filter(Path.is_dir, found):  # what a folder of masks holds besides mask images
            _list_images(folder, ignored)
        stems = {_name_key(path.stem) for path in images}
        for mask in sorted_paths({*index.values(), *folders.values()} - set(found)):
            shadowed = mask.is_dir() and _name_key(mask.name) in stems
            ignored.append((mask, "masks of an image whose mask file is read instead" if shadowed else _NO_IMAGE))
    return samples


def labelled_folders(root: Path) -> tuple[Path, Path] | None:
    """The test folder of an MVTec-style category and where its masks are: ``test/`` with ``ground_truth/`` (MVTec
    AD, LOCO, BTAD, MPDD), else ``test_public/`` with ``test_public/ground_truth/`` (MVTec AD 2); None without."""
    if (root / "test").is_dir():
        return root / "test", root / "ground_truth"
    if (root / "test_public").is_dir():
        return root / "test_public", root / "test_public" / "ground_truth"
    return None


def _mvtec_test(root: Path, ignored: list[tuple[Path, str]]) -> list[Sample]:
    """The test samples of an MVTec-style folder; entries not read go to ``ignored``."""
    folders = labelled_folders(root)
    if folders is None:
        return []
    test_dir, ground_truth = folders
    test, truth = f"{test_dir.name}/", f"{ground_truth.relative_to(root).as_posix()}/"
    if test_dir.name == "test" and (root / "test_public").is_dir():
        ignored.append((root / "test_public", "MVTec AD 2's test split, not read beside test/"))
    if test_dir.name == "test_public" and (root / "ground_truth").is_dir():
        ignored.append((root / "ground_truth", "masks beside test_public/, whose masks go in test_public/ground_truth"))
    # Without a ground_truth/ folder at all the test set has image labels only (pixel metrics are left out); with
    # one, every defective image needs its mask, as a missing one is then a mistake.
    samples = typed_samples(test_dir, ground_truth, ignored, masks=ground_truth.is_dir())
    loose = [path for path in filter(_visible, test_dir.iterdir()) if not path.is_dir()]
    ignored += [(path, f"a file directly in {test}: test images go in {test}<type>") for path in loose]
    if ground_truth.is_dir():
        for path in filter(_visible, ground_truth.iterdir()):
            if not path.is_dir():
                ignored.append((path, f"a file directly in {truth}: masks go in {truth}<type>"))
            elif _name_key(path.name) in NORMAL_NAMES:
                if any(filter(_visible, path.iterdir())):  # a good image has no defect: a mislabelled image?
                    ignored.append(
                        (path, f"masks of good images, which are all normal; a defective image goes in {test}<type>")
                    )
            elif not (test_dir / path.name).is_dir():
                ignored.append((path, f"masks of a type with no {test}<type> folder"))
    if not samples:
        raise DataError(f"No test images in {test_dir}; found: {_contents(test_dir)}. {MVTEC_HELP}.")
    return samples


def _load_mvtec(root: Path, need_train: bool = True) -> DatasetSplit:
    ignored: list[tuple[Path, str]] = []
    train_dir = _normal_folder(root / "train")  # None only for a test-only folder (need_train=False)
    train = [Sample(path) for path in _list_images(train_dir, ignored)] if train_dir else []
    if train_dir:
        others = [path for path in filter(_visible, (root / "train").iterdir()) if path != train_dir]
        ignored += [(path, f"only train/{train_dir.name} is read for training") for path in others]
    loose = [path for path in root.iterdir() if is_image_file(path)]
    ignored += [(path, "an image directly in the data folder: training images go in train/good") for path in loose]
    if not train and need_train:
        others = sorted(p.name for p in train_dir.iterdir())
        raise DataError(
            f"No images in {train_dir} (found: {_join(others)}). Add defect-free images with one of the "
            f"extensions {', '.join(IMAGE_EXTENSIONS)}."
        )
    test = _mvtec_test(root, ignored)
    warn_ignored(root, ignored)
    return DatasetSplit(root=root, train=train, test=test, layout="mvtec", category=root.resolve().name)


_FOLDER_READS = "the images directly in a plain folder of good images, not its subfolders"


def _load_folder(root: Path, category: str | None) -> DatasetSplit:
    """A plain folder: the images directly in ``root`` are good training images; there is no test split."""
    if category not in (None, root.resolve().name):  # its own name: the category a run fitted on it records
        raise DataError(
            f"Category {category!r} was given but {root} is a plain folder of good images, which has no categories. "
            "Drop --category (category=...), or pass an MVTec-style root that holds category folders."
        )
    ignored: list[tuple[Path, str]] = []
    train = [Sample(path) for path in _list_images(root, ignored)]
    if not train:
        holding = _image_folders(root)
        hint = (
            f" Images are in its subfolder(s) {_join(holding)}: pass the folder of good images itself (subfolders "
            "are not searched, so that defective images kept next to the good ones are never trained on)."
            if holding
            else ""
        )
        found = _join(sorted(path.name for path in filter(_visible, root.iterdir())))
        raise DataError(
            f"No images directly in {root} (found: {found}), read as a plain folder of good images.{hint} Images need "
            f"one of the extensions {', '.join(IMAGE_EXTENSIONS)}. For labelled data: {MVTEC_HELP}."
        )
    warn_ignored(root, ignored, _FOLDER_READS)
    return DatasetSplit(root=root, train=train, test=[], layout="folder", category=root.resolve().name)


def _is_plain_folder(root: Path, layout: str) -> bool:
    """``layout`` "folder", or "auto" on a folder with images directly in it and no MVTec, VisA or category folders."""
    if layout != "auto":
        return layout == "folder"
    structured = any((root / name).is_dir() for name in _STRUCTURE)
    return not structured and not _category_names(root) and _holds_images(root)


def _read_visa_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """Read the split CSV as (line number, row) pairs; line numbers make error messages point at the row."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames:  # "Image " or "MASK" from a spreadsheet
                reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
            missing = [column for column in VISA_COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                names = reader.fieldnames or []
                semicolons = " Its values are separated by ';': save it with commas." if ";" in "".join(names) else ""
                raise DataError(
                    f"{csv_path} lacks the column(s) {', '.join(missing)}; got {names}. The VisA split "
                    f"file needs the columns {', '.join(VISA_COLUMNS)} (as in VisA's split_csv/1cls.csv).{semicolons}"
                )
            rows = []
            for row in reader:
                if not any(value.strip() for key, value in row.items() if key is not None and value):
                    continue  # a blank row, or the ",,,," a spreadsheet leaves below the table
                # DictReader fills the columns a short row lacks with None. A normal image's mask is empty, so a
                # row that stops before it reads as an empty mask; the mask check later asks for it when needed.
                if row["mask"] is None:
                    row["mask"] = ""
                missing = [column for column in VISA_COLUMNS if row[column] is None]
                if missing:
                    raise DataError(
                        f"{csv_path}, line {reader.line_num}: missing columns {', '.join(missing)}; every row needs "
                        f"{', '.join(VISA_COLUMNS)}. Complete the row or delete it (an empty value still needs its "
                        f"comma)."
                    )
                row["object"] = row["object"].strip()
                rows.append((reader.line_num, row))
            return rows
    except UnicodeDecodeError as error:
        raise DataError(
            f"{csv_path} is not UTF-8 text ({error}); save it as UTF-8 CSV (in Excel: Save As, 'CSV UTF-8')."
        ) from error


def _existing(root: Path, relative: str, what: str, where: str) -> Path:
    """The file a CSV row names, relative to ``root`` (a Windows path's backslashes read as separators)."""
    path = root / relative.replace("\\", "/")
    if relative and path.is_file():
        return path
    hint = ""
    if relative and path.parent.is_dir():
        other = next((p for p in path.parent.iterdir() if _name_key(p.name) == _name_key(path.name)), None)
        hint = f" ({other.name} exists there: names are case-sensitive on this system)" if other else ""
    shown = path if relative else "(empty)"
    raise DataError(f"{where}: the {what} {shown} does not exist{hint}. Fix the path in the CSV.")


def _visa_sample(root: Path, row: dict[str, str], where: str) -> tuple[str, Sample]:
    """Return (split, sample) for one CSV row, checking its label, split and files."""
    split, label = row["split"].strip().lower(), row["label"].strip().lower()  # "Train", "Normal" from a spreadsheet
    if split not in ("train", "test") or label not in ("normal", "anomaly") or (split, label) == ("train", "anomaly"):
        raise DataError(
            f"{where}: got split {split!r} with label {label!r}; expected split 'train' or 'test' and label 'normal' "
            f"or 'anomaly' (training rows must be 'normal')."
        )
    image = _existing(root, row["image"].strip(), "image", where)
    if label == "normal":
        return split, Sample(image)
    return split, Sample(image, 1, "anomaly", _existing(root, row["mask"].strip(), "mask", where))


def _visa_rows(root: Path) -> list[tuple[int, dict[str, str]]]:
    """The rows of ``root``'s split CSV, or why there are none."""
    csv_path = root / VISA_CSV
    if not csv_path.is_file():
        raise DataError(f"No {VISA_CSV} in {root}; found: {_contents(root)}. Copy VisA's split_csv/1cls.csv there.")
    return _read_visa_rows(csv_path)


def _load_visa(root: Path, category: str | None) -> DatasetSplit:
    csv_path = root / VISA_CSV
    rows = _visa_rows(root)
    objects = sorted({row["object"] for _, row in rows})
    if category is None and len(objects) == 1:
        category = objects[0]
    if category not in objects:
        asked = f"has no object {category!r}" if category is not None else "holds several objects"
        raise DataError(
            f"{csv_path} {asked}; found objects: {_join(objects)}. Choose one with category=... (--category on the "
            f"command line)."
        )
    parts: dict[str, list[Sample]] = {"train": [], "test": []}
    lines: dict[Path, int] = {}
    for line, row in rows:
        if row["object"] == category:
            split, sample = _visa_sample(root, row, f"{csv_path}, line {line}")
            # The file, however written (relative or absolute, with '..', through a link): twice in one split
            # would count it twice; in both would test on training images.
            file = sample.path.resolve()
            if file in lines:
                raise DataError(
                    f"{csv_path}, lines {lines[file]} and {line}: the image {sample.path} is listed twice. "
                    "Delete one row: each image belongs to one split, once."
                )
            lines[file] = line
            parts[split].append(sample)
    if not parts["train"]:
        raise DataError(f"{csv_path} has no 'train' rows labelled 'normal' for {category!r}; add some.")
    return DatasetSplit(
        root=root,
        train=sorted(parts["train"], key=lambda s: s.path.as_posix()),
        test=sorted(parts["test"], key=lambda s: (s.defect_type, s.path.as_posix())),
        layout="visa",
        category=category,
    )


def load_dataset(
    root: str | Path, layout: str = "auto", category: str | None = None, need_train: bool = True
) -> DatasetSplit:
    """List the training and test samples of a dataset folder.

    Args:
        root: MVTec-style category folder (holding ``train/good``), a parent of several category folders (then
            ``category`` picks one), a VisA root (holding ``split_csv/1cls.csv``), or a plain folder whose images
            (directly in it; subfolders are not searched) are all good training images.
        layout: "mvtec", "visa", "folder", or "auto": VisA when ``root/split_csv`` exists and ``root/train`` does
            not; a plain folder when ``root`` holds images directly and no train/, test/, test_public/, split_csv/ or
            category folder; MVTec otherwise (its test split in ``test/``, or MVTec AD 2's ``test_public/``).
        category: MVTec category subfolder or VisA object name; needed when the root holds several.
        need_train: False for readers of the test split only (test, calibrate): an MVTec-style folder may then
            have ``test/`` and ``ground_truth/`` (or MVTec AD 2's ``test_public/``) without ``train/good`` (or with
            an empty one).

    Returns:
        The split; a missing MVTec ``test`` folder, and a plain folder, give an empty ``test`` list (enough for
        fitting).

    Raises:
        ConfigError: Unknown ``layout``.
        DataError: Missing or misnamed folders, empty ``train/good`` or plain folder, a defective image without its
            mask, a bad VisA CSV, or ``category`` with a plain folder; the message names the path and what was found.
    """
    root = _checked_root(root, layout)
    if _is_visa(root, layout):
        return _load_visa(root, category)
    if _is_plain_folder(root, layout):
        return _load_folder(root, category)
    if not need_train and category is None and labelled_folders(root) and not _normal_folder(root / "train"):
        return _load_mvtec(root, need_train=False)
    return _load_mvtec(_mvtec_root(root, category), need_train)


def list_categories(root: str | Path, layout: str = "auto") -> list[str]:
    """The names ``load_dataset(root, layout, category=...)`` accepts, sorted: the category folders of an MVTec-style
    parent (a single category folder, and a plain folder, give their own name) or the objects of a VisA split CSV.

    Raises:
        ConfigError: Unknown ``layout``.
        DataError: ``root`` is neither, with what was found.
    """
    root = _checked_root(root, layout)
    if _is_visa(root, layout):
        return sorted({row["object"] for _, row in _visa_rows(root)})
    if _normal_folder(root / "train") or _is_plain_folder(root, layout):
        return [root.resolve().name]
    categories = _category_names(root)
    if not categories:
        _mvtec_root(root, None)  # raises with what was found
    return categories


def _checked_root(root: str | Path, layout: str) -> Path:
    if layout not in LAYOUTS:
        raise ConfigError(f"Unknown dataset layout {layout!r}; expected one of: {', '.join(LAYOUTS)}.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Data folder {root} does not exist or is not a folder. Check the path.")
    return root


def _is_visa(root: Path, layout: str) -> bool:
    return layout == "visa" or (layout == "auto" and (root / "split_csv").is_dir() and not (root / "train").is_dir())


def split_validation(
    samples: Sequence[Sample], ratio: float = 0.1, seed: int = 0, min_count: int = 1
) -> tuple[list[Sample], list[Sample]]:
    """Hold out a seeded share of the good training images for threshold calibration.

    Args:
        samples: Good training samples.
        ratio: Share held out, in [0, 1); 0 holds out nothing. At least ``min_count`` images are held out when > 0.
        seed: Seed of the random choice; the same seed and samples give the same split.
        min_count: Fewest images each part may have (training, and validation when ``ratio`` > 0).

    Returns:
        (train, val), each in the order of ``samples``.

    Raises:
        ConfigError: ``ratio`` outside [0, 1).
        DataError: Too few samples to leave ``min_count`` in each part.
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"The validation ratio (val_ratio, --val-ratio) must be in [0, 1); got {ratio}.")
    n_val = max(min_count, round(ratio * len(samples))) if ratio > 0 else 0
    if len(samples) - n_val < min_count:
        raise DataError(
            f"Only {len(samples)} training image(s): holding out {n_val} for validation (at least {min_count} "
            f"whenever val_ratio > 0; now {ratio}) leaves fewer than {min_count} for training. Add good images, or fit "
            "with --val-ratio 0 and set the threshold afterwards with `flawscope calibrate RUN --data DIR`."
        )
    held_out = set(random.Random(seed).sample(range(len(samples)), n_val))
    train = [sample for i, sample in enumerate(samples) if i not in held_out]
    val = [sample for i, sample in enumerate(samples) if i in held_out]
    return train, val
