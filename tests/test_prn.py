"""PRN: shapes through every block, prototypes and residuals, attention against a direct computation, losses,
and the seen-defect split (never in the test set)."""

import copy
import csv
import importlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flawscope
from flawscope.data import Sample, load_anomaly_folder, load_dataset, read_image, select_seen_anomalies
from flawscope.errors import ConfigError, DataError
from flawscope.evaluation import test as run_test
from flawscope.fitting import FitContext, autocast, recalibrate_batchnorm
from flawscope.models.prn import PRN, PRNConfig
from flawscope.models.prn.blocks import MultiScaleFusion, MultiSizeAttention
from flawscope.models.prn.fit import (
    AnomalyBatches,
    fit,
    fit_prototypes,
    focal_loss,
    num_prototypes,
    prn_loss,
    split_prototype_images,
)
from flawscope.report import save_png

TINY = {"backbone": "resnet18", "image_size": 64, "resize_size": 0}
# One-step fits (EfficientNet-Lite0 with random weights, as _tiny builds every model).
QUICK_FIT = {"backbone": "efficientnet_lite0", "num_epochs": 1, "steps_per_epoch": 1, "msa_depth": 1}


def _tiny(**options) -> PRN:
    torch.manual_seed(0)
    return PRN(PRNConfig(**{**TINY, **options}), pretrained=False).eval()


def test_shapes_through_every_block_resnet18_256():
    torch.manual_seed(0)
    model = PRN(PRNConfig(), pretrained=False).eval()
    model.set_prototypes([torch.randn(3, c, s, s) for c, s in ((64, 64), (128, 32), (256, 16))])
    images = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        *features, deep = model.backbone(images)
        assert [tuple(f.shape[1:]) for f in features] == [(64, 64, 64), (128, 32, 32), (256, 16, 16)]
        assert tuple(deep.shape[1:]) == (512, 8, 8)
        residuals = model.residuals(features)
        assert [r.shape for r in residuals] == [f.shape for f in features]
        fused = model.feature_fusion(features)
        fused_residuals = model.residual_fusion(residuals)
        assert [f.shape for f in fused] == [f.shape for f in features] == [r.shape for r in fused_residuals]
        joined = [torch.cat(pair, 1) for pair in zip(fused, fused_residuals, strict=True)]
        assert [tuple(c.shape[1:]) for c in joined] == [(128, 64, 64), (256, 32, 32), (512, 16, 16)]
        for stack, c, patches in zip(
            model.attention, joined, ([64, 32, 16, 8], [32, 16, 8, 4], [16, 8, 4, 2]), strict=True
        ):
            assert len(stack) == 3 and stack[0].patches == patches  # N = 3 blocks, p_s = h / 2^(s-1)
            assert [1 / s for s in stack[0].scales] == [c.shape[1] * p * p for p in patches]  # 1/c^s
            assert stack(c).shape == c.shape
        tokens = [stack(c) for stack, c in zip(model.attention, joined, strict=True)]
        skips = model.attention_fusion(tokens)
        assert [s.shape for s in skips] == [t.shape for t in tokens]
        logits = model.decoder(deep, skips[::-1], (256, 256))
        assert logits.shape == (1, 1, 256, 256)
        anomaly_map, score = model.raw_scores(images)
    assert anomaly_map.shape == (1, 1, 256, 256) and score.shape == (1,)
    assert float(anomaly_map.min()) >= 0 and float(anomaly_map.max()) <= 1


def test_separable_downsampling_follows_the_spec():
    fusion = MultiScaleFusion([64, 128, 256])
    depthwise, pointwise = fusion.paths["0to2"]  # 1 -> 3: k5 s4 p2, depthwise on 64 then 1x1 to 256
    assert (depthwise.kernel_size, depthwise.stride, depthwise.padding, depthwise.groups) == (
        (5, 5),
        (4, 4),
        (2, 2),
        64,
    )
    assert (pointwise.in_channels, pointwise.out_channels, pointwise.kernel_size) == (64, 256, (1, 1))
    assert sum(p.numel() for p in fusion.paths["0to1"].parameters()) == 64 * 9 + 64 + 64 * 128 + 128
    grouped = MultiScaleFusion([64, 128, 256], "grouped").paths["0to1"]
    assert (grouped.groups, grouped.out_channels, grouped.stride) == (64, 128, (2, 2))


def test_prototype_count():
    assert num_prototypes(209, 0.1) == 20  # MVTec bottle (spec §2.3)
    assert num_prototypes(630, 0.1) == 63
    assert num_prototypes(5, 0.1) == 1
    assert num_prototypes(5, 1.0) == 5
    model = _tiny()
    normals = (torch.rand(20, 3, 64, 64) * 255).to(torch.uint8)
    assert fit_prototypes(model, normals, FitContext(quiet=True)) == [2, 2, 2]
    assert [tuple(p.shape) for p in model.prototypes()] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]


