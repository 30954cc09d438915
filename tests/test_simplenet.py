"""SimpleNet: spec sizes, loss, noise generator, scoring path, one training step and a short fit."""

import copy
import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from flawscope.data import load_dataset
from flawscope.errors import ConfigError
from flawscope.fitting import FitContext
from flawscope.models.simplenet import SimpleNet, SimpleNetConfig, fit
from flawscope.models.simplenet.fit import (
    _optimizers,
    fit_standardization,
    make_fake_features,
    noise_sigma,
    train_step,
    truncated_l1_loss,
)
from flawscope.models.simplenet.model import PAPER_BACKBONES

SMALL = {"backbone": "resnet18", "image_size": 64, "resize_size": 0, "embed_dim": 16, "discriminator_hidden": 8}


def _small_model(**changes) -> SimpleNet:
    torch.manual_seed(0)
    return SimpleNet(SimpleNetConfig.from_dict({**SMALL, **changes}), pretrained=False)


@pytest.fixture(scope="module")
def paper_model() -> SimpleNet:
    """The paper's configuration (WRN-50-2, 224 px) with random backbone weights."""
    torch.manual_seed(0)
    return SimpleNet(SimpleNetConfig(), pretrained=False).eval()


# --- sizes (spec 2.3, 2.4, 2.6) -------------------------------------------------------------------------------------


def test_paper_feature_grid_is_28x28x1536(paper_model):
    with torch.no_grad():
        features = paper_model.local_features(torch.rand(1, 3, 224, 224))
    assert features.shape == (1, 28, 28, 1536)


def test_adaptor_parameter_count(paper_model):
    assert paper_model.adaptor.bias is None
    assert sum(p.numel() for p in paper_model.adaptor.parameters()) == 2_359_296 == 1536 * 1536
    # The adaptor's size depends only on embed_dim, so a cheap backbone is enough for the bias variant.
    with_bias = _small_model(embed_dim=1536, adaptor_bias=True)
    assert sum(p.numel() for p in with_bias.adaptor.parameters()) == 2_360_832 == 1536 * 1536 + 1536


def test_discriminator_parameter_count_matches_the_spec_breakdown(paper_model):
    # Spec 2.6: 1,576,960 parameters "plus BN running statistics", i.e. BN's affine weight and bias are counted:
    # Linear(1536, 1024) with bias + BN affine (2 x 1024) + Linear(1024, 1) without bias.
    first, norm, act, last = paper_model.discriminator
    assert isinstance(norm, torch.nn.BatchNorm1d) and isinstance(act, torch.nn.LeakyReLU)
    assert act.negative_slope == 0.2
    assert first.weight.numel() == 1536 * 1024 and first.bias.numel() == 1024
    assert norm.weight.numel() == norm.bias.numel() == 1024
    assert last.weight.shape == (1, 1024) and last.bias is None
    total = sum(p.numel() for p in paper_model.discriminator.parameters())
    assert total == 1_576_960 == (1536 * 1024 + 1024) + 2 * 1024 + 1024
    # Running statistics are buffers, not parameters.
    assert {name for name, _ in norm.named_buffers()} == {"running_mean", "running_var", "num_batches_tracked"}


# --- loss -----------------------------------------------------------------------------------------------------------


def test_truncated_l1_loss_on_hand_made_scores():
    real = torch.tensor([1.0, 0.2, -0.5, 0.5])  # hinge terms 0.5 - s: 0, 0.3, 1.0, 0
    fake = torch.tensor([-1.0, 0.0, 0.3, -0.4])  # hinge terms s + 0.5: 0, 0.5, 0.8, 0.1
    expected = (0.3 + 1.0) / 4 + (0.5 + 0.8 + 0.1) / 4
    assert truncated_l1_loss(real, fake).item() == pytest.approx(expected)
    assert truncated_l1_loss(real, fake, margin=0.0).item() == pytest.approx(0.5 / 4 + 0.3 / 4)
    # Scores beyond the margins cost nothing.
    assert truncated_l1_loss(torch.tensor([0.5, 2.0]), torch.tensor([-0.5, -3.0])).item() == 0.0


def test_truncated_l1_loss_gradient_only_where_the_margin_is_violated():
    real = torch.tensor([1.0, 0.2], requires_grad=True)
    fake = torch.tensor([-1.0, 0.3], requires_grad=True)
    truncated_l1_loss(real, fake).backward()
    torch.testing.assert_close(real.grad, torch.tensor([0.0, -0.5]))
    torch.testing.assert_close(fake.grad, torch.tensor([0.0, 0.5]))


