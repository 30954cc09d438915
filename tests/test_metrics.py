"""Metrics against scikit-learn, against plain references written from the definitions, and on hand-made cases."""

import numpy as np
import pytest
import torch
from skimage.measure import label as skimage_label
from sklearn import metrics as skm

import flawscope.metrics as fm
from flawscope.errors import ConfigError, DataError


def _scores_labels(seed: int, size: int, levels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Random scores, quantised to ``levels`` values when given so that many of them tie across classes."""
    rng = np.random.default_rng(seed)
    scores = rng.random(size)
    if levels is not None:
        scores = np.floor(scores * levels) / levels
    return scores, rng.random(size) < 0.3


def _maps_masks(seed: int, levels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(3, 12, 12) maps with a few blob-like defect regions; quantised maps give ties between regions and normals."""
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 12, 12)) < 0.12
    masks[:, 5:8, 5:8] |= rng.random((3, 1, 1)) < 0.7
    maps = rng.random(masks.shape) + 0.6 * masks
    if levels is not None:
        maps = np.floor(maps * levels) / levels
    return maps.astype(np.float32), masks


def _reference_pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full PRO curve by brute force: one point per distinct score, plus (0, 0) at +inf."""
    regions = np.stack([skimage_label(m, connectivity=2) for m in masks])
    offsets = np.cumsum([0] + [r.max() for r in regions[:-1]])
    ids = (regions + offsets[:, None, None])[masks]  # region of each defect pixel, 1-based
    sizes = np.bincount(ids)[1:]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(np.mean(maps[~masks] >= t))
        pro.append(np.mean(np.bincount(ids[maps[masks] >= t], minlength=sizes.size + 1)[1:] / sizes))
    return np.array(fpr), np.array(pro)


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area of the brute-force PRO curve, each segment cut at max_fpr, divided by max_fpr."""
    fpr, pro = _reference_pro_curve(maps, masks)
    area = 0.0
    for x0, x1, y0, y1 in zip(fpr[:-1], fpr[1:], pro[:-1], pro[1:], strict=True):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def _brute_f1max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    best = (-1.0, np.nan)
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        tp = np.sum(pred & labels)
        f1 = 2 * tp / (np.sum(pred) + np.sum(labels))
        if f1 > best[0]:
            best = (f1, t)
    return best