def test_position_whitening_fits_every_stage_and_prototypes_live_in_the_whitened_space(tmp_path):
    from flawscope.model_io import load_model, save_model

    model = _tiny(feature_norm="position", prototype_ratio=0.05)
    normals = (torch.rand(20, 3, 64, 64) * 255).to(torch.uint8)
    assert fit_prototypes(model, normals, FitContext(quiet=True)) == [1, 1, 1]
    images = normals.float() / 255
    with torch.no_grad():
        raw, whitened = model.backbone(images), model.stages(images)
    # ResNet-18 at 64 px: layer1-4 at 16x16, 8x8, 4x4 and 2x2 (the decoder's stage is whitened too).
    for stage, white, whitening in zip(raw, whitened, model.whitening, strict=True):
        c, side = stage.shape[1], stage.shape[-1]
        assert whitening.mean.shape == (side * side, c) and whitening.matrix.shape == (side * side, c, c)
        torch.testing.assert_close(stage.flatten(2).mean(0).T, whitening.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(white.mean(0), torch.zeros(c, side, side), atol=1e-3, rtol=0)
    # One prototype per scale: the k-means centre of the whitened maps is their mean, zero.
    for p in model.prototypes():
        torch.testing.assert_close(p, torch.zeros_like(p), atol=1e-3, rtol=0)
    model.fitted.fill_(True)
    loaded = load_model(save_model(model, tmp_path / "run"))
    with torch.no_grad():
        for a, b in zip(model.raw_scores(images[:2]), loaded.raw_scores(images[:2]), strict=True):
            torch.testing.assert_close(a, b)


def test_without_position_whitening_the_stages_are_the_encoders():
    model = _tiny()
    images = torch.rand(2, 3, 64, 64)
    fit_prototypes(model, (images * 255).to(torch.uint8), FitContext(quiet=True))
    assert not any(w.fitted for w in model.whitening)
    with torch.no_grad():
        for a, b in zip(model.backbone(images), model.stages(images), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("residual", ["abs", "sq"])
def test_residual_is_the_difference_to_the_nearest_whole_map_prototype(residual):
    model = _tiny(residual=residual)
    shapes = [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    prototypes = [torch.randn(4, *s) for s in shapes]
    model.set_prototypes(prototypes)
    features = [torch.randn(3, *s) for s in shapes]
    for f, p, d in zip(features, prototypes, model.residuals(features), strict=True):
        for i in range(3):
            nearest = min(range(4), key=lambda k: float(torch.linalg.vector_norm(f[i] - p[k])))
            diff = f[i] - p[nearest]
            expected = diff.abs() if residual == "abs" else diff**2
            torch.testing.assert_close(d[i], expected)


@pytest.mark.parametrize("align_corners", [False, True])
def test_fusion_upsampling_follows_align_corners(align_corners):
    torch.manual_seed(0)
    fusion = MultiScaleFusion([2, 3], align_corners=align_corners)
    fine, coarse = torch.randn(1, 2, 8, 8), torch.randn(1, 3, 4, 4)
    up = F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(fusion([fine, coarse])[0], fine + fusion.paths["1to0"](up))
    model = _tiny(mf_align_corners=align_corners)
    assert {m.align_corners for m in model.modules() if isinstance(m, MultiScaleFusion)} == {align_corners}


def test_generator_options_reach_the_generators(monkeypatch):
    prn_fit = importlib.import_module("flawscope.models.prn.fit")  # the package exports a function named fit
    calls = {}

    def recorder(name):
        def generate(image, *args, **kwargs):
            calls[name] = kwargs
            return image, np.zeros(image.shape[:2], bool)

        return generate

    monkeypatch.setattr(prn_fit, "extended_anomaly", recorder("extended"))
    monkeypatch.setattr(prn_fit, "simulated_anomaly", recorder("simulated"))
    options = {
        "target_area_shapes": ("circle",),
        "aug2_ranges": (10.0, 5.0, 0.1),
        "redraw_empty_simulated": False,
        "use_target_area": False,
        "opacity_range": (0.1, 0.2),
        "aug_num_ops": 3,
        "perlin_max_exponent": 4,
        "perlin_threshold": 0.6,
        "hea_prob": 1.0,
    }
    cfg = PRNConfig.from_dict({**TINY, **options})
    normals = np.zeros((2, 8, 8, 3), np.uint8)
    seen = (np.zeros((1, 8, 8, 3), np.uint8), np.ones((1, 8, 8), bool))
    draw = AnomalyBatches(cfg, normals, seen, seed=0)
    draw.extended()
    draw.simulated()
    common = {"use_target_area": False, "shapes": ("circle",), "opacity": (0.1, 0.2), "num_ops": 3}
    assert calls["extended"] == {**common, "affine": (10.0, 5.0, 0.1)}
    assert calls["simulated"] == {**common, "tries": 1, "max_exponent": 4, "threshold": 0.6}


def test_bfloat16_training_picks_the_prototype_inference_picks():
    # Two prototypes nearly equidistant from each map: bfloat16 distances cannot tell them apart, float32 can.
    model = _tiny()
    shapes = [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    torch.manual_seed(0)
    base = [torch.randn(1, *s) for s in shapes]
    prototypes = [torch.cat([b + 0.05, b - 0.045]) for b in base]  # the second is nearer
    model.set_prototypes(prototypes)
    features = [b.clone() for b in base]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = model.residuals(features)
    for f, p, d in zip(features, prototypes, in_bf16, strict=True):
        assert (torch.linalg.vector_norm(f - p[1]) < torch.linalg.vector_norm(f - p[0])).item()
        torch.testing.assert_close(d, (f - p[1]).abs())


def _direct_head(q, k, v, patch, scale):
    """Eq. 3 by loops: tokens are the flattened (C, p, p) patches; softmax(QK^T * scale) V; back to the map."""
    _, c, h, w = q.shape
    grid = [(r, s) for r in range(0, h, patch) for s in range(0, w, patch)]
    tokens = [torch.stack([t[0, :, r : r + patch, s : s + patch].reshape(-1) for r, s in grid]) for t in (q, k, v)]
    out_tokens = torch.softmax(tokens[0] @ tokens[1].T * scale, dim=-1) @ tokens[2]
    out = torch.zeros_like(q)
    for (r, s), token in zip(grid, out_tokens, strict=True):
        out[0, :, r : r + patch, s : s + patch] = token.reshape(c, patch, patch)
    return out


@pytest.mark.parametrize(("qkv", "attn_scale"), [("conv1x1", "1/d"), ("conv1x1", "1/sqrt(d)"), ("diag", "1/d")])
def test_attention_matches_a_direct_computation(qkv, attn_scale):
    torch.manual_seed(0)
    block = MultiSizeAttention(2, 4, (1, 2, 4), qkv, attn_scale).eval()
    if qkv == "diag":
        for weight, bias in zip(block.weight, block.bias, strict=True):
            torch.nn.init.normal_(weight)
            torch.nn.init.normal_(bias)
    x = torch.randn(1, 2, 4, 4) * 3
    assert block.patches == [4, 2, 1]
    if qkv == "conv1x1":
        projected = torch.nn.functional.conv2d(x, block.projection.weight, block.projection.bias).chunk(9, dim=1)
        qkvs = [projected[3 * s : 3 * s + 3] for s in range(3)]
    else:
        qkvs = []
        for weight, bias, p in zip(block.weight, block.bias, block.patches, strict=True):
            g = 4 // p
            qkvs.append([x * weight[i].repeat(1, g, g) + bias[i].repeat(1, g, g) for i in range(3)])
    heads = []
    for (q, k, v), patch in zip(qkvs, block.patches, strict=True):
        d = 2 * patch * patch
        scale = 1 / d if attn_scale == "1/d" else 1 / math.sqrt(d)
        heads.append(_direct_head(q, k, v, patch, scale))
    torch.testing.assert_close(heads[0], qkvs[0][2])  # one token: softmax is 1, the head returns V
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.block(torch.cat(heads, dim=1)))


def test_attention_pads_maps_that_patches_do_not_divide():
    block = MultiSizeAttention(4, 7, (1, 2, 4, 8))
    assert block.patches == [7, 4, 2, 1]
    assert block(torch.randn(2, 4, 7, 7)).shape == (2, 4, 7, 7)


def test_losses_on_hand_made_tensors():
    logits = torch.tensor([[[[2.0, -1.0], [0.0, 3.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    p = torch.sigmoid(logits)
    p_t = torch.where(target > 0, p, 1 - p)
    expected = (-0.5 * (1 - p_t) ** 4 * torch.log(p_t)).mean()
    torch.testing.assert_close(focal_loss(logits, target, 0.5, 4.0), expected)
    alpha_t = torch.where(target > 0, 0.25, 0.75)
    torch.testing.assert_close(focal_loss(logits, target, 0.25, 2.0), (-alpha_t * (1 - p_t) ** 2 * p_t.log()).mean())
    cfg = PRNConfig()
    smooth = 0.5 * ((p - target) ** 2).mean()  # |x| < 1 everywhere: smooth L1 = 0.5 MSE
    torch.testing.assert_close(prn_loss(logits, target, cfg), smooth + 5 * expected)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_training_steps_fit_a_fixed_batch(precision):
    # PRN's trainable blocks (fusion, attention, decoder) learn: Adam steps on one batch of defects with masks
    # lower the loss and raise the map inside the masks above the map outside, in either training precision.
    # Two images and six steps: bfloat16 autocast is about ten times slower than float32 on a CPU without native
    # bfloat16 instructions (measured on a 2-core AMD EPYC), and the loss falls below half its start by step 4.
    model = _tiny(msa_depth=1).train()
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 16:40, 20:44] = 1
    images = torch.where(masks > 0, 1 - images * 0.2, images * 0.5)  # a bright square on a darker texture
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        with autocast(precision, images.device):
            logits = model.segment_logits(images)
        loss = prn_loss(logits.float(), masks, model.config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        probabilities = torch.sigmoid(model.segment_logits(images))
    assert probabilities[masks > 0].mean() > probabilities[masks == 0].mean() + 0.2


def test_image_score_is_the_mean_of_the_top_k_pixels():
    model = _tiny(image_score_topk=100)
    logits = torch.randn(2, 1, 64, 64)
    model.segment_logits = lambda images: logits
    anomaly_map, score = model.raw_scores(torch.rand(2, 3, 64, 64))
    expected = torch.sigmoid(logits).flatten(1).sort(dim=1, descending=True).values[:, :100].mean(1)
    torch.testing.assert_close(score, expected)
    torch.testing.assert_close(anomaly_map, torch.sigmoid(logits))


def _defects(counts):
    return [Sample(f"/d/{t}/{i}.png", 1, t, f"/m/{t}/{i}.png") for t, n in counts.items() for i in range(n)]


def test_seen_split_is_stratified_and_reproducible():
    samples = [Sample(f"/g/{i}.png") for i in range(5)] + _defects({"a": 20, "b": 3, "c": 9, "d": 1, "e": 30})
    chosen = select_seen_anomalies(samples, 10, seed=0)
    counts = {t: sum(s.defect_type == t for s in chosen) for t in "abcde"}
    assert len(chosen) == 10 and counts["d"] == 1 and all(counts[t] >= 2 for t in "abce")
    assert chosen == select_seen_anomalies(samples, 10, seed=0)
    assert chosen != select_seen_anomalies(samples, 10, seed=1)
    assert all(s.label == 1 for s in chosen)
    assert len(select_seen_anomalies(samples, 100, seed=0)) == 63
    assert select_seen_anomalies(samples, 0) == []
    few = select_seen_anomalies(_defects({"a": 2, "b": 2, "c": 2}), 4, seed=0)
    assert sorted(sum(s.defect_type == t for s in few) for t in "abc") == [1, 1, 2]
    with pytest.raises(ConfigError):
        select_seen_anomalies(samples, -1)


def test_fit_uses_seen_anomalies(tiny_dataset):
    split = load_dataset(tiny_dataset)
    model = _tiny(**QUICK_FIT, batch_normal=1, batch_extended=1, batch_simulated=1)
    seen = select_seen_anomalies(split.test, 2, seed=0)
    ctx = FitContext(quiet=True, seen_anomalies=seen)
    report = fit(model, split.train, ctx)
    assert report["num_seen_anomalies"] == 2 and report["batch"] == [1, 1, 1]
    assert report["num_prototypes"] == [1, 1, 1] and bool(model.fitted)
    no_seen = fit(
        _tiny(**QUICK_FIT, batch_normal=1, batch_extended=2, batch_simulated=1), split.train, FitContext(quiet=True)
    )
    assert no_seen["batch"] == [1, 0, 3]  # EA slots become simulated anomalies


def test_grey_pseudo_makes_synthetic_and_extended_defects_grey():
    rng = np.random.default_rng(0)
    normals = np.repeat(rng.integers(0, 256, (4, 64, 64, 1), dtype=np.uint8), 3, axis=3)  # a grey camera
    seen = (normals[:2].copy(), np.zeros((2, 64, 64), dtype=bool))
    seen[1][:, 20:40, 20:40] = True
    batch = {"batch_normal": 0, "batch_extended": 2, "batch_simulated": 4, "hea_prob": 1.0}  # coloured textures
    for grey_pseudo in (False, True):
        cfg = PRNConfig(**TINY, **batch, grey_pseudo=grey_pseudo)
        draw = AnomalyBatches(cfg, normals, seen, seed=0)
        pairs = [draw.extended() for _ in range(2)] + [draw.simulated() for _ in range(4)]
        coloured = [bool(np.ptp(image, axis=2).max() > 0) for image, _ in pairs]
        assert any(coloured) != grey_pseudo  # procedural textures colour the HEA defects unless asked
        if grey_pseudo:  # greying left every defect some changed pixels (match_grey keeps masks exact: its own test)
            assert all(mask.any() for _, mask in pairs)


def test_fit_in_bfloat16_trains_float32_weights_differently(tiny_dataset):
    train = load_dataset(tiny_dataset).train
    options = {**QUICK_FIT, "batch_normal": 1, "batch_extended": 0, "batch_simulated": 1, "precise_bn_batches": 1}
    start = torch.cat([p.detach().flatten() for p in _tiny(**options).parameters() if p.requires_grad])
    steps = []
    for precision in ("float32", "bfloat16"):
        model = _tiny(**options, train_precision=precision)  # same seed, same initial weights
        fit(model, train, FitContext(quiet=True))
        trained = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in trained)
        steps.append(torch.cat([p.detach().flatten() for p in trained]) - start)
    exact, mixed = steps
    assert not torch.equal(exact, mixed)  # same seed and data: only the precision differs
    # Adam's first step is lr * sign(gradient); bfloat16 rounding flips the signs of only the smallest gradients.
    assert F.cosine_similarity(exact, mixed, dim=0) > 0.5


def test_recalibrated_batchnorm_holds_the_exact_statistics_of_the_batches():
    torch.manual_seed(0)
    frozen = torch.nn.BatchNorm1d(2).requires_grad_(False)
    model = torch.nn.Sequential(frozen, torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    batches = [torch.randn(5, 2) * 3 + 1 for _ in range(4)]
    assert recalibrate_batchnorm(model, batches, model) == 1
    hidden = model[1](torch.cat(batches)).detach()  # frozen BN in eval mode with default statistics = identity
    norm = model[2]
    torch.testing.assert_close(norm.running_mean, hidden.mean(0))
    # BatchNorm stores unbiased per-batch variances; their average over the equal-size batches:
    expected_var = torch.stack([model[1](b).detach().var(0) for b in batches]).mean(0)
    torch.testing.assert_close(norm.running_var, expected_var, rtol=1e-4, atol=1e-5)
    assert not model.training and norm.momentum == 0.1
    assert torch.equal(frozen.running_mean, torch.zeros(2)) and torch.equal(frozen.running_var, torch.ones(2))
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batchnorm(model, [], model)
    torch.testing.assert_close(norm.running_mean, hidden.mean(0))  # left as it was


def test_prototype_holdout_splits_the_good_images_disjointly():
    normals = np.arange(10)[:, None] * np.ones((1, 4), np.uint8)
    both, same = split_prototype_images(normals, 0.0, seed=0)
    assert both is normals and same is normals
    protos, hosts = split_prototype_images(normals, 0.3, seed=0)
    assert len(protos) == 3 and len(hosts) == 7
    assert sorted({*protos[:, 0], *hosts[:, 0]}) == list(range(10))
    again, _ = split_prototype_images(normals, 0.3, seed=0)
    assert np.array_equal(protos, again)
    assert len(split_prototype_images(normals[:2], 0.9, seed=0)[1]) == 1  # at least one training image
    with pytest.raises(ConfigError, match="prototype_holdout"):
        split_prototype_images(normals[:1], 0.5, seed=0)


def test_fit_with_prototype_holdout_reports_the_split(tiny_dataset):
    split = load_dataset(tiny_dataset)
    model = _tiny(
        **QUICK_FIT, batch_normal=1, batch_extended=0, batch_simulated=1, prototype_holdout=0.5, precise_bn_batches=3
    )
    report = fit(model, split.train, FitContext(quiet=True))
    assert report["num_prototype_images"] + report["num_training_hosts"] == len(split.train)
    assert report["num_prototype_images"] == round(0.5 * len(split.train))
    assert not model.training
    # The decoder's statistics come from the 3 re-estimation batches alone (counter reset, then one per batch);
    # the frozen encoder's are untouched.
    decoder_norms = [m for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert decoder_norms and all(int(m.num_batches_tracked) == 3 for m in decoder_norms)
    assert all(int(m.num_batches_tracked) == 0 for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


GEOMETRY = {"image_size": 64, "resize_size": 0}
TINY_PRN = {
    "backbone": "efficientnet_lite0",
    **GEOMETRY,
    "num_epochs": 1,
    "steps_per_epoch": 1,
    "batch_normal": 1,
    "batch_extended": 1,
    "batch_simulated": 1,
    "msa_depth": 1,
}


def test_anomaly_folder_layouts(tiny_dataset, tmp_path):
    # MVTec-style root: the defective test images with their masks, test/good left out.
    from_root = load_anomaly_folder(tiny_dataset)
    defective = [s for s in load_dataset(tiny_dataset).test if s.label]
    assert [(s.path, s.mask_path, s.defect_type) for s in from_root] == [
        (s.path, s.mask_path, s.defect_type) for s in defective
    ]
    # The same without the test/ level, as a separate folder of labelled defects.
    flat = tmp_path / "defects"
    shutil.copytree(tiny_dataset / "test" / "scratch", flat / "scratch")
    shutil.copytree(tiny_dataset / "ground_truth" / "scratch", flat / "ground_truth" / "scratch")
    samples = load_anomaly_folder(flat)
    assert sorted(s.path.name for s in samples) == ["000.png", "001.png"]
    assert all(s.label == 1 and s.defect_type == "scratch" for s in samples)
    assert all(s.mask_path == flat / "ground_truth" / "scratch" / f"{s.path.stem}_mask.png" for s in samples)
    # PRN trains on the folder's defects. These are copies of test images, so `flawscope test` recognises them by
    # their bytes and leaves them out; a folder of other defects leaves every test image in.
    run = flawscope.fit("prn", tiny_dataset, tmp_path / "run", options=TINY_PRN, anomaly_dir=flat, quiet=True)
    config = json.loads((run / "config.json").read_text())
    assert sorted(config["seen_anomalies"]) == sorted(str(s.path.resolve()) for s in samples)
    assert config["seen_anomalies_from_test"] is False
    tested = run_test(run, tiny_dataset, out=tmp_path / "copies", quiet=True, report=False)
    assert sorted(Path(p).name for p in tested["excluded_seen"]) == ["000.png", "001.png"]
    for image in (flat / "scratch").iterdir():  # now other images than the test set's
        pixels = read_image(image)
        save_png(image, 255 - pixels)
    other = flawscope.fit("prn", tiny_dataset, tmp_path / "other", options=TINY_PRN, anomaly_dir=flat, quiet=True)
    assert run_test(other, tiny_dataset, quiet=True, report=False)["num_excluded_seen"] == 0
    # Errors name the problem: a missing mask, no defects, no folder.
    (flat / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="001.png has no mask"):
        load_anomaly_folder(flat)
    with pytest.raises(DataError, match="No labelled defects"):
        load_anomaly_folder(tiny_dataset / "train")
    with pytest.raises(DataError, match="does not exist"):
        load_anomaly_folder(tmp_path / "missing")


def test_seen_defects_never_appear_in_the_test_set(tiny_dataset, tmp_path):
    options = TINY_PRN
    run = flawscope.fit("prn", tiny_dataset, tmp_path / "run", options=options, seen_anomalies=3, quiet=True)
    config = json.loads((run / "config.json").read_text())
    seen = config["seen_anomalies"]
    assert len(seen) == 3 and len({p.split("/")[-2] for p in seen}) == 3  # one of each defect type
    metrics = run_test(run, tiny_dataset, quiet=True, report=False)
    assert metrics["num_excluded_seen"] == 3 and sorted(metrics["excluded_seen"]) == sorted(seen)
    with open(run / "per_image.csv") as f:
        tested = {row["path"] for row in csv.DictReader(f)}
    assert len(tested) == len(load_dataset(tiny_dataset).test) - 3 and not tested & set(seen)
    # An unsupervised run tested with --exclude-seen-of leaves out the same images, so the two compare on one split.
    lite0 = {"backbone": "efficientnet_lite0", **GEOMETRY}
    patchcore = flawscope.fit("patchcore", tiny_dataset, tmp_path / "pc-run", options=lite0, quiet=True)
    unsupervised = run_test(patchcore, tiny_dataset, quiet=True, report=False, exclude_seen_of=run)
    assert sorted(unsupervised["excluded_seen"]) == sorted(seen) and unsupervised["num_excluded_seen"] == 3
    # The same images elsewhere are recognised by their bytes: a copy of the data set, tested, leaves them out too.
    copy = shutil.copytree(tiny_dataset, tmp_path / "copy")
    on_copy = run_test(run, copy, out=tmp_path / "copy-test", quiet=True, report=False)
    assert on_copy["num_excluded_seen"] == 3
    assert sorted(Path(p).relative_to(copy) for p in on_copy["excluded_seen"]) == sorted(
        Path(p).relative_to(tiny_dataset.resolve()) for p in seen
    )
    # The model folder shipped alone (no config.json) still leaves them out: model.json holds the same list.
    shipped = shutil.copytree(run / "model", tmp_path / "shipped")
    alone = run_test(shipped, tiny_dataset, out=tmp_path / "shipped-test", quiet=True, report=False)
    assert sorted(alone["excluded_seen"]) == sorted(seen)
    with pytest.warns(UserWarning, match="synthetic defects only"):
        flawscope.fit("prn", tiny_dataset, tmp_path / "zero", options=options, seen_anomalies=0, quiet=True)
    with pytest.raises(ConfigError, match="good images only"):
        flawscope.fit("patchcore", tiny_dataset, tmp_path / "pc", seen_anomalies=3, quiet=True)


def test_cli_fit_says_how_many_seen_defects_it_trained_on_and_from_where(tiny_dataset, tmp_path):
    from click.testing import CliRunner

    from flawscope.cli import main

    settings = [arg for key, value in TINY_PRN.items() for arg in ("--set", f"{key}={value}")]
    args = ["fit", "--model", "prn", "--data", str(tiny_dataset), "--out", str(tmp_path / "r"), "--quiet", *settings]
    result = CliRunner().invoke(main, [*args, "--seen-anomalies", "3"])
    assert result.exit_code == 0, result.output
    assert "trained on 3 labelled defects from the test split of the data (removed from it by `flawscope test`)" in (
        result.output
    )


def test_seen_anomalies_asked_of_a_plain_folder_say_it_has_no_test_split(tiny_dataset):
    from flawscope.api import _seen_anomalies
    from flawscope.registry import get_method

    plain = load_dataset(tiny_dataset / "train" / "good")
    with pytest.warns(UserWarning, match=r"synthetic defects only \(no labelled defects with masks in the data, a "):
        seen, record = _seen_anomalies(get_method("prn"), plain, 3, None, seed=0)
    assert seen == [] and "plain folder of good images with no test split" in record["seen_anomalies_source"]


def test_cli_refuses_seen_anomalies_for_unsupervised_methods(tiny_dataset, tmp_path):
    from click.testing import CliRunner

    from flawscope.cli import main

    args = ["fit", "--model", "patchcore", "--data", str(tiny_dataset), "--out", str(tmp_path / "r"), "--quiet"]
    result = CliRunner().invoke(main, [*args, "--seen-anomalies", "3"])
    assert result.exit_code == 2 and "good images only" in result.output


def test_shared_fusion_weights_save_and_load(tiny_dataset, tmp_path):
    # mf_share_weights=true puts one MF module under two names; safetensors refuses shared storage, so save_model
    # stores a copy under the second name, and loading gives the same outputs with the module still shared.
    from flawscope.model_io import load_model, save_model

    split = load_dataset(tiny_dataset)
    model = _tiny(**QUICK_FIT, batch_normal=1, batch_extended=0, batch_simulated=1, mf_share_weights=True)
    fit(model, split.train, FitContext(quiet=True))
    assert model.residual_fusion is model.feature_fusion
    loaded = load_model(save_model(model, tmp_path / "model"))
    assert loaded.residual_fusion is loaded.feature_fusion
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(images), loaded(images), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"opacity_range": (0.9, 0.1)}, "opacity_range must be two numbers LOW,HIGH with LOW <= HIGH"),
        ({"opacity_range": (0.1,)}, "opacity_range must be two numbers"),
        ({"decoder_stride": 16}, "decoder_stride (16) must be deeper than every stage in strides (4,8,16)"),
        ({"perlin_threshold": 1.0}, "'perlin_threshold' parameter of PRNConfig must be in [0, 1)"),
        ({"target_area_shapes": ("star",)}, "target_area_shapes must be a non-empty subset of"),
        ({"aug2_ranges": (45.0, 16.0)}, "aug2_ranges needs three values"),
        ({"aug2_ranges": (45.0, 90.0, 0.25)}, "shear < 90 degrees"),
        ({"train_layer4": True, "feature_norm": "position"}, "leave train_layer4 off with it"),
        ({"batch_normal": 0, "batch_extended": 0, "batch_simulated": 0}, "a training batch would hold no image"),
    ],
)
def test_options_that_would_fail_after_training_are_refused_when_the_config_is_built(options, fragment):
    with pytest.raises(ConfigError) as error:
        PRNConfig(**options)
    assert fragment in str(error.value)


# --- P2: the encoder stage that starts the decoder, trained (train_layer4) -----------------------------------------


def test_a_timm_efficientnet_encoder_builds_and_refuses_train_layer4_only():
    # timm's EfficientNet feature models have no named stage list; PRN builds on them, train_layer4 says why not.
    model = _tiny(backbone="timm:efficientnet_b0")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    with pytest.raises(ConfigError, match="train_layer4 needs an encoder whose stages are named.*timm:efficientnet_b0"):
        _tiny(backbone="timm:efficientnet_b0", train_layer4=True)


def test_decoder_stage_is_layer4_or_the_stride_32_blocks():
    resnet = _tiny()
    assert resnet.decoder_stage() == [resnet.backbone.body.layer4]
    lite = _tiny(backbone="efficientnet_lite0")
    assert lite.decoder_stage() == [lite.backbone.body.blocks_5, lite.backbone.body.blocks_6]


def test_train_layer4_trains_layer4_only_with_its_batchnorm_in_training_mode(tiny_dataset, tmp_path):
    from flawscope.model_io import load_model, save_model

    frozen, trained = _tiny(), _tiny(train_layer4=True)
    layer4 = sum(p.numel() for p in trained.backbone.body.layer4.parameters())
    count = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (frozen, trained)]
    assert count[1] == count[0] + layer4 and layer4 == 8_393_728  # ResNet-18's layer4
    trained.train()
    assert trained.backbone.body.layer4.training and not trained.backbone.body.layer3.training
    assert not frozen.train().backbone.body.layer4.training
    logits = trained.segment_logits(torch.rand(2, 3, 64, 64))
    logits.mean().backward()
    grads = [p.grad for p in trained.backbone.body.layer4.parameters()]
    # Every weight gets a gradient; at random init only part of them are non-zero (timm zero-initialises each
    # block's last BatchNorm scale, which blocks the gradient of the convolutions before it).
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in trained.backbone.body.layer3.parameters())
    trained.eval()
    assert not trained.backbone.body.layer4.training

    # A fit moves layer4 and keeps layer3; the saved model holds the trained stage.
    model = _tiny(**QUICK_FIT, batch_normal=1, batch_extended=0, batch_simulated=1, train_layer4=True)
    before = copy.deepcopy(model.backbone.body.state_dict())
    fit(model, load_dataset(tiny_dataset).train, FitContext(quiet=True))
    after = model.backbone.body.state_dict()
    moved = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert moved == {"blocks_5", "blocks_6"}  # EfficientNet-Lite0's stride-32 blocks; weights and BN statistics
    loaded = load_model(save_model(model, tmp_path / "model"))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(images), loaded(images), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- xcyao00's rotation of the base image (base_rotate_prob) -------------------------------------------------------


def test_base_rotation_rotates_the_images_defects_are_made_on_and_no_good_image(monkeypatch):
    prn_fit = importlib.import_module("flawscope.models.prn.fit")
    bases = []

    def record(image, *args, **kwargs):  # the generators' view: the base image each is given
        bases.append(image.copy())
        return image, np.zeros(image.shape[:2], bool)

    monkeypatch.setattr(prn_fit, "extended_anomaly", record)
    monkeypatch.setattr(prn_fit, "simulated_anomaly", record)
    normals = np.full((3, 32, 32, 3), 255, np.uint8)  # white: a rotation shows as black corners
    seen = (np.zeros((1, 32, 32, 3), np.uint8), np.ones((1, 32, 32), bool))
    batch = {"batch_normal": 2, "batch_extended": 1, "batch_simulated": 1, "hea_prob": 0.0}
    for prob, rotated in ((0.0, range(0, 1)), (1.0, range(17, 21))):  # a draw near 0 degrees leaves no dark corner
        bases.clear()
        draw = AnomalyBatches(PRNConfig.from_dict({**TINY, **batch, "base_rotate_prob": prob}), normals, seen, seed=0)
        for _ in range(10):
            images, _ = draw()
            assert images[:2].min() == 1.0  # the batch's good images are never rotated
        dark = [float((b < 0.5).mean()) for b in bases]
        assert len(dark) == 20 and sum(d > 0 for d in dark) in rotated
        # The black corners are largest at 45 degrees: 3 - 2 sqrt(2), about 17 % of the square.
        assert max(dark) <= 0.18


def test_base_rotation_turns_the_foreground_with_the_image():
    normals = np.zeros((1, 32, 32, 3), np.uint8)
    normals[0, :, :16] = 255  # left half bright: Otsu's foreground
    cfg = PRNConfig.from_dict({**TINY, "base_rotate_prob": 1.0, "foreground": "otsu"})
    draw = AnomalyBatches(cfg, normals, (np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0, 32, 32), bool)), seed=3)
    image, foreground = draw._normal(base=True)
    assert foreground.shape == (32, 32) and foreground.any()
    np.testing.assert_array_equal(
        foreground & (image[..., 0] < 0.5), np.zeros((32, 32), bool)
    )  # still on the bright part


def test_taking_every_test_defect_as_seen_warns_that_none_is_left_to_test(tiny_dataset):
    import warnings

    from flawscope.api import _seen_anomalies
    from flawscope.registry import get_method

    dataset = load_dataset(tiny_dataset)  # 6 defects: the default 10 takes them all
    with pytest.warns(UserWarning, match="takes every labelled defect of the test split \\(6\\).*metrics will be n/a"):
        _seen_anomalies(get_method("prn"), dataset, None, None, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seen, _ = _seen_anomalies(get_method("prn"), dataset, 2, None, 0)
    assert len(seen) == 2