# --- anomalous feature generator ------------------------------------------------------------------------------------


def test_fake_features_noise_statistics():
    sigma = 0.015
    generator = torch.Generator().manual_seed(0)
    noise = make_fake_features(torch.zeros(400, 500), sigma, generator)
    assert noise.shape == (400, 500)
    assert abs(noise.mean().item()) < 5 * sigma / math.sqrt(noise.numel())
    assert noise.std().item() == pytest.approx(sigma, rel=0.01)


def test_fake_features_are_additive_fresh_per_call_and_seeded():
    features = torch.randn(6, 8)
    a = make_fake_features(features, 0.1, torch.Generator().manual_seed(3))
    b = make_fake_features(features, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    generator = torch.Generator().manual_seed(3)
    first, second = make_fake_features(features, 0.1, generator), make_fake_features(features, 0.1, generator)
    assert not torch.allclose(first, second)
    # The noise does not depend on the features (q- = q + eps).
    offset = make_fake_features(torch.zeros(6, 8), 0.1, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a - features, offset)


def test_fake_features_are_not_detached():
    features = torch.randn(5, 4, requires_grad=True)
    fake = make_fake_features(features, 0.5, torch.Generator().manual_seed(0))
    assert fake.requires_grad
    (fake * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(features.grad, torch.arange(4.0).expand(5, 4))


# --- scoring path (spec 2.9) ----------------------------------------------------------------------------------------


def test_scoring_path_matches_a_direct_computation(paper_model):
    torch.manual_seed(1)
    norm = paper_model.discriminator[1]
    norm.running_mean.normal_(0, 0.5)  # non-trivial eval statistics, so BN's role is visible
    norm.running_var.uniform_(0.5, 2.0)
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        out = paper_model(images)
        features = paper_model.local_features(images)  # (1, 28, 28, 1536)
        adapted = features.reshape(-1, 1536) @ paper_model.adaptor.weight.T
        grid = -paper_model.discriminator(adapted).reshape(28, 28)  # s = -D(q)
    assert out.pred_score.shape == (1,)
    # Eq. 11: the maximum of the raw 28 x 28 grid, before upsampling and smoothing.
    torch.testing.assert_close(out.pred_score[0], grid.max(), rtol=1e-5, atol=1e-5)
    upsampled = F.interpolate(grid[None, None], size=(224, 224), mode="bilinear", align_corners=False)[0, 0]
    expected_map = scipy.ndimage.gaussian_filter(upsampled.double().numpy(), sigma=4)
    assert out.anomaly_map.shape == (1, 1, 224, 224)
    np.testing.assert_allclose(out.anomaly_map[0, 0].numpy(), expected_map, rtol=1e-4, atol=1e-4)
    # The image score is not taken from the smoothed map, whose peak is lower.
    assert out.anomaly_map.max().item() < out.pred_score.item() - 1e-3
    # The public code's top-k option: the mean of the k highest grid scores.
    top5 = SimpleNet(paper_model.config.replace(image_top_k=5), pretrained=False)
    top5.load_state_dict(paper_model.state_dict())
    with torch.no_grad():
        score = top5.eval()(images).pred_score[0]
    torch.testing.assert_close(score, grid.flatten().sort(descending=True).values[:5].mean(), rtol=1e-5, atol=1e-5)


def test_defaults_are_the_papers():
    # Sec. 4.2 of the paper: WRN-50 layer2+3, p = 3, 1536 channels, no adaptor bias, sigma 0.015, th = 0.5, Adam
    # 1e-4 / 2e-4 with weight decay 1e-5, 160 epochs at batch 4; Eq. 10's sigma 4 smoothing; Table 4's backbones.
    cfg = SimpleNetConfig()
    assert (cfg.backbone, cfg.strides, cfg.patch_size, cfg.embed_dim) == ("wide_resnet50_2", (8, 16), 3, 1536)
    assert (cfg.adaptor_bias, cfg.discriminator_hidden, cfg.noise_std, cfg.margin) == (False, 1024, 0.015, 0.5)
    assert (cfg.adaptor_layers, cfg.adaptor_activation, cfg.discriminator_layers) == (1, False, 2)
    assert (cfg.adaptor_optimizer, cfg.lr_adaptor, cfg.lr_discriminator, cfg.weight_decay) == ("adam", 1e-4, 2e-4, 1e-5)
    assert (cfg.num_epochs, cfg.batch_size, cfg.smoothing_sigma) == (160, 4, 4.0)
    assert (cfg.image_size, cfg.resize_size) == (224, 256)
    assert (cfg.resolved_feature_norm(), cfg.resolved_noise_mode()) == ("none", "absolute")
    assert sorted(PAPER_BACKBONES) == ["resnet101", "resnet18", "resnet50", "wide_resnet50_2"]


# --- noise sigma resolution -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", PAPER_BACKBONES)
def test_auto_noise_is_absolute_for_paper_backbones(backbone):
    cache = np.random.default_rng(0).normal(0, 3.0, (5, 4, 8)).astype(np.float16)
    cfg = SimpleNetConfig(backbone=backbone, noise_std=0.02)
    assert cfg.resolved_noise_mode() == "absolute"
    sigma, feature_std = noise_sigma(cfg, cache)
    assert sigma == 0.02
    assert feature_std == pytest.approx(float(cache.astype(np.float32).std()), rel=1e-6)


def test_auto_noise_is_relative_for_other_backbones():
    cache = np.random.default_rng(0).normal(0, 3.0, (5, 4, 8)).astype(np.float16)
    std = float(cache.astype(np.float32).std())
    cfg = SimpleNetConfig(backbone="efficientnet_lite0", noise_std_relative=0.1)
    assert cfg.resolved_noise_mode() == "relative"
    sigma, feature_std = noise_sigma(cfg, cache)
    assert feature_std == pytest.approx(std, rel=1e-6)
    assert sigma == pytest.approx(0.1 * std, rel=1e-6)


def test_explicit_noise_mode_overrides_the_backbone():
    cache = np.full((2, 3, 4), 1.0, np.float16)
    cache[0] = -1.0  # std exactly 1
    relative = SimpleNetConfig(backbone="wide_resnet50_2", noise_mode="relative", noise_std_relative=0.3)
    assert noise_sigma(relative, cache) == (pytest.approx(0.3), pytest.approx(1.0))
    absolute = SimpleNetConfig(backbone="efficientnet_lite0", noise_mode="absolute", noise_std=0.05)
    assert noise_sigma(absolute, cache) == (0.05, pytest.approx(1.0))


# --- optimisers and one training step -------------------------------------------------------------------------------


def test_optimizers_adam_default_and_adamw_variant():
    model = _small_model(weight_decay=1e-3)
    adaptor, discriminator = _optimizers(model)
    assert type(adaptor) is torch.optim.Adam and type(discriminator) is torch.optim.Adam
    assert adaptor.param_groups[0]["lr"] == 1e-4 and adaptor.param_groups[0]["weight_decay"] == 1e-3
    assert discriminator.param_groups[0]["lr"] == 2e-4 and discriminator.param_groups[0]["weight_decay"] == 1e-3
    assert {id(p) for p in adaptor.param_groups[0]["params"]} == {id(p) for p in model.adaptor.parameters()}
    assert {id(p) for p in discriminator.param_groups[0]["params"]} == {id(p) for p in model.discriminator.parameters()}

    adaptor, discriminator = _optimizers(_small_model(adaptor_optimizer="adamw", weight_decay=1e-3))
    assert type(adaptor) is torch.optim.AdamW
    assert adaptor.param_groups[0]["weight_decay"] == 0.01  # PyTorch's default, as in the public code
    assert adaptor.param_groups[0]["lr"] == 1e-4
    assert type(discriminator) is torch.optim.Adam and discriminator.param_groups[0]["weight_decay"] == 1e-3


def test_train_step_matches_a_direct_computation():
    model = _small_model()
    model.adaptor.train()
    model.discriminator.train()
    before = copy.deepcopy(model)
    features = torch.randn(12, 16)
    sigma = 0.5
    loss, real_mean, fake_mean = train_step(
        model, features.view(3, 4, 16), sigma, _optimizers(model), torch.Generator().manual_seed(7)
    )

    # Direct computation with the same noise on the pre-step weights.
    adapted = before.adaptor(features)
    fake = adapted + sigma * torch.randn(adapted.shape, generator=torch.Generator().manual_seed(7))
    both = torch.cat([adapted, fake])
    hidden = before.discriminator[0](both).detach()
    scores = before.discriminator(both)[:, 0]
    expected = truncated_l1_loss(scores[:12], scores[12:])
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert real_mean == pytest.approx(scores[:12].mean().item(), rel=1e-5, abs=1e-6)
    assert fake_mean == pytest.approx(scores[12:].mean().item(), rel=1e-5, abs=1e-6)

    # BatchNorm saw real and fake features together: one momentum update with the concatenated batch's statistics.
    norm = model.discriminator[1]
    torch.testing.assert_close(norm.running_mean, 0.1 * hidden.mean(0))
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * hidden.var(0, unbiased=True))
    assert not torch.allclose(norm.running_mean, 0.1 * hidden[:12].mean(0), atol=1e-3)

    # Gradients include the fake branch through the adaptor (q- is not detached).
    torch.testing.assert_close(model.adaptor.weight.grad, before.adaptor.weight.grad)
    torch.testing.assert_close(model.discriminator[0].weight.grad, before.discriminator[0].weight.grad)
    detached = copy.deepcopy(before)
    detached.zero_grad()
    q = detached.adaptor(features)
    s = detached.discriminator(torch.cat([q, (q + (fake - adapted)).detach()]))[:, 0]
    truncated_l1_loss(s[:12], s[12:]).backward()
    assert not torch.allclose(detached.adaptor.weight.grad, before.adaptor.weight.grad, atol=1e-6)


def test_train_step_updates_adaptor_and_discriminator_only():
    model = _small_model()
    model.adaptor.train()
    model.discriminator.train()
    before = copy.deepcopy(model)
    train_step(model, torch.randn(2, 4, 16), 0.1, _optimizers(model), torch.Generator().manual_seed(0))
    for name, param in model.named_parameters():
        old = dict(before.named_parameters())[name]
        if name.startswith(("adaptor.", "discriminator.")):
            assert not torch.equal(param, old), f"{name} was not updated"
        else:
            assert torch.equal(param, old), f"{name} changed"
    assert int(model.discriminator[1].num_batches_tracked) == 1


# --- short fit ------------------------------------------------------------------------------------------------------


def _short_fit(tiny_dataset):
    model = _small_model(embed_dim=64, discriminator_hidden=32, num_epochs=2)
    ctx = FitContext(quiet=True, seed=0)
    report = fit(model, load_dataset(tiny_dataset).train, ctx)
    return model, ctx, report


def test_short_fit_logs_each_epoch_and_marks_fitted(tiny_dataset):
    model, ctx, report = _short_fit(tiny_dataset)
    assert [entry["epoch"] for entry in ctx.log] == [1, 2]
    for entry in ctx.log:
        assert {"loss", "real_score", "fake_score"} <= set(entry)
        assert math.isfinite(entry["loss"]) and entry["loss"] >= 0
    assert bool(model.fitted) and not model.training
    assert report["final_loss"] == ctx.log[-1]["loss"]
    assert report["num_images"] == 12 and report["feature_grid"] == [64, 64]  # 8 x 8 locations of 64 dims
    assert report["noise_mode"] == "absolute" and report["noise_sigma"] == 0.015  # resnet18 is a paper backbone
    # 12 images in batches of 4: 3 steps per epoch, 6 BatchNorm updates.
    assert int(model.discriminator[1].num_batches_tracked) == 6

    again, again_ctx, _ = _short_fit(tiny_dataset)
    assert again_ctx.log == ctx.log  # seeded: same data order and noise
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# --- configuration errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"noise_mode": "foo"},
            r"'noise_mode' parameter of SimpleNetConfig must be one of 'auto', 'absolute', "
            r"'relative'; got 'foo'",
        ),
        ({"adaptor_optimizer": "sgd"}, r"'adaptor_optimizer'.*one of 'adam', 'adamw'; got 'sgd'"),
        ({"noise_std": 0}, r"'noise_std'.*must be in \(0, inf\]; got 0.0"),
        ({"noise_std_relative": -0.1}, r"'noise_std_relative'.*got -0.1"),
        ({"embed_dim": 0}, r"'embed_dim'.*got 0"),
        ({"noise_sigma": 0.1}, r"Unknown option\(s\) 'noise_sigma'.*Valid options:.*noise_std"),
    ],
)
def test_config_errors_name_the_option_and_valid_values(options, match):
    with pytest.raises(ConfigError, match=match):
        SimpleNetConfig.from_dict(options)


