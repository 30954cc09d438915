"""Shared fixtures: a tiny generated data set in the MVTec layout, and the path of the real data."""

from pathlib import Path

import pytest
import torch

from flawscope.data.demo import make_demo_dataset

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
MTD = SHARED / "datasets" / "mtd"


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # CI has 2 cores; more threads than cores only adds contention.
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 64-px grass category: 12 good training images, 4 good and 6 defective test images with masks."""
    root = tmp_path_factory.mktemp("demo")
    (folder,) = make_demo_dataset(
        root, textures=("grass",), image_size=64, num_train=12, num_test_good=4, num_test_per_defect=2, seed=0
    )
    return folder


def mtd_or_skip() -> Path:
    if not (MTD / "train" / "good").is_dir():
        pytest.skip(f"real data not found at {MTD}")
    return MTD


@pytest.fixture
def validation_data(tmp_path) -> Path:
    """A small labelled folder (other images than tiny_dataset's) for `flawscope calibrate`."""
    (folder,) = make_demo_dataset(
        tmp_path / "val",
        textures=("grass",),
        image_size=64,
        num_train=4,
        num_test_good=4,
        num_test_per_defect=2,
        seed=7,
    )
    return folder
