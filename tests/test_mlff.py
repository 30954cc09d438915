"""MLFF: shapes through each module (ResNet-50 at 256 px), QCO against loops, losses on hand-made tensors, data plan."""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flawscope.data import load_dataset
from flawscope.errors import ConfigError
from flawscope.fitting import FitContext
from flawscope.models.mlff import MLFF, MLFFConfig
from flawscope.models.mlff.fit import add_pseudo_anomalies, mlff_losses, pseudo_anomaly_plan
from flawscope.models.mlff.losses import consistency_loss, feature_loss, normal_patch_mask, score_loss
from flawscope.models.mlff.model import hypersphere_distance
from flawscope.models.mlff.texture import cooccurrence, level_counts, quantize_count

SMALL = {"backbone": "resnet18", "image_size": 64, "resize_size": 0, "texture_dim": 16, "feat_dim": 8}
SMALL |= {"tem_levels": 8, "tem_stat_dim": 8, "sc_reduce": 8}


@pytest.fixture(scope="module")
def paper_model() -> MLFF:
    """The paper's configuration (ResNet-50, 256 px) with random weights."""
    torch.manual_seed(0)
    return MLFF(MLFFConfig(), pretrained=False).eval()


# --- shapes (spec 2.2) ----------------------------------------------------------------------------------------------


def test_paper_shapes_through_each_module(paper_model):
    m = paper_model
    images = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        stage1, stage2, stage3 = m.backbone(images)
        assert stage1.shape == (2, 256, 64, 64) and stage2.shape == (2, 512, 32, 32)
        assert stage3.shape == (2, 1024, 16, 16)
        low = torch.cat([F.adaptive_avg_pool2d(stage1, (32, 32)), stage2], dim=1)
        assert low.shape == (2, 768, 32, 32)
        x0 = m.texture.start(low)
        t1 = m.texture.tem(x0)
        t2 = m.texture.ptfem(torch.cat([t1, x0], dim=1))
        assert x0.shape == t1.shape == t2.shape == (2, 256, 32, 32)
        for branch, scale in zip(m.texture.ptfem.branches, (1, 2, 4, 8), strict=True):
            assert branch(m.texture.ptfem.reduce(torch.cat([t1, x0], 1))).shape == (2, 128, scale, scale)
        assert m.texture(low).shape == (2, 768, 32, 32)
        assert m.high(stage3).shape == (2, 1024, 16, 16)
        psi = m.features(images)
        assert psi.shape == (2, 256, 32, 32)
        assert m.score_head(psi).shape == (2, 1, 32, 32)
        anomaly_map, score = m.raw_scores(images)
    assert anomaly_map.shape == (2, 1, 256, 256) and score.shape == (2,)
    torch.testing.assert_close(score, anomaly_map.flatten(1).amax(1))


def test_self_calibrated_conv_parameter_count(paper_model):
    # Spec 2.5: three 3x3 convs 1024 -> 1024 without bias, each followed by BN (weight + bias): about 28 M.
    assert sum(p.numel() for p in paper_model.high.parameters()) == 3 * (1024 * 1024 * 9 + 2 * 1024) == 28_317_696
    assert paper_model.fuse.in_channels == 768 + 1024 and paper_model.fuse.out_channels == 256
    assert paper_model.score_head.weight.shape == (1, 256, 1, 1) and paper_model.score_head.bias is not None