def test_image_context_doubles_the_adaptor_and_discriminator_input():
    model = _small_model(context_weight=1.0).eval()
    assert model.adaptor.weight.shape == (32, 32) and model.discriminator[0].in_features == 32
    assert model.feature_mean.shape == (32,)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = model.local_features(images)  # (2, 8, 8, 32)
        anomaly_map, score = model.raw_scores(images)
    torch.testing.assert_close(features[..., 16:], features[..., 16:][:, :1, :1].expand(2, 8, 8, 16))
    assert anomaly_map.shape == (2, 1, 64, 64) and score.shape == (2,)


def test_image_context_is_standardised_with_its_local_channels_statistics():
    # The context half must come out as w x the image mean of the standardised local half, and sigma must be
    # relative to the local features' spread only.
    model = _small_model(context_weight=2.0, feature_norm="channel", noise_mode="relative", noise_std_relative=0.5)
    torch.manual_seed(1)
    local = torch.randn(6, 10, 16) * torch.linspace(0.5, 3, 16) + 4  # (images, locations, D)
    cache = torch.cat([local, 2.0 * local.mean(1, keepdim=True).expand_as(local)], 2).half().numpy()
    fit_standardization(model, cache)
    standardized = model.standardize(torch.from_numpy(cache).float())
    expected = 2.0 * standardized[..., :16].mean(1, keepdim=True).expand(6, 10, 16)
    torch.testing.assert_close(standardized[..., 16:], expected, atol=1e-2, rtol=0)  # the cache is float16
    sigma, feature_std = noise_sigma(model.config, cache, model)
    assert feature_std == pytest.approx(1.0, abs=1e-3) and sigma == pytest.approx(0.5, abs=1e-3)


