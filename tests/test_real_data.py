"""Minimum accuracy on real data (../shared/datasets/mtd), skipped when the folder is absent.

Each setting is the one documented in docs/benchmarks.md or a cheaper run of it (fewer training images or epochs,
as marked), so that the whole suite stays within CI's 20 minutes on 2 CPU cores. The tests assert regression
bounds measured here on those cheaper runs; the issues' floors apply to the documented settings, whose numbers are
in docs/benchmarks.md.
"""

import pytest
from conftest import mtd_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.real_data]

WHOLE_IMAGE_224 = {"backbone": "efficientnet_lite0", "image_size": 224, "resize_size": 0}


def _fit_subset_and_score(model, fit, train_every: int, test_every: tuple[int, int]) -> dict:
    """Fits ``model`` on every ``train_every``-th MTD training image and scores every (n_good, n_defective)-th
    good and defective test image; returns image AUROC, pixel AUROC and AUPRO."""
    import numpy as np

    from flawscope.api import score_images
    from flawscope.data import load_dataset
    from flawscope.fitting import FitContext
    from flawscope.metrics import auroc, pixel_metrics

    split = load_dataset(mtd_or_skip())
    good = [s for s in split.test if s.label == 0][:: test_every[0]]
    defective = [s for s in split.test if s.label == 1][:: test_every[1]]
    ctx = FitContext(quiet=True)
    fit(model, split.train[::train_every], ctx)
    scored = score_images(model, good + defective, ctx, keep_maps=True)
    labels = np.array([s.label for s in good + defective])
    return {"image_auroc": auroc(scored.raw_scores, labels), **pixel_metrics(scored.maps, scored.masks)}


def test_patchcore_on_mtd_half_training_set():
    # The baseline's documented setting (coreset 1 %), trained on every 2nd training image and scored on every 2nd
    # test image to keep the suite short (the greedy coreset's time grows with the square of the training features).
    # The full setting measured 90.5 / 76.0 / 71.9 (docs/benchmarks.md); these bounds guard against regressions of
    # the cheaper run.
    from flawscope.models.patchcore import PatchCore, PatchCoreConfig, fit

    model = PatchCore(PatchCoreConfig.from_dict({**WHOLE_IMAGE_224, "coreset_ratio": 0.01}))
    metrics = _fit_subset_and_score(model, fit, train_every=2, test_every=(2, 2))
    # Measured 0.877 / 0.772 / 0.713 (image AUROC / pixel AUROC / AUPRO) here on every 2nd good and defective test
    # image.
    assert metrics["image_auroc"] >= 0.85
    assert metrics["pixel_auroc"] >= 0.74
    assert metrics["pixel_aupro"] >= 0.68


def test_simplenet_on_mtd_half_training_set():
    # Per-position whitening (docs/methods.md, "Aligned parts"; chosen on the training-image development set) at
    # 4 epochs and sigma 0.25 x std on every 2nd training image, cheaper than the documented MTD setting (8 epochs,
    # sigma 0.12, every image: 97.2 / 81.6 / 67.9, re-measured 96.9 / 80.9 / 66.6 on an AMD EPYC; below the issue's
    # AUPRO floor of 75). These bounds guard against regressions of the cheaper run.
    import torch

    from flawscope.models.simplenet import SimpleNet, SimpleNetConfig, fit

    # The Xavier initialisation draws from torch's global stream (the noise has its own seeded generator): seed it, so
    # the result does not depend on which tests ran before.
    torch.manual_seed(0)
    options = {**WHOLE_IMAGE_224, "embed_dim": 384, "num_epochs": 4, "feature_norm": "position"}
    metrics = _fit_subset_and_score(
        SimpleNet(SimpleNetConfig.from_dict(options)), fit, train_every=2, test_every=(1, 1)
    )
    # Measured 0.959 / 0.799 / 0.655 (image AUROC / pixel AUROC / AUPRO) here, against 0.974 / 0.797 / 0.645 for the
    # same schedule on every training image; with the seed above 0.951 / 0.803 / 0.664 (AMD EPYC, 2 threads), and
    # 0.597 AUPRO from the stream another test order left: the initialisation alone moves AUPRO by several points.
    assert metrics["image_auroc"] >= 0.93
    assert metrics["pixel_auroc"] >= 0.77
    assert metrics["pixel_aupro"] >= 0.62


def test_cfa_on_mtd_half_training_set():
    # CFA without the whitening (gamma_c = 1, one epoch, Eq. 4 nearest-distance score, chosen on the training-image
    # development set), trained on every 2nd training image and scored on every 2nd test image to keep the suite
    # short. The full setting measured 81.0 / 75.4 / 71.3 (96.1 / 82.2 / 70.1 with the whitening, the documented
    # MTD setting); these bounds guard against regressions of the cheaper run.
    from flawscope.models.cfa import CFA, CFAConfig, fit

    options = {**WHOLE_IMAGE_224, "gamma_c": 1, "num_epochs": 1, "score_mode": "nearest"}
    metrics = _fit_subset_and_score(CFA(CFAConfig.from_dict(options)), fit, train_every=2, test_every=(2, 2))
    # Measured 0.810 / 0.762 / 0.709 (image AUROC / pixel AUROC / AUPRO) in 136 s on a 2-core AMD EPYC; 0.797 /
    # 0.762 / 0.718 on every test image.
    assert metrics["image_auroc"] >= 0.76
    assert metrics["pixel_auroc"] >= 0.72
    assert metrics["pixel_aupro"] >= 0.67


def test_mlff_short_schedule_on_mtd_subset():
    # A cheap guard of the documented setting with per-position whitening (`mlff-position`: 90.1 / 84.1 / 72.7 on
    # every image): 140 training images seen once, scored on 100 test images (every 4th good, every 6th defective).
    from flawscope.models.mlff import MLFF, MLFFConfig, fit

    options = {"backbone": "efficientnet_lite0", "image_size": 256, "resize_size": 0, "freeze_backbone": True}
    options |= {"batch_size": 8, "num_epochs": 1, "repeat_factor": 1, "feature_norm": "position"}
    metrics = _fit_subset_and_score(MLFF(MLFFConfig.from_dict(options)), fit, train_every=5, test_every=(4, 6))
    # Measured 0.830 / 0.755 / 0.692 (image AUROC / pixel AUROC / AUPRO) in 49 s here (0.61 / 0.65 / 0.67 without the
    # whitening); on 100 test images the bounds leave room for a few images' noise.
    assert metrics["image_auroc"] >= 0.78
    assert metrics["pixel_auroc"] >= 0.71
    assert metrics["pixel_aupro"] >= 0.65