def test_backbone_is_fine_tuned_by_default_and_frozen_on_request():
    small = MLFF(MLFFConfig.from_dict(SMALL), pretrained=False)
    assert all(p.requires_grad for p in small.backbone.parameters())
    frozen = MLFF(MLFFConfig.from_dict({**SMALL, "freeze_backbone": True}), pretrained=False)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())

    def batchnorm_modes(model):
        return {m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)}

    small.train()  # a plain fine-tune: the backbone's batch-norm layers train and update their statistics
    assert batchnorm_modes(small) == {True}
    before = next(m for m in small.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_mean.clone()
    small.stages(torch.rand(2, 3, 64, 64))
    after = next(m for m in small.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_mean
    assert not torch.equal(before, after)
    small.eval()
    assert batchnorm_modes(small) == {False}
    kept = MLFF(MLFFConfig.from_dict({**SMALL, "backbone_batchnorm": "frozen"}), pretrained=False).train()
    assert batchnorm_modes(kept) == {False} and all(p.requires_grad for p in kept.backbone.parameters())
    assert batchnorm_modes(frozen.train()) == {False}


def test_ablation_baseline_fuses_the_three_stages_and_scores_by_distance():
    cfg = MLFFConfig.from_dict({**SMALL, "texture_branch": False, "sc_branch": False, "sc_reduce": 0})
    cfg = cfg.replace(score_source="distance", loss_weights=(1, 0, 0))
    model = MLFF(cfg, pretrained=False).eval()
    assert model.fuse.in_channels == 64 + 128 + 256  # resnet18 layer1 + layer2 + layer3
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        psi = model.features(images)
        anomaly_map, _ = model.raw_scores(images)
    expected = F.interpolate(hypersphere_distance(psi), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(anomaly_map, expected)


def test_smoothing_option_blurs_the_upsampled_map_and_scores_its_maximum():
    torch.manual_seed(0)
    cfg = MLFFConfig.from_dict({**SMALL, "smoothing_sigma": 4.0})
    model = MLFF(cfg, pretrained=False).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        anomaly_map, score = model.raw_scores(images)
        upsampled = F.interpolate(model.score_map(model.features(images)), size=(64, 64), mode="bilinear")
    # Direct computation: scipy's gaussian_filter (sigma 4, truncate 4, mode "reflect") of each upsampled map.
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    expected = np.stack([scipy_ndimage.gaussian_filter(m[0].double().numpy(), 4.0) for m in upsampled])[:, None]
    np.testing.assert_allclose(anomaly_map.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score, anomaly_map.flatten(1).amax(dim=1))
    assert not torch.allclose(anomaly_map, upsampled)  # the paper's default (sigma 0) leaves it as it is
    assert MLFF(cfg.replace(smoothing_sigma=0.0), pretrained=False).blur(upsampled) is upsampled


@pytest.mark.parametrize(("texture_stride", "out_stride"), [(8, 8), (4, 8), (8, 4), (4, 4)])
def test_texture_and_output_strides_follow_m1_and_m2(texture_stride, out_stride):
    # resnet18 at 64 px: stage 1 on 16x16 (stride 4), stage 2 on 8x8, stage 3 on 4x4.
    cfg = MLFFConfig.from_dict({**SMALL, "texture_stride": texture_stride, "out_stride": out_stride})
    torch.manual_seed(0)
    model = MLFF(cfg, pretrained=False).eval()
    images = torch.rand(2, 3, 64, 64)
    low_side, side = 64 // texture_stride, 64 // out_stride
    with torch.no_grad():
        stage1, stage2, stage3 = model.stages(images)
        if texture_stride == 8:  # M1's proposal: stage 1 average-pooled to stage 2's grid
            fused = torch.cat([F.avg_pool2d(stage1, 2), stage2], dim=1)
        else:  # M1's alternative: stage 2 upsampled to stage 1's grid
            fused = torch.cat([stage1, F.interpolate(stage2, scale_factor=2, mode="bilinear")], dim=1)
        low = model.texture(fused)
        assert low.shape == (2, 3 * 16, low_side, low_side)
        if low_side > side:
            low = F.avg_pool2d(low, 2)
        elif low_side < side:
            low = F.interpolate(low, scale_factor=2, mode="bilinear")
        high = F.interpolate(model.high(stage3), size=(side, side), mode="bilinear")
        expected = model.fuse(torch.cat([low, high], dim=1))
        psi = model.features(images)
        anomaly_map, _ = model.raw_scores(images)
    assert psi.shape == (2, 8, side, side) and anomaly_map.shape == (2, 1, 64, 64)
    torch.testing.assert_close(psi, expected)


def test_strides_other_than_4_and_8_are_rejected():
    with pytest.raises(ConfigError, match=r"'out_stride'.*one of 4, 8; got 16"):
        MLFFConfig.from_dict({**SMALL, "out_stride": 16})


def test_input_too_small_for_the_self_calibrated_pooling_is_refused_and_the_smallest_allowed_runs():
    with pytest.raises(ConfigError, match=r"3 x 3 stride-16 grid.*sc_pooling_r=4: use image_size >= 49"):
        MLFFConfig.from_dict({**SMALL, "image_size": 48, "resize_size": 0})
    for kw in ({"image_size": 49}, {"image_size": 32, "sc_branch": False}, {"image_size": 32, "sc_pooling_r": 2}):
        model = MLFF(MLFFConfig.from_dict({**SMALL, "resize_size": 0, **kw}), pretrained=False).eval()
        side = kw["image_size"]
        with torch.no_grad():
            anomaly_map, _ = model.raw_scores(torch.rand(1, 3, side, side))
        assert anomaly_map.shape == (1, 1, side, side)


def test_score_head_without_score_loss_is_rejected():
    with pytest.raises(ConfigError, match="distance"):
        MLFFConfig(loss_weights=(1, 0, 1))
    with pytest.raises(ConfigError, match="pseudo_kinds"):
        MLFFConfig(pseudo_kinds=("scratch",))
    with pytest.raises(ConfigError, match="one non-negative weight per pseudo_kinds entry"):
        MLFFConfig(pseudo_probs=(1.0,))


# --- quantisation and counting (spec 2.3, 2.4) ----------------------------------------------------------------------


@pytest.mark.parametrize("window", ["spacing", "half"])
def test_quantize_count_matches_direct_computation(window):
    similarity = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2], [1.0, -1.0, 0.0, 0.5, 0.25]], dtype=torch.float64)
    levels, encoding = quantize_count(similarity, 4, window)
    for row in range(2):
        values = similarity[row].tolist()
        low, high = min(values), max(values)
        spacing = (high - low) / 4
        delta = spacing if window == "spacing" else spacing / 2
        for n in range(1, 5):
            level = low + (2 * n - 1) / 8 * (high - low)
            assert levels[row, n - 1].item() == pytest.approx(level)
            for i, value in enumerate(values):
                expected = 1 - abs(level - value) if abs(level - value) < delta else 0.0
                assert encoding[row, n - 1, i].item() == pytest.approx(expected)
    counts = level_counts(encoding)
    torch.testing.assert_close(counts, encoding.sum(-1) / encoding.sum((-2, -1))[:, None])
    if window == "spacing":  # levels 0.2, 0.4, 0.6, 0.8: level 0.2 takes 0.1, 0.3 (distance 0.1) and 0.2 itself
        assert encoding[0, 0].tolist() == pytest.approx([0.9, 0, 0.9, 0, 1.0])