# --- per-position whitening (feature_norm=position) -----------------------------------------------------------------


def _position_cache(images: int = 40, positions: int = 3, dim: int = 16) -> np.ndarray:
    """Features whose mean and covariance differ from grid position to grid position: (images, positions, dim)."""
    generator = torch.Generator().manual_seed(3)
    mixing = torch.randn(positions, dim, dim, generator=generator) * torch.linspace(0.2, 2, positions)[:, None, None]
    offsets = torch.randn(positions, dim, generator=generator) * 5
    noise = torch.randn(images, positions, dim, generator=generator)
    return (torch.einsum("npd,ped->npe", noise, mixing) + offsets).half().numpy()


def test_position_whitening_gives_each_position_identity_covariance_and_the_mahalanobis_length():
    model = _small_model(feature_norm="position", position_shrinkage=0.01)
    cache = _position_cache()
    fit_standardization(model, cache)
    assert model.whitening.mean.shape == (3, 16) and model.whitening.matrix.shape == (3, 16, 16)

    # Direct computation in float64: channel standardisation, then each position's Gaussian.
    raw = torch.from_numpy(cache).double()
    flat = raw.flatten(0, 1)
    channel = (raw - flat.mean(0)) / flat.std(0, correction=0)
    mean = channel.mean(0)
    centred = channel - mean
    cov = torch.einsum("npd,npe->pde", centred, centred) / (len(cache) - 1) + 0.01 * torch.eye(16)
    whitened = model.standardize(torch.from_numpy(cache).float()).double()
    torch.testing.assert_close(whitened.mean(0), torch.zeros(3, 16, dtype=torch.float64), atol=1e-4, rtol=0)
    # W (Sigma + eps I) W^T = I at every position.
    w = model.whitening.matrix.double()
    torch.testing.assert_close(w @ cov @ w.transpose(1, 2), torch.eye(16).expand(3, 16, 16).double(), atol=2e-3, rtol=0)
    # The whitened length of a new feature is its Mahalanobis distance to the position's Gaussian.
    new = torch.randn(2, 3, 16, dtype=torch.float64) * 3
    new_channel = (new - flat.mean(0)) / flat.std(0, correction=0)
    diff = new_channel - mean
    expected = torch.einsum("npd,pde,npe->np", diff, torch.linalg.inv(cov), diff).sqrt()
    got = model.standardize(new.float()).double().norm(dim=-1)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0)
    # On whitened features the auto noise is relative, even on a paper backbone (resnet18 here).
    sigma, feature_std = noise_sigma(model.config, cache, model)
    assert model.config.resolved_noise_mode() == "relative" and sigma == pytest.approx(0.25 * feature_std)


