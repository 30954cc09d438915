"""Labelled defects that few-shot methods (PRN) see during training, and keeping them out of the test set.

The paper's "general setting" (DRA, DevNet, PRN): a few defective test images with masks are drawn across all defect
types with a fixed seed, moved into training, and removed from the test set. The chosen paths are recorded in the
run's config.json with their files' SHA-256; ``flawscope test`` reads them back and drops every test image with
that path or those bytes (a copy of the data set, a test image also given through --anomaly-dir), so no seen defect is
ever scored.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from flawscope.data.layouts import Sample, labelled_folders, typed_samples, warn_ignored
from flawscope.errors import ConfigError, DataError
from flawscope.runs import file_sha256


def select_seen_anomalies(samples: Sequence[Sample], count: int, seed: int = 0) -> list[Sample]:
    """Draws ``count`` defective samples, stratified over defect types, reproducibly.

    Every type gets ``count // num_types`` images (or all it has), the remainder goes one each to types drawn in a
    seeded order, and whatever a small type cannot supply is taken from the others. Images inside a type are
    drawn with the same seed.

    Args:
        samples: Test samples; good ones (label 0) and defects without a mask are ignored.
        count: How many to draw, >= 0.
        seed: Seed of every random choice.

    Returns:
        The chosen samples in the order of ``samples``; fewer than ``count`` when fewer defects with masks exist.

    Raises:
        ConfigError: ``count`` is negative.
    """
    if count < 0:
        raise ConfigError(f"The number of seen anomalies must be >= 0; got {count}.")
    by_type: dict[str, list[Sample]] = {}
    for sample in samples:
        if sample.label == 1 and sample.mask_path is not None:
            by_type.setdefault(sample.defect_type, []).append(sample)
    rng = random.Random(seed)
    pools = {name: rng.sample(items, len(items)) for name, items in sorted(by_type.items())}
    quota = dict.fromkeys(pools, 0)
    remaining = min(count, sum(len(pool) for pool in pools.values()))
    while remaining > 0:
        open_types = [name for name in pools if quota[name] < len(pools[name])]
        share = remaining // len(open_types)
        if share == 0:  # fewer images left to place than types with room: a seeded draw decides which types
            for name in rng.sample(open_types, remaining):
                quota[name] += 1
            break
        for name in open_types:
            take = min(share, len(pools[name]) - quota[name])
            quota[name] += take
            remaining -= take
    chosen = {id(sample) for name, pool in pools.items() for sample in pool[: quota[name]]}
    return [sample for sample in samples if id(sample) in chosen]


def load_anomaly_folder(folder: str | Path) -> list[Sample]:
    """Reads a folder of labelled defects given in addition to (or instead of) the test set.

    Two layouts are accepted: an MVTec-style root (``test/<type>/`` and ``ground_truth/<type>/<stem>_mask.png``, or
    MVTec AD 2's ``test_public/`` with its ``ground_truth/``; ``test/good`` is ignored), or the same without the
    ``test`` level (``<type>/`` next to ``ground_truth/``). A mask may be a folder of masks (MVTec LOCO).

    Raises:
        DataError: the folder does not exist, holds no defect images, or an image has no mask.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"Anomaly folder {folder} does not exist. Pass a folder laid out as <type>/ + ground_truth/.")
    ignored: list[tuple[Path, str]] = []
    parent, ground_truth = labelled_folders(folder) or (folder, folder / "ground_truth")
    samples = [s for s in typed_samples(parent, ground_truth, ignored) if s.label == 1]
    warn_ignored(
        folder,
        ignored,
        ("the images in <type>/ (or test/<type>/) and the masks in ground_truth/<type> that belong to an image"),
    )
    if not samples:
        raise DataError(
            f"No labelled defects in {folder}: expected <type>/<image> with ground_truth/<type>/<stem>_mask.png "
            "(or the same under test/)."
        )
    return samples


def exclude_samples(
    samples: Sequence[Sample], paths: Iterable[str | Path], digests: Iterable[str] = ()
) -> tuple[list[Sample], list[Sample]]:
    """Splits ``samples`` into (kept, excluded) by image path (compared after resolving) or file content.

    Args:
        samples: test samples.
        paths: image paths to leave out.
        digests: SHA-256 of image files to leave out wherever they lie (a copy of the data set, or a test image
            also given through --anomaly-dir); only defective samples are read for it.
    """
    drop, digests = {Path(p).resolve() for p in paths}, set(digests)

    def seen(sample: Sample) -> bool:
        if sample.path.resolve() in drop:
            return True
        return bool(digests) and sample.label == 1 and file_sha256(sample.path) in digests

    kept: list[Sample] = []
    excluded: list[Sample] = []
    for sample in samples:
        (excluded if seen(sample) else kept).append(sample)
    return kept, excluded