def test_cooccurrence_matches_direct_loops():
    torch.manual_seed(0)
    encoding = torch.rand(3, 4, 5, dtype=torch.float64)  # N = 3 levels on a 4 x 5 region
    result = cooccurrence(encoding)
    direct = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            for r in range(3):
                for c in range(4):
                    direct[i, j] += encoding[i, r, c].item() * encoding[j, r + 1, c + 1].item()
    np.testing.assert_allclose(result.numpy(), direct / direct.sum())
    # One-pixel-wide regions (PTFEM's scale 8 on an 8 x 8 grid) have no down-right pairs: no co-occurrence.
    for shape in ((2, 3, 1, 1), (2, 3, 1, 4), (2, 3, 4, 1)):
        assert torch.equal(cooccurrence(torch.rand(shape)), torch.zeros(2, 3, 3))
    # A region with no counts (a flat image area) normalises to zeros, also in float16 (a --half export), where a
    # guard of 1e-12 would round to 0 and give 0 / 0.
    for dtype in (torch.float32, torch.float16):
        empty = torch.zeros(2, 3, 4, 5, dtype=dtype)
        assert torch.equal(cooccurrence(empty), torch.zeros(2, 3, 3, dtype=dtype))
        assert torch.equal(level_counts(empty.flatten(-2)), torch.zeros(2, 3, dtype=dtype))


# --- losses (spec 2.7) ----------------------------------------------------------------------------------------------


def test_hypersphere_distance_is_pseudo_huber():
    psi = torch.tensor([3.0, 4.0, 0.0])[None, :, None, None]
    assert hypersphere_distance(psi).item() == pytest.approx(math.sqrt(26) - 1)


def test_feature_loss_on_hand_made_distances():
    distance = torch.tensor([0.5, 1.0, 2.0, 0.1]).view(1, 1, 2, 2)
    anomalous = torch.tensor([False, False, True, True]).view(1, 1, 2, 2)
    expected = (0.5 + 1.0) / 2 / 2 - (math.log(1 - math.exp(-2.0)) + math.log(1 - math.exp(-0.1))) / 2 / 2
    assert feature_loss(distance, anomalous).item() == pytest.approx(expected, rel=1e-6)
    # Without anomalous pixels only the normal term is left.
    assert feature_loss(distance, torch.zeros_like(anomalous)).item() == pytest.approx(3.6 / 4 / 2)


