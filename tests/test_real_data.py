"""Minimum accuracy on real data (../shared/datasets/mtd), skipped when the folder is absent.

Each setting is the one documented in docs/benchmarks.md (or a cheaper one where marked) and runs in a few minutes
on 2 CPU cores. PatchCore asserts its issue's floors; the others assert regression bounds measured here, below
those floors (which they do not reach yet; see docs/benchmarks.md).
"""

import pytest
from conftest import mtd_or_skip

import flawscope

pytestmark = [pytest.mark.slow, pytest.mark.real_data]

WHOLE_IMAGE_224 = {"backbone": "efficientnet_lite0", "image_size": 224, "resize_size": 0}


def _fit_and_test(method, options, tmp_path):
    data = mtd_or_skip()
    run = flawscope.fit(method, data, tmp_path / method, options=options, quiet=True)
    return flawscope.test(run, data, quiet=True, report=False)


def test_patchcore_on_mtd(tmp_path):
    metrics = _fit_and_test("patchcore", {**WHOLE_IMAGE_224, "coreset_ratio": 0.01}, tmp_path)
    assert metrics["image_auroc"] >= 0.90
    assert metrics["pixel_auroc"] >= 0.75
    assert metrics["pixel_aupro"] >= 0.70


def test_simplenet_on_mtd(tmp_path):
    # The documented MTD setting (docs/benchmarks.md, 8 epochs). It measured 88.3 / 76.1 / 63.4 and, re-run,
    # 89.0 / 77.3 / 63.8 here, below the floors of 93 / 80 / 75 (see docs/methods.md); these bounds guard
    # against regressions from there.
    options = {**WHOLE_IMAGE_224, "embed_dim": 384, "num_epochs": 8}
    metrics = _fit_and_test("simplenet", options, tmp_path)
    assert metrics["image_auroc"] >= 0.85
    assert metrics["pixel_auroc"] >= 0.72
    assert metrics["pixel_aupro"] >= 0.58


def test_cfa_on_mtd(tmp_path):
    # The documented MTD setting (docs/benchmarks.md: gamma_c = 1, one epoch, Eq. 4 nearest-distance score, chosen
    # on the training-image development set). It measured 81.0 / 75.4 / 71.3 here, below the floors of
    # 93 / 80 / 75; these bounds guard against regressions from there.
    options = {**WHOLE_IMAGE_224, "gamma_c": 1, "num_epochs": 1, "score_mode": "nearest"}
    metrics = _fit_and_test("cfa", options, tmp_path)
    assert metrics["image_auroc"] >= 0.78
    assert metrics["pixel_auroc"] >= 0.72
    assert metrics["pixel_aupro"] >= 0.67


def test_mlff_short_schedule_on_mtd_subset():
    # A cheap guard, not the documented benchmark (about 25 min): 140 training images seen once with the
    # documented CPU settings, scored on 100 test images (every 4th good, every 6th defective image).
    import numpy as np

    from flawscope.api import score_images
    from flawscope.data import load_dataset
    from flawscope.fitting import FitContext
    from flawscope.metrics import auroc, pixel_metrics
    from flawscope.models.mlff import MLFF, MLFFConfig, fit

    split = load_dataset(mtd_or_skip())
    good = [s for s in split.test if s.label == 0][::4]
    defective = [s for s in split.test if s.label == 1][::6]
    options = {"backbone": "efficientnet_lite0", "image_size": 256, "resize_size": 0, "freeze_backbone": True}
    model = MLFF(MLFFConfig.from_dict({**options, "batch_size": 8, "num_epochs": 1, "repeat_factor": 1}))
    ctx = FitContext(quiet=True)
    fit(model, split.train[::5], ctx)
    scored = score_images(model, good + defective, ctx, keep_maps=True)
    labels = np.array([s.label for s in good + defective])
    image_auroc = auroc(scored.raw_scores, labels)
    pixel = pixel_metrics(scored.maps, scored.masks)
    # Measured 0.61 / 0.65 / 0.67 (image AUROC / pixel AUROC / AUPRO), well below the full schedule's numbers in
    # docs/benchmarks.md; the bounds catch a model that no longer learns (random scores give about 0.5).
    assert image_auroc >= 0.55
    assert pixel["pixel_auroc"] >= 0.58
    assert pixel["pixel_aupro"] >= 0.60
