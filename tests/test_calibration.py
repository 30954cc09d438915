import numpy as np
import pytest
import torch

from flawscope.calibration import threshold_f1, threshold_from_normals
from flawscope.errors import ConfigError, DataError
from flawscope.models.base import AnomalyModel
from flawscope.models.patchcore import PatchCoreConfig


def test_quantile_threshold_allows_at_most_the_target_share_above():
    scores = np.arange(1, 201, dtype=float)  # 200 normals
    result = threshold_from_normals(scores, target_fpr=0.01)
    # 198 is the score two normals (1 %) lie strictly above; the threshold sits halfway to the next, 199
    assert result["threshold"] == 198.5
    assert (scores > result["threshold"]).mean() <= 0.01
    assert result["score_low"] == 99.5 and result["num_normal"] == 200  # median of the 198 below


def test_quantile_threshold_with_few_normals_is_just_above_their_maximum():
    # above the highest score by a thousandth of the scores' spread (0.2): no held-out image sits on the threshold
    assert threshold_from_normals([0.3, 0.1, 0.2], target_fpr=0.01)["threshold"] == pytest.approx(0.3002, abs=1e-12)
    assert threshold_from_normals([5.0, 5.0], target_fpr=0.01)["threshold"] == pytest.approx(5.00005, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_no_calibration_image_sits_on_the_threshold_and_none_changes_its_decision(seed):
    # Its decision would otherwise hang on float rounding: torch at another batch size or ONNX Runtime move a score
    # by about 1e-7 of it, and the image the threshold was taken from scored exactly the threshold.
    from flawscope.metrics import f1max

    rng = np.random.default_rng(seed)
    normal, defect = np.round(rng.normal(100, 5, 40), 1), np.round(rng.normal(110, 5, 10), 1)  # with ties
    scores = np.concatenate([normal, defect])
    labels = np.r_[np.zeros(40, bool), np.ones(10, bool)]
    cut = f1max(scores, labels)[1]
    for result, seen, decided in (
        (threshold_from_normals(normal, 0.1), normal, normal > np.sort(normal)[40 - 1 - 4]),  # 4 of 40 may be above
        (threshold_f1(normal, defect), scores, scores >= cut),
    ):
        threshold = result["threshold"]
        np.testing.assert_array_equal(seen > threshold, decided)  # every calibration image keeps its decision
        assert np.float32(threshold) not in seen.astype(np.float32)  # also once stored as float32
        assert np.abs(seen - threshold).min() >= 0.05 - 1e-9  # halfway between scores at least 0.1 apart


def test_quantile_threshold_rejects_bad_input():
    with pytest.raises(DataError, match=r"No good images .*--val-ratio > 0.*test/good"):
        threshold_from_normals([])
    with pytest.raises(ConfigError, match="target_fpr"):
        threshold_from_normals([1.0], target_fpr=1.0)


def test_f1_threshold_separates_perfectly_separable_scores():
    result = threshold_f1([0.1, 0.2, 0.3], [0.5, 0.6])
    assert result["f1"] == 1.0
    assert result["threshold"] == pytest.approx(0.4, abs=1e-12)  # halfway between the classes; score > threshold


def test_f1_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    normal, defect = rng.normal(0, 1, 50), rng.normal(1.5, 1, 20)
    result = threshold_f1(normal, defect)
    scores = np.concatenate([normal, defect])
    labels = np.r_[np.zeros(50), np.ones(20)].astype(bool)

    def f1_at(t):
        pred = scores > t
        tp = (pred & labels).sum()
        return 2 * tp / (pred.sum() + labels.sum())

    assert f1_at(result["threshold"]) == pytest.approx(max(f1_at(t) for t in np.r_[scores, -np.inf]))
    assert f1_at(result["threshold"]) == pytest.approx(result["f1"])


def test_f1_threshold_below_every_score_survives_float32_storage():
    # The best F1 calls every image defective; the threshold must stay below the lowest score once stored as float32.
    normal, defect = np.array([12.620834, 12.863706]), np.array([12.370204, 12.811032, 16.751104])
    result = threshold_f1(normal, defect)
    assert result["f1"] == pytest.approx(2 * 3 / (5 + 3))
    model = _Identity(PatchCoreConfig(image_size=32, resize_size=0))
    model.set_calibration(result["threshold"], result["score_low"])
    lowest = torch.tensor(defect.min(), dtype=torch.float32)
    assert model.threshold < lowest
    assert model.normalize(lowest[None]) > 0.5


class _Identity(AnomalyModel):
    """Scores each image by its mean pixel, to test the calibrated output scale."""

    method = "identity"
    config_class = PatchCoreConfig

    def raw_scores(self, images):
        return images.mean(1, keepdim=True), images.mean(dim=(1, 2, 3))


def test_normalised_score_maps_low_to_zero_and_threshold_to_half():
    model = _Identity(PatchCoreConfig(image_size=32, resize_size=0))
    model.set_calibration(threshold=0.6, score_low=0.2)
    images = torch.stack([torch.full((3, 32, 32), v) for v in (0.2, 0.4, 0.6, 1.0)])
    out = model(images)
    torch.testing.assert_close(out.norm_score, torch.tensor([0.0, 0.25, 0.5, 1.0]))
    assert out.norm_map.shape == (4, 1, 32, 32)
    torch.testing.assert_close(out.pred_score, torch.tensor([0.2, 0.4, 0.6, 1.0]))


def test_threshold_below_typical_score_is_nudged_above_it():
    model = _Identity(PatchCoreConfig(image_size=32, resize_size=0))
    model.set_calibration(threshold=0.5, score_low=0.5)
    assert float(model.threshold) > float(model.score_low)


def test_f1_threshold_below_most_normals_keeps_score_low_below_it():
    # Defects score lower than most normals: the F1-optimal threshold sits low, score_low must stay under it.
    result = threshold_f1([1.0, 5.0, 6.0, 7.0], [4.0, 4.5])
    assert result["score_low"] < result["threshold"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_thresholds_refuse_scores_that_are_not_finite(bad):
    with pytest.raises(DataError, match="1 of 3 good images' scores are NaN or infinite"):
        threshold_from_normals([97.0, 98.0, bad])
    with pytest.raises(DataError, match="1 of 2 defective images' scores are NaN or infinite"):
        threshold_f1([1.0, 2.0], [3.0, bad])


def test_quantile_threshold_counts_the_target_share_exactly():
    scores = np.arange(100, dtype=float)
    # 0.29 * 100 is 28.999... in floating point; 29 normals may lie above, not 28.
    assert (scores > threshold_from_normals(scores, target_fpr=0.29)["threshold"]).sum() == 29
    assert (scores > threshold_from_normals(scores, target_fpr=0.57)["threshold"]).sum() == 57


def test_f1_threshold_says_what_is_missing():
    with pytest.raises(DataError, match=r"got 3 good and 0 defective.*--rule fpr"):
        threshold_f1([1.0, 2.0, 3.0], [])
    with pytest.raises(DataError, match=r"got 0 good and 1 defective\. Add the missing kind"):
        threshold_f1([], [1.0])


def test_a_model_refuses_a_threshold_that_is_not_finite():
    model = AnomalyModel(PatchCoreConfig())
    with pytest.raises(ConfigError, match="must be finite"):
        model.set_calibration(float("nan"), 0.0)
    with pytest.raises(ConfigError, match="must be finite"):
        model.set_calibration(1.0, float("-inf"))
