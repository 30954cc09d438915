"""benchmarks/aupro_spill.py: the AUPRO variants and false-positive shares on hand-made maps with a known halo."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from aupro_spill import spill_table  # noqa: E402

import flawscope.metrics as M  # noqa: E402


def test_a_halo_near_the_defect_costs_aupro_only_through_the_defective_images_normal_pixels():
    rng = np.random.default_rng(0)
    size = 96
    masks = np.zeros((2, size, size), bool)
    masks[1, 10:14, 10:14] = True  # one 4 x 4 defect in image 1; image 0 is good
    maps = np.zeros((2, size, size), np.float32)
    maps[0] = rng.uniform(0, 1, (size, size))  # the good image: every score below 1
    distance = ndimage.distance_transform_edt(~masks[1])
    maps[1][(distance > 0) & (distance < 8)] = 2.0  # a halo above the defect itself, within 8 px
    maps[1][masks[1]] = 1.5  # the defect: above every good pixel, below its halo

    row = spill_table(maps, masks)

    # The halo's pixels enter as false positives before any defect pixel: PRO is 0 up to FPR = their share of all
    # normal pixels, then 1 (the defect's pixels add no false positive).
    halo_fpr = np.sum((distance > 0) & (distance < 8)) / np.sum(~masks)
    assert row["aupro"] == pytest.approx(M.aupro(maps, masks))
    assert row["aupro"] == pytest.approx(1 - halo_fpr / 0.3)
    assert row["aupro_good_fpr"] == pytest.approx(1.0)  # without them the defect is found at FPR 0
    assert row["aupro_without_16"] == pytest.approx(1.0) and row["aupro_without_32"] == pytest.approx(1.0)
    assert row["fp_0_8"] == 1.0  # every halo pixel is above the good image's 99th percentile
    assert row["fp_8_16"] == row["fp_16_32"] == row["fp_32_64"] == row["fp_64_"] == 0.0