def test_feature_loss_counted_per_image_on_hand_made_distances():
    # Image 0: normal 0.5, 1.0, anomalous 2.0. Image 1: normal 0.0, 0.2, 0.4, no anomalous pixel (its term is 0).
    distance = torch.tensor([[0.5, 1.0, 2.0, 0.0], [0.0, 0.2, 0.4, 0.0]]).view(2, 1, 1, 4).requires_grad_()
    anomalous = torch.tensor([[False, False, True, True], [False, False, False, False]]).view(2, 1, 1, 4)
    # Image 0's anomalous pixels: 2.0 and 0.0; log(1 - e^0 + eps) is finite only through the eps.
    image0 = 0.75 / 2 - (math.log(1 - math.exp(-2.0)) + math.log(1e-31)) / 2 / 2
    image1 = 0.15 / 2
    loss = feature_loss(distance, anomalous, counts="image")
    assert loss.item() == pytest.approx((image0 + image1) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(distance.grad[1]).all() and distance.grad[1, 0, 0, 0] == pytest.approx(1 / 4 / 2 / 2)
    # One image: the per-image and per-batch counts agree.
    one = torch.tensor([0.5, 1.0, 2.0, 0.1]).view(1, 1, 2, 2)
    mask = torch.tensor([False, False, True, True]).view(1, 1, 2, 2)
    assert feature_loss(one, mask, "image").item() == pytest.approx(feature_loss(one, mask).item(), rel=1e-6)
    with pytest.raises(ValueError, match="counts must be 'batch' or 'image'; got 'images'"):
        feature_loss(one, mask, "images")


def test_generator_options_reach_the_generators(monkeypatch):
    mlff_fit = importlib.import_module("flawscope.models.mlff.fit")
    calls = {}

    def record(name):
        def generate(pixels, rng, **kwargs):
            calls[name] = kwargs
            return _marked(pixels)

        return generate

    monkeypatch.setattr(mlff_fit, "confetti_noise", record("confetti"))
    monkeypatch.setattr(mlff_fit, "cutpaste", record("cutpaste"))
    options = {
        "cutpaste_area": "0.1,0.2",
        "cutpaste_aspect": "0.5,2",
        "cutpaste_jitter": 0.3,
        "confetti_probs": "1e-4,0",
        "confetti_sides": "4,12",
        "cutpaste_variant": "3way",
    }
    cfg = MLFFConfig.from_dict({**SMALL, **options})
    add_pseudo_anomalies(torch.rand(40, 3, 8, 8), torch.arange(40), np.ones(40, dtype=bool), cfg, seed=0, repetition=0)
    assert calls["cutpaste"] == {"variant": "3way", "area_ratio": (0.1, 0.2), "aspect_ratio": (0.5, 2.0), "jitter": 0.3}
    assert calls["confetti"] == {"color_prob": 1e-4, "grey_prob": 0.0, "side_px": (4, 12)}
    # The defaults are the generators' own (FCDD's confetti, the CutPaste code's rectangle).
    from flawscope.synthesis.confetti import CONFETTI_COLOR_PROB, CONFETTI_GREY_PROB, CONFETTI_SIDE_PX
    from flawscope.synthesis.cutpaste import CUTPASTE_AREA_RATIO, CUTPASTE_ASPECT_RATIO

    default = MLFFConfig()
    assert (default.cutpaste_area, default.cutpaste_aspect, default.cutpaste_jitter) == (
        CUTPASTE_AREA_RATIO,
        CUTPASTE_ASPECT_RATIO,
        0.1,
    )
    assert (default.confetti_probs, default.confetti_sides) == (
        (CONFETTI_COLOR_PROB, CONFETTI_GREY_PROB),
        CONFETTI_SIDE_PX,
    )
    assert default.feature_loss_counts == "batch"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"cutpaste_area": "0.3,0.1"}, r"cutpaste_area needs two fractions"),
        ({"cutpaste_aspect": "1.5,3"}, r"cutpaste_aspect needs"),
        ({"confetti_sides": "10,2"}, r"confetti_sides needs two square sides"),
        ({"confetti_probs": "0.5"}, r"confetti_probs needs two per-pixel probabilities COLOUR,GREY"),
        ({"feature_loss_counts": "pixel"}, r"'feature_loss_counts'.*one of 'batch', 'image'"),
    ],
)
def test_generator_and_loss_options_are_checked_when_configured(options, match):
    with pytest.raises(ConfigError, match=match):
        MLFFConfig.from_dict({**SMALL, **options})