@pytest.mark.parametrize("levels", [None, 7, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_binary_metrics_match_sklearn_and_brute_force(seed, levels):
    scores, labels = _scores_labels(seed, 500, levels)
    assert fm.auroc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert fm.average_precision(scores, labels) == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-12)
    f1, threshold = fm.f1max(scores, labels)
    ref_f1, ref_threshold = _brute_f1max(scores, labels)
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert threshold == ref_threshold


@pytest.mark.parametrize("levels", [None, 5])
def test_curves_match_sklearn(levels):
    scores, labels = _scores_labels(3, 300, levels)
    fpr, tpr, thresholds = fm.roc_curve(scores, labels)
    ref = skm.roc_curve(labels, scores, drop_intermediate=False)
    for got, want in zip((fpr, tpr, thresholds), ref, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)

    precision, recall, thresholds = fm.pr_curve(scores, labels)
    ref_precision, ref_recall, ref_thresholds = skm.precision_recall_curve(labels, scores)
    at = np.searchsorted(ref_thresholds, thresholds)  # sklearn's points at our (positive-score) thresholds
    np.testing.assert_array_equal(ref_thresholds[at], thresholds)
    np.testing.assert_allclose(precision, ref_precision[at], atol=1e-12)
    np.testing.assert_allclose(recall, ref_recall[at], atol=1e-12)
    assert recall[-1] == 1.0


def test_binary_metrics_by_hand():
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert fm.auroc(scores, labels) == 0.75
    assert fm.average_precision(scores, labels) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert fm.f1max(scores, labels) == (pytest.approx(0.8), 0.35)
    assert fm.image_metrics(scores, labels) == {
        "image_auroc": 0.75,
        "image_ap": pytest.approx(5 / 6),
        "image_f1max": pytest.approx(0.8),
        "image_f1_threshold": 0.35,
    }


def test_constant_scores_are_defined():
    scores, labels = np.full(5, 0.7), np.array([1, 0, 0, 1, 0], dtype=bool)
    assert fm.auroc(scores, labels) == 0.5
    assert fm.average_precision(scores, labels) == pytest.approx(2 / 5)
    assert fm.f1max(scores, labels) == (pytest.approx(4 / 7), 0.7)


def test_only_anomalous_samples():
    scores, labels = np.array([0.2, 0.9]), np.ones(2, dtype=bool)
    assert fm.average_precision(scores, labels) == 1.0
    assert fm.f1max(scores, labels) == (1.0, 0.2)
    with pytest.raises(DataError, match="AUROC is undefined.*2 positive.*0 negative"):
        fm.auroc(scores, labels)


@pytest.mark.parametrize("metric", [fm.auroc, fm.average_precision, fm.f1max, fm.roc_curve, fm.pr_curve])
def test_only_normal_samples_raise(metric):
    with pytest.raises(DataError, match="undefined.*0 positive"):
        metric(np.array([0.1, 0.5]), np.zeros(2))


def test_only_normal_images_raise_in_image_metrics():
    with pytest.raises(DataError, match="undefined"):
        fm.image_metrics(np.array([0.1, 0.5]), np.array([False, False]))


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        (np.zeros(3), np.zeros(4), r"scores \(3,\) and labels \(4,\)"),
        (np.array([0.1, np.nan]), np.array([0, 1]), "1 NaN"),
        (np.array([0.1, 0.2]), np.array([0, 255]), r"binary.*> 0"),
        (np.zeros(0), np.zeros(0), "empty"),
    ],
)
def test_invalid_inputs_raise(scores, labels, match):
    with pytest.raises(DataError, match=match):
        fm.auroc(scores, labels)


@pytest.mark.parametrize("levels", [None, 4])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_matches_reference(seed, max_fpr, levels):
    maps, masks = _maps_masks(seed, levels)
    expected = _reference_aupro(maps, masks, max_fpr)
    assert fm.aupro(maps, masks, max_fpr) == pytest.approx(expected, abs=1e-9)
    assert fm.pixel_metrics(maps, masks, max_fpr)["pixel_aupro"] == pytest.approx(expected, abs=1e-9)


def test_pro_curve_lies_on_reference_curve():
    maps, masks = _maps_masks(2, levels=6)
    fpr, pro = fm.pro_curve(maps, masks)
    ref_fpr, ref_pro = _reference_pro_curve(maps, masks)
    assert fpr[0] == 0.0 and pro[0] == 0.0 and fpr[-1] == pytest.approx(0.3)
    # Every returned corner below the cut-off is a point of the brute-force curve.
    for x, y in zip(fpr[:-1], pro[:-1], strict=True):
        assert np.any((ref_fpr == x) & np.isclose(ref_pro, y, atol=1e-12))


def test_aupro_by_hand():
    # Two one-pixel regions (0.9 and 0.2) and two normal pixels (0.8, 0.1):
    # curve (0,0) (0,.5) (.5,.5) (.5,1) (1,1).
    maps, masks = np.array([[[0.9, 0.8, 0.1, 0.2]]]), np.array([[[1, 0, 0, 1]]], dtype=bool)
    assert fm.aupro(maps, masks, max_fpr=1.0) == pytest.approx(0.75)
    assert fm.aupro(maps, masks, max_fpr=0.5) == pytest.approx(0.5)
    fpr, pro = fm.pro_curve(maps, masks, max_fpr=1.0)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])


def test_aupro_ties_enter_together():
    # One threshold moves FPR 0 -> 1 and PRO 0 -> 1 at once: a diagonal, cut at 0.3 gives area 0.045.
    maps, masks = np.full((1, 1, 3), 0.5), np.array([[[1, 0, 0]]], dtype=bool)
    assert fm.aupro(maps, masks, max_fpr=1.0) == pytest.approx(0.5)
    assert fm.aupro(maps, masks) == pytest.approx(0.15)