def test_position_whitening_survives_save_and_load_and_checks_the_grid(tmp_path, tiny_dataset):
    from flawscope.model_io import load_model, save_model

    model = _small_model(feature_norm="position", num_epochs=1)
    fit(model, load_dataset(tiny_dataset).train, FitContext(quiet=True, seed=0))
    assert model.whitening.matrix.shape == (64, 16, 16)  # 8 x 8 grid positions at 64 px
    images = torch.rand(2, 3, 64, 64)
    loaded = load_model(save_model(model, tmp_path / "run"))
    with torch.no_grad():
        for a, b in zip(model.raw_scores(images), loaded.raw_scores(images), strict=True):
            torch.testing.assert_close(a, b)
        with pytest.raises(ConfigError, match="whitens 64 grid positions.*got features with 144"):
            model.raw_scores(torch.rand(1, 3, 96, 96))


def test_position_whitening_and_image_context_are_exclusive():
    with pytest.raises(ConfigError, match="one of context_weight and feature_norm=position"):
        SimpleNetConfig.from_dict({**SMALL, "feature_norm": "position", "context_weight": 1.0})


# --- the public code's adaptor and discriminator depths (pre_proj, proj_layer_type, dsc_layers) ---------------------


def test_adaptor_layers_stack_linear_maps_with_optional_leaky_relu():
    model = _small_model(adaptor_layers=3, adaptor_activation=True, adaptor_bias=True)
    kinds = [type(m).__name__ for m in model.adaptor]
    assert kinds == ["Linear", "LeakyReLU", "Linear", "LeakyReLU", "Linear"]
    assert sum(p.numel() for p in model.adaptor.parameters()) == 3 * (16 * 16 + 16)
    x = torch.randn(5, 16)
    expected = x
    for i, layer in enumerate(m for m in model.adaptor if isinstance(m, torch.nn.Linear)):
        expected = expected @ layer.weight.T + layer.bias
        if i < 2:
            expected = F.leaky_relu(expected, 0.2)
    torch.testing.assert_close(model.adaptor(x), expected)
    plain = _small_model(adaptor_layers=2)
    assert [type(m).__name__ for m in plain.adaptor] == ["Linear", "Linear"]