def test_feature_loss_counts_option_reaches_the_loss(monkeypatch):
    mlff_fit = importlib.import_module("flawscope.models.mlff.fit")
    seen = []
    monkeypatch.setattr(mlff_fit, "feature_loss", lambda d, a, counts: seen.append(counts) or d.mean())
    model = MLFF(MLFFConfig.from_dict({**SMALL, "feature_loss_counts": "image"}), pretrained=False)
    mlff_losses(model, torch.rand(2, 3, 64, 64), torch.zeros(2, 1, 64, 64, dtype=torch.bool))
    assert seen == ["image"]


def test_score_loss_on_hand_made_scores():
    # Image 0: normal 1, 3 (mean 2), anomalous 10 -> gap 8 > 5. Image 1: normal 4 (mean 4), anomalous 6, 7.
    scores = torch.tensor([[1.0, 3.0, 10.0], [4.0, 6.0, 7.0]]).view(2, 1, 1, 3)
    anomalous = torch.tensor([[False, False, True], [False, True, True]]).view(2, 1, 1, 3)
    normal_term = (0 + 0.5 + 1.5) / 3  # max(0, s - 2.5) over 1, 3, 4
    image_mean = normal_term + (0 + (5 - 2) + (5 - 3)) / 3
    assert score_loss(scores, anomalous).item() == pytest.approx(image_mean)
    batch_mean = normal_term + ((5 - (10 - 8 / 3)) * 0 + (5 - (6 - 8 / 3)) + (5 - (7 - 8 / 3))) / 3
    assert score_loss(scores, anomalous, pairing="batch_mean").item() == pytest.approx(batch_mean)
    random_pair = score_loss(scores, anomalous, pairing="random_pair", generator=torch.Generator().manual_seed(0))
    # Each anomalous pixel (10, 6, 7) is paired with the normal pixel (of 1, 3, 4) that the seeded draw picks.
    pick = torch.randint(3, (3,), generator=torch.Generator().manual_seed(0)).tolist()
    pairs = zip((10.0, 6.0, 7.0), ([1.0, 3.0, 4.0][i] for i in pick), strict=True)
    expected = normal_term + sum(max(0.0, 5 - (a - n)) for a, n in pairs) / 3
    assert random_pair.item() == pytest.approx(expected)


def _direct_consistency(features: np.ndarray, scores: np.ndarray, keep: np.ndarray) -> float:
    """KL(softmax(-Q_a) || softmax(-P_a)) over b != a among kept patches, averaged over rows: loops."""
    index = np.flatnonzero(keep)
    total = 0.0
    for a in index:
        others = [b for b in index if b != a]
        p = np.array([-np.linalg.norm(features[a] - features[b]) for b in others])
        q = np.array([-abs(scores[a] - scores[b]) for b in others])
        sp, sq = np.exp(p) / np.exp(p).sum(), np.exp(q) / np.exp(q).sum()
        total += float((sq * (np.log(sq) - np.log(sp))).sum())
    return total / len(index)


def test_consistency_loss_matches_direct_computation():
    torch.manual_seed(0)
    features = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    scores = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    keep = torch.tensor([[[True, True], [False, True]], [[True, False], [False, False]]])  # image 1: one patch only
    loss = consistency_loss(features, scores, keep)
    expected = _direct_consistency(
        features[0].flatten(1).T.numpy(), scores[0].flatten().numpy(), keep[0].flatten().numpy()
    )
    assert loss.item() == pytest.approx(expected)  # image 1 is skipped, not averaged in as zero


def test_consistency_loss_on_three_hand_made_patches():
    # Patches F = 0, 1, 3 and Z = 0, 2, 2 on a 1 x 4 grid; the fourth patch is anomalous and left out.
    features = torch.tensor([0.0, 1.0, 3.0, 10.0]).view(1, 1, 1, 4)
    scores = torch.tensor([0.0, 2.0, 2.0, -5.0]).view(1, 1, 1, 4)
    keep = torch.tensor([[[True, True, True, False]]])

    def softmax(values):
        total = sum(math.exp(-v) for v in values)
        return [math.exp(-v) / total for v in values]

    def kl(q, p):
        return sum(a * math.log(a / b) for a, b in zip(q, p, strict=True))

    # Row a over b != a: P = |F_a - F_b|, Q = |Z_a - Z_b|, both turned into similarities by the negation (M10).
    rows = [([1, 3], [2, 2]), ([1, 2], [2, 0]), ([3, 2], [2, 0])]
    expected = sum(kl(softmax(q), softmax(p)) for p, q in rows) / 3
    assert expected == pytest.approx((0.4337808 + 0.8287249 + 0.0671308) / 3, abs=1e-6)  # the three rows' KLs
    assert consistency_loss(features, scores, keep).item() == pytest.approx(expected, rel=1e-5)