def test_aupro_regions_are_8_connected_and_per_image():
    # The mask pixels touch diagonally, so they form one region of three: PRO is 1/3 until the last threshold.
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.where(masks, 0.1, 0.5)
    maps[0, 0, 0] = 0.9
    assert fm.aupro(maps, masks, max_fpr=1.0) == pytest.approx(1 / 3)
    # The same image twice holds two regions, one per image, with the same curve.
    assert fm.aupro(np.repeat(maps, 2, 0), np.repeat(masks, 2, 0), max_fpr=1.0) == pytest.approx(1 / 3)


def test_pixel_metrics_match_sklearn():
    maps, masks = _maps_masks(4, levels=9)
    got = fm.pixel_metrics(maps, masks)
    assert got["pixel_auroc"] == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert got["pixel_ap"] == pytest.approx(skm.average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert got["pixel_f1max"] == pytest.approx(_brute_f1max(maps.ravel(), masks.ravel())[0], abs=1e-12)
    assert got["pixel_aupro"] == pytest.approx(fm.aupro(maps, masks), abs=1e-12)


def test_pixel_metrics_accept_tensors_float16_and_channel_axis():
    maps, masks = _maps_masks(5)
    maps16 = maps.astype(np.float16)
    expected = fm.pixel_metrics(maps16.astype(np.float64), masks)
    assert fm.pixel_metrics(maps16, masks) == expected
    assert fm.pixel_metrics(torch.from_numpy(maps16)[:, None], torch.from_numpy(masks)[:, None]) == expected
    assert fm.pixel_metrics(torch.from_numpy(maps).bfloat16(), masks.astype(np.uint8))["pixel_aupro"] > 0.5


@pytest.mark.parametrize("fill", [False, True])
def test_aupro_needs_both_pixel_classes(fill):
    maps, masks = np.random.default_rng(0).random((2, 4, 4)), np.full((2, 4, 4), fill)
    with pytest.raises(DataError, match="undefined"):
        fm.aupro(maps, masks)
    with pytest.raises(DataError, match="undefined"):
        fm.pixel_metrics(maps, masks)


def test_pixel_shape_errors():
    with pytest.raises(DataError, match=r"maps \(2, 4, 4\) and masks \(2, 5, 5\)"):
        fm.pixel_metrics(np.zeros((2, 4, 4)), np.zeros((2, 5, 5), dtype=bool))
    with pytest.raises(DataError, match=r"\(N, H, W\).*\(4, 4\)"):
        fm.aupro(np.zeros((4, 4)), np.zeros((4, 4), dtype=bool))


@pytest.mark.parametrize("max_fpr", [0.0, 1.5])
def test_max_fpr_out_of_range(max_fpr):
    with pytest.raises(ConfigError, match="max_fpr"):
        fm.aupro(np.zeros((1, 2, 2)), np.eye(2, dtype=bool)[None], max_fpr=max_fpr)


def test_per_type_metrics_pair_each_type_with_the_good_images():
    from pathlib import Path

    from flawscope.api import ScoredImages
    from flawscope.data import Sample
    from flawscope.evaluation import per_type_metrics

    samples = [Sample(Path("g.png")), Sample(Path("a.png"), 1, "blob"), Sample(Path("b.png"), 1, "crack")]
    maps = np.array([[[0.0, 0.4]], [[0.9, 0.1]], [[0.2, 0.3]]], np.float32)  # (3, 1, 2)
    masks = np.array([[[0, 0]], [[1, 0]], [[1, 0]]], bool)
    scored = ScoredImages(samples, np.array([0.4, 0.9, 0.3]), np.zeros(3), maps, masks, 0.0)
    table = per_type_metrics(scored)
    assert table["blob"] == {"count": 1, "image_auroc": 1.0, "pixel_auroc": 1.0, "pixel_aupro": 1.0}
    # crack: its defect pixel (0.2) is above one of the three normal pixels (0.0, 0.4, 0.3); at FPR <= 0.3 it is
    # never found.
    assert table["crack"]["image_auroc"] == 0.0
    assert table["crack"]["pixel_auroc"] == pytest.approx(1 / 3)
    assert table["crack"]["pixel_aupro"] == 0.0
    no_maps = per_type_metrics(ScoredImages(samples, scored.raw_scores, np.zeros(3), None, None, 0.0))
    assert no_maps["blob"] == {"count": 1, "image_auroc": 1.0}


# --- maps given per image, each at its own size (evaluation at the images' native resolution) ----------------------


def _ragged(seed: int, levels: int | None = 8) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Four maps of different sizes with blob-like regions; quantised so that scores tie across images."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for height, width in [(12, 20), (9, 9), (16, 7), (5, 30)]:
        mask = rng.random((height, width)) < 0.1
        mask[2:5, 2:5] |= rng.random() < 0.7
        scores = rng.random((height, width)) + 0.6 * mask
        maps.append((np.floor(scores * levels) / levels).astype(np.float32) if levels else scores)
        masks.append(mask)
    return maps, masks


def _reference_aupro_per_image(maps: list, masks: list, max_fpr: float) -> float:
    """The brute-force AUPRO of ``_reference_aupro``, with each image's regions labelled on its own."""
    flat_maps = np.concatenate([m.ravel() for m in maps])
    flat_masks = np.concatenate([k.ravel() for k in masks])
    ids, offset = [], 0
    for k in masks:
        regions = skimage_label(k, connectivity=2)
        ids.append(regions[k] + offset)
        offset += regions.max()
    ids = np.concatenate(ids)
    sizes = np.bincount(ids)[1:]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(flat_maps)[::-1]:
        fpr.append(np.mean(flat_maps[~flat_masks] >= t))
        pro.append(np.mean(np.bincount(ids[flat_maps[flat_masks] >= t], minlength=sizes.size + 1)[1:] / sizes))
    area = 0.0
    for x0, x1, y0, y1 in zip(fpr[:-1], fpr[1:], pro[:-1], pro[1:], strict=True):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1, x1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0), max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def test_per_image_lists_give_exactly_the_stacked_results():
    maps, masks = _maps_masks(3, levels=10)
    stacked = fm.pixel_metrics(maps, masks)
    assert fm.pixel_metrics(list(maps), list(masks)) == stacked
    assert fm.aupro(list(maps), list(torch.from_numpy(masks))) == stacked["pixel_aupro"]
    for a, b in zip(fm.pro_curve(list(maps), list(masks)), fm.pro_curve(maps, masks), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_fpr", [0.3, 1.0])
def test_maps_of_different_sizes_against_scikit_learn_and_the_brute_force_aupro(seed, max_fpr):
    maps, masks = _ragged(seed)
    flat_maps = np.concatenate([m.ravel() for m in maps])
    flat_masks = np.concatenate([k.ravel() for k in masks])
    result = fm.pixel_metrics(maps, masks, max_fpr=max_fpr)
    assert result["pixel_auroc"] == pytest.approx(skm.roc_auc_score(flat_masks, flat_maps), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(skm.average_precision_score(flat_masks, flat_maps), abs=1e-12)
    expected = _reference_aupro_per_image(maps, masks, max_fpr)
    assert result["pixel_aupro"] == pytest.approx(expected, abs=1e-12)
    assert fm.aupro(maps, masks, max_fpr=max_fpr) == result["pixel_aupro"]


def test_per_image_lists_are_checked():
    maps, masks = _ragged(0)
    with pytest.raises(DataError, match="two lists of equal, non-zero length; got 4 maps and 3 masks"):
        fm.pixel_metrics(maps, masks[:3])
    with pytest.raises(DataError, match="non-zero length; got 0 maps"):
        fm.aupro([], [])
    with pytest.raises(DataError, match=r"image 0 has a map of shape \(12, 20\) and a mask of shape \(9, 9\)"):
        fm.pixel_metrics(maps[:2], masks[1:3])
    with pytest.raises(DataError, match=r"image 1 has a map of shape \(1, 9, 9\)"):
        fm.aupro([maps[0], maps[1][None]], [masks[0], masks[1][None]])