def test_no_adaptor_scores_the_standardised_features_and_trains_only_the_discriminator():
    model = _small_model(adaptor_layers=0)
    assert isinstance(model.adaptor, torch.nn.Identity)
    optimizers = _optimizers(model)
    assert len(optimizers) == 1
    assert {id(p) for p in optimizers[0].param_groups[0]["params"]} == {id(p) for p in model.discriminator.parameters()}
    train_step(model, torch.randn(2, 4, 16), 0.1, optimizers, torch.Generator().manual_seed(0))
    features = torch.randn(1, 2, 2, 16)
    model.eval()
    with torch.no_grad():
        expected = -model.discriminator(features.reshape(4, 16)).reshape(1, 2, 2)
        torch.testing.assert_close(model.score_features(features), expected)


@pytest.mark.parametrize(
    ("layers", "count"), [(1, 16), (2, 16 * 8 + 8 + 2 * 8 + 8), (3, 16 * 8 + 8 + 2 * 8 + 8 * 8 + 8 + 2 * 8 + 8)]
)
def test_discriminator_layers_and_their_parameter_counts(layers, count):
    model = _small_model(discriminator_layers=layers)  # embed_dim 16, discriminator_hidden 8
    assert sum(p.numel() for p in model.discriminator.parameters()) == count
    norms = [m for m in model.discriminator if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == layers - 1
    assert model.discriminator[-1].bias is None and model.discriminator[-1].out_features == 1


def test_deeper_adaptor_and_discriminator_fit_save_and_load(tmp_path, tiny_dataset):
    from flawscope.model_io import load_model, save_model

    model = _small_model(adaptor_layers=2, adaptor_activation=True, discriminator_layers=3, num_epochs=1)
    fit(model, load_dataset(tiny_dataset).train, FitContext(quiet=True, seed=0))
    loaded = load_model(save_model(model, tmp_path / "run"))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model.raw_scores(images), loaded.raw_scores(images), strict=True):
            torch.testing.assert_close(a, b)


def test_adaptor_activation_needs_two_layers():
    with pytest.raises(ConfigError, match="adaptor_activation.*adaptor_layers=1.*2 or more"):
        SimpleNetConfig.from_dict({**SMALL, "adaptor_activation": True})