def test_consistency_loss_is_zero_when_structures_agree():
    scores = torch.randn(1, 1, 3, 3)
    features = torch.cat([scores, torch.zeros_like(scores)], dim=1)  # |F_a - F_b| = |Z_a - Z_b|
    assert consistency_loss(features, scores, torch.ones(1, 3, 3, dtype=torch.bool)).item() == pytest.approx(
        0, abs=1e-6
    )


def test_normal_patch_mask_marks_patches_with_any_anomalous_pixel():
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[0, 0, 5, 2] = True
    expected = torch.ones(1, 2, 2, dtype=torch.bool)
    expected[0, 1, 0] = False
    assert torch.equal(normal_patch_mask(mask, (2, 2)), expected)


def test_all_three_losses_reach_the_network():
    torch.manual_seed(0)
    model = MLFF(MLFFConfig.from_dict(SMALL), pretrained=False).train()
    images = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    masks[0, 0, 8:30, 10:40] = True
    parts = mlff_losses(model, images, masks)
    assert all(torch.isfinite(parts[k]) and parts[k] > 0 for k in ("feature", "score", "consistency"))
    torch.testing.assert_close(parts["total"], parts["feature"] + parts["score"] + parts["consistency"])
    parts["total"].backward()
    assert model.score_head.weight.grad.abs().sum() > 0 and model.fuse.weight.grad.abs().sum() > 0


# --- pseudo-anomalies (spec 2.6) ------------------------------------------------------------------------------------


def test_pseudo_anomaly_plan_selects_exactly_half_of_the_repeated_set():
    plan = pseudo_anomaly_plan(7, 10, 0.5, np.random.default_rng(0))
    assert plan.shape == (10, 7) and plan.sum() == 35
    assert pseudo_anomaly_plan(7, 10, 0.0, np.random.default_rng(0)).sum() == 0
    assert pseudo_anomaly_plan(7, 10, 1.0, np.random.default_rng(0)).all()
    assert plan.sum(0).min() > 0 and plan.sum(0).max() < 10  # spread over images, not whole images


def test_bernoulli_selection_draws_each_copy_with_the_ratio():
    plan = pseudo_anomaly_plan(100, 10, 0.5, np.random.default_rng(0), bernoulli=True)
    assert plan.shape == (10, 100) and 400 < plan.sum() < 600 and plan.sum() != 500
    assert not pseudo_anomaly_plan(7, 10, 0.0, np.random.default_rng(0), bernoulli=True).any()
    assert pseudo_anomaly_plan(7, 10, 1.0, np.random.default_rng(0), bernoulli=True).all()


@pytest.mark.parametrize(("probs", "low", "high"), [((), 70, 130), ((1.0, 0.0), 200, 200), ((0.2, 0.8), 20, 60)])
def test_pseudo_kinds_are_drawn_with_their_probabilities(monkeypatch, probs, low, high):
    mlff_fit = importlib.import_module("flawscope.models.mlff.fit")  # the package exports a function named fit
    drawn = []
    monkeypatch.setattr(
        mlff_fit, "confetti_noise", lambda pixels, rng, **k: drawn.append("confetti") or _marked(pixels)
    )
    monkeypatch.setattr(mlff_fit, "cutpaste", lambda pixels, rng, *a, **k: drawn.append("cutpaste") or _marked(pixels))
    cfg = MLFFConfig.from_dict({**SMALL, "pseudo_probs": probs})
    images = torch.rand(200, 3, 8, 8)
    add_pseudo_anomalies(images, torch.arange(200), np.ones(200, dtype=bool), cfg, seed=0, repetition=0)
    assert len(drawn) == 200 and low <= drawn.count("confetti") <= high


