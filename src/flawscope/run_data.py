"""The data a run belongs to: its config.json record, its category, the labelled data it is tested or calibrated on,
and the refusal to calibrate on its own training data."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import DatasetSplit, Sample, list_categories, load_dataset
from .data.layouts import VISA_CSV
from .errors import ConfigError, DataError


def missing_images_reason(paths: Sequence[str | Path]) -> str:
    """Why images a run's config.json lists cannot be read, for messages: runs before the paths were made absolute
    list them relative to the folder the fit ran in."""
    if any(not Path(p).is_absolute() for p in paths):
        return "this older run lists them relative to the folder it was fitted from: run the command from there"
    return "the data moved since the fit"


def run_record(run: str | Path) -> dict[str, Any]:
    """A run's config.json, given the run folder or its ``model`` folder; empty for a bare model folder."""
    folder = Path(run)
    if not (folder / "config.json").is_file() and folder.name == "model":
        folder = folder.parent
    config = folder / "config.json"
    if not config.is_file():
        return {}
    try:
        record = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        record = e
    if not isinstance(record, dict):
        raise ConfigError(
            f"{config} is not the JSON object `flawscope fit` wrote ({str(record)[:80]}). Restore it from a copy of "
            "the run, or fit again."
        )
    return record


def run_category(run: str | Path, data: str | Path, layout: str = "auto", category: str | None = None) -> str | None:
    """``category``, or else the run's own (config.json) when a multi-category ``data`` holds it."""
    trained_on = run_record(run).get("category")
    if category is None and trained_on:
        with contextlib.suppress(DataError):  # a test-only folder has no categories; load_dataset reads it
            if trained_on in list_categories(data, layout):
                return trained_on
    return category


def run_dataset(
    run: str | Path,
    data: str | Path,
    layout: str = "auto",
    category: str | None = None,
    *,
    calibrating: bool = False,
    good_only: bool = False,
) -> DatasetSplit:
    """The labelled data a run is evaluated or calibrated on (``load_dataset`` with ``need_train=False``).

    ``good_only`` (calibration from good images alone, the "fpr" rule) also accepts a plain folder of good images;
    its images are then in the split's ``train``, and ``test`` is empty.

    Without ``category``, a multi-category ``data`` gives the run's own category (config.json) when it holds it.
    Warns when another of several categories (or another VisA object) is read than the one the run was trained on.
    A single category folder of another name is not warned about: a copied, renamed or synthetic (``flawscope
    synth``) folder is one.

    Raises:
        DataError: ``data`` has no labelled test images (the message names where they belong in its layout).
    """
    trained_on = run_record(run).get("category")
    names = []
    if trained_on:
        with contextlib.suppress(DataError):
            names = list_categories(data, layout)
    dataset = load_dataset(data, layout=layout, category=run_category(run, data, layout, category), need_train=False)
    # VisA names its objects in its CSV, not by a folder's name: one object of another name is another category.
    if trained_on and (len(names) > 1 or dataset.layout == "visa") and dataset.category != trained_on:
        if calibrating:  # its own category's test split is the test set, which calibrate refuses
            how = f"Calibrate on a separate validation folder of {trained_on!r} images"
        elif trained_on in names:
            how = f"To use its own category, pass --category {trained_on} (category=...)"
        else:
            how = f"{data} has no category {trained_on!r}"
        action = "calibrated" if calibrating else "evaluated"
        warnings.warn(
            f"{run} was trained on the category {trained_on!r} and is {action} on {dataset.category!r} "
            f"({dataset.root}): a cross-category result. {how}.",
            stacklevel=3,
        )
    if not dataset.test and not (good_only and dataset.layout == "folder"):
        command = "calibrate" if calibrating else "test"
        if dataset.layout == "folder":
            use = (
                "; --rule fpr sets the threshold from a plain folder of good images"
                if calibrating
                else f". To score unlabelled images, use `flawscope predict RUN {dataset.root} --out DIR`"
            )
            where = (
                f"it is a plain folder of images, read as good ones with no labels, and `flawscope {command}` needs "
                "labelled images (test/good and test/<defect type>; masks in ground_truth/<defect type> add the pixel "
                f"metrics){use}"
            )
        elif dataset.layout == "visa":
            where = (
                f"no 'test' rows for {dataset.category!r} in {dataset.root / VISA_CSV}: `flawscope {command}` reads "
                "the CSV's test rows (normal and anomaly, with masks)"
            )
        else:
            where = (
                f"`flawscope {command}` reads its test split (test/good and test/<defect type> with masks in "
                "ground_truth/<defect type>; MVTec AD 2: test_public/), and train/ is not read"
            )
        fix = " Write a synthetic one with `flawscope synth --data DIR --run RUN --out VAL`." if calibrating else ""
        raise DataError(f"No labelled images in {dataset.root}: {where}.{fix}")
    return dataset


def refuse_training_data(run: str | Path, samples: Sequence[Sample], root: Path) -> None:
    """Refuses calibration images that are among the training data set's images (its training images or its test
    split), listed again from the run's config.json; a training folder that is gone or changed is not checked."""
    record = run_record(run)
    data = record.get("data")
    if not isinstance(data, str) or not Path(data).is_dir():
        return
    try:
        with warnings.catch_warnings():  # its listing's warnings were given when the run was fitted or tested
            warnings.simplefilter("ignore")
            trained = load_dataset(data, layout=record.get("layout", "auto"), category=record.get("category"))
    except (ConfigError, DataError):
        return
    given = {sample.path.resolve(): sample.path for sample in samples}
    for part, why in (
        (trained.train, "its training images (the model was fitted on them, or held them out to set the threshold)"),
        (trained.test, "its test split (the test set)"),
    ):
        shared = sorted(set(given) & {sample.path.resolve() for sample in part})
        if shared:
            raise ConfigError(
                f"{len(shared)} of the {len(samples)} images in {root} are among the data this run was trained on "
                f"({data}): {why}, e.g. {given[shared[0]]}. Calibrate on a separate validation folder so the threshold "
                "and the test metrics stay honest."
            )