@pytest.mark.parametrize("selection", ["exact", "bernoulli"])
def test_fit_plans_with_the_chosen_selection(monkeypatch, tiny_dataset, selection):
    mlff_fit = importlib.import_module("flawscope.models.mlff.fit")
    seen = []

    def stop(num_images, repeat_factor, ratio, rng, bernoulli=False):
        seen.append(bernoulli)
        raise StopIteration  # the plan is made before the first step: nothing needs training

    monkeypatch.setattr(mlff_fit, "pseudo_anomaly_plan", stop)
    model = MLFF(MLFFConfig.from_dict({**SMALL, "pseudo_selection": selection}), pretrained=False)
    with pytest.raises(StopIteration):
        mlff_fit.fit(model, load_dataset(tiny_dataset).train, FitContext(quiet=True))
    assert seen == [selection == "bernoulli"]


def _marked(pixels):
    mask = np.zeros(pixels.shape[:2], bool)
    mask[0, 0] = True
    return np.where(mask[..., None], 1 - pixels, pixels), mask


def test_pseudo_anomalies_are_applied_only_to_planned_images_and_are_seeded():
    cfg = MLFFConfig.from_dict(SMALL)
    images = torch.rand(4, 3, 64, 64)
    plan = np.array([True, False, True, False])
    out, masks = add_pseudo_anomalies(images, torch.arange(4), plan, cfg, seed=0, repetition=3)
    changed = (out != images).any(1, keepdim=True)
    assert torch.equal(changed, masks)
    assert masks[0].any() and masks[2].any() and not masks[1].any() and not masks[3].any()
    # Same (seed, pass, index) -> same defect, whatever the batch composition.
    again, again_masks = add_pseudo_anomalies(images[2:3], torch.tensor([2]), plan, cfg, seed=0, repetition=3)
    assert torch.equal(again[0], out[2]) and torch.equal(again_masks[0], masks[2])


@pytest.mark.parametrize("kind", ["confetti", "cutpaste", "perlin"])
def test_each_pseudo_kind_is_exact_and_grey_on_grey_images_when_asked(kind):
    grey = torch.rand(3, 1, 64, 64).expand(3, 3, 64, 64).contiguous()
    plan = np.ones(3, dtype=bool)
    for grey_pseudo in (False, True):
        cfg = MLFFConfig.from_dict({**SMALL, "pseudo_kinds": (kind,), "grey_pseudo": grey_pseudo})
        out, masks = add_pseudo_anomalies(grey, torch.arange(3), plan, cfg, seed=1, repetition=0)
        assert torch.equal((out != grey).any(1, keepdim=True), masks) and masks.any()
        grey_out = torch.equal(out, out[:, :1].expand_as(out))  # every channel the same
        # Confetti and the (procedural) Perlin textures are coloured; CutPaste of a grey image is grey anyway.
        assert grey_out if grey_pseudo or kind == "cutpaste" else not grey_out
    # A colour image keeps its coloured defect: the option changes grey images only.
    colour = torch.rand(3, 3, 64, 64)
    plain = MLFFConfig.from_dict({**SMALL, "pseudo_kinds": (kind,)})
    greyed = MLFFConfig.from_dict({**SMALL, "pseudo_kinds": (kind,), "grey_pseudo": True})
    a, _ = add_pseudo_anomalies(colour, torch.arange(3), plan, plain, seed=1, repetition=0)
    b, _ = add_pseudo_anomalies(colour, torch.arange(3), plan, greyed, seed=1, repetition=0)
    assert torch.equal(a, b)


# --- per-position whitening (flawscope's option, docs/methods.md "Aligned parts") -------------------------------------


def test_position_whitening_needs_a_frozen_backbone():
    with pytest.raises(ConfigError, match="freeze_backbone"):
        MLFFConfig.from_dict({**SMALL, "feature_norm": "position"})


def test_position_whitening_centres_every_stage_at_every_position_and_is_saved(tiny_dataset, tmp_path):
    from flawscope.data import ImageDataset, load_dataset
    from flawscope.fitting import FitContext
    from flawscope.model_io import load_model, save_model
    from flawscope.models.mlff import fit

    options = {**SMALL, "freeze_backbone": True, "feature_norm": "position", "batch_size": 4}
    model = MLFF(MLFFConfig.from_dict({**options, "num_epochs": 1, "repeat_factor": 1}), pretrained=False)
    train = load_dataset(tiny_dataset).train
    fit(model, train, FitContext(quiet=True, seed=0))
    images = torch.stack([ImageDataset(train, 64, 0)[i]["image"] for i in range(len(train))])
    with torch.no_grad():
        raw, whitened = model.backbone(images), model.stages(images)
    # ResNet-18 at 64 px: stages of 64, 128, 256 channels on 16x16, 8x8, 4x4 grids.
    shapes = ((64, 16), (128, 8), (256, 4))
    for stage, white, whitening, (c, side) in zip(raw, whitened, model.whitening, shapes, strict=True):
        assert whitening.mean.shape == (side * side, c) and whitening.matrix.shape == (side * side, c, c)
        torch.testing.assert_close(stage.flatten(2).mean(0).T, whitening.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(white.mean(0), torch.zeros(c, side, side), atol=1e-3, rtol=0)
    loaded = load_model(save_model(model, tmp_path / "run"))
    with torch.no_grad():
        for a, b in zip(model.raw_scores(images[:2]), loaded.raw_scores(images[:2]), strict=True):
            torch.testing.assert_close(a, b)


def test_a_last_batch_of_one_image_is_left_out(tiny_dataset):
    # 12 images in batches of 11: the last batch holds one image, whose pooled 1 x 1 branches BatchNorm refuses in
    # training at 64 px; the pass trains on the batch of 11 only.
    from flawscope.data import load_dataset
    from flawscope.fitting import FitContext
    from flawscope.models.mlff.fit import fit

    options = {"backbone": "efficientnet_lite0", "image_size": 64, "resize_size": 0, "num_epochs": 1}
    model = MLFF(MLFFConfig.from_dict({**options, "repeat_factor": 1, "batch_size": 11}), pretrained=False)
    train = load_dataset(tiny_dataset).train
    report = fit(model, train, FitContext(quiet=True))
    assert report["num_images"] == 12 and report["steps"] == 1 and report["images_seen"] == 11
    # Batches of one image, or one training image, would train on nothing (or crash in BatchNorm): refused.
    from flawscope.errors import ConfigError

    for batch_size, images, fragment in ((1, train, "batch_size=1: .*at least 2"), (4, train[:1], "at least 2 tr")):
        one = MLFF(MLFFConfig.from_dict({**options, "repeat_factor": 1, "batch_size": batch_size}), pretrained=False)
        with pytest.raises(ConfigError, match=fragment):
            fit(one, images, FitContext(quiet=True))
    # No pseudo-anomaly: the score head learns nothing of defects, and the fit says so.
    plain = MLFF(MLFFConfig.from_dict({**options, "repeat_factor": 1, "batch_size": 6, "pseudo_ratio": 0}), False)
    with pytest.warns(UserWarning, match="No training image was made pseudo-anomalous"):
        fit(plain, train, FitContext(quiet=True))


def test_texture_dir_is_read_at_fit_time_only(tiny_dataset, tmp_path):
    from flawscope.data import load_dataset
    from flawscope.errors import DataError
    from flawscope.fitting import FitContext
    from flawscope.models.mlff.fit import fit

    options = {"backbone": "efficientnet_lite0", "image_size": 64, "resize_size": 0, "num_epochs": 1}
    options |= {"repeat_factor": 1, "batch_size": 6, "texture_dir": str(tmp_path / "gone")}
    # A saved model whose texture folder is gone still loads: the config does not look at the folder.
    config = MLFFConfig.from_dict({**options, "pseudo_kinds": ("confetti", "perlin")})
    train = load_dataset(tiny_dataset).train
    with pytest.raises(DataError, match=r"Option texture_dir=.*gone: .*gone does not exist"):
        fit(MLFF(config, pretrained=False), train, FitContext(quiet=True))
    with pytest.warns(UserWarning, match="texture_dir=.*gone is not used.*perlin"):
        fit(MLFF(MLFFConfig.from_dict(options), pretrained=False), train, FitContext(quiet=True))


def test_texture_statistics_keep_their_levels_in_a_float16_model():
    # TEM's 128 levels lie closer than float16's step near a cosine similarity of 1: computed in float16, the
    # levels were assigned at random (half the output's range off); the statistics run in float32 in any model.
    from flawscope.models.mlff.texture import PyramidTexture, TextureEnhancement

    torch.manual_seed(0)
    features = torch.randn(2, 32, 16, 16) * 0.1 + 1.0  # every pixel close to the mean: similarities near 1
    for module in (TextureEnhancement(32, 32, 16, num_levels=128), PyramidTexture(32, 16, num_levels=8)):
        module.eval()
        with torch.no_grad():
            full = module(features)
            half = module.half()(features.half()).float()
        assert half.dtype == torch.float32 and torch.isfinite(half).all()
        assert (half - full).abs().max() <= 0.01 * (full.max() - full.min())
