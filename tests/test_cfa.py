"""CFA: descriptor sizes, coupled-hypersphere loss, memory bank, soft-boundary scoring, k-means, a short fit."""

import copy
import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from flawscope.data import ImageDataset, load_dataset
from flawscope.errors import ConfigError, DataError
from flawscope.fitting import FitContext
from flawscope.layers import kmeans, pairwise_squared_distances
from flawscope.models.cfa import CFA, CFAConfig, fit
from flawscope.models.cfa.fit import (
    KMeansEMABank,
    PositionalMeanBank,
    build_memory_bank,
    coupled_hypersphere_loss,
    greedy_unique_matching,
    make_optimizer,
    train_step,
)
from flawscope.models.cfa.model import AddCoords, PatchDescriptor, soft_boundary_score

SMALL = {"backbone": "resnet18", "image_size": 64, "resize_size": 0, "gamma_d": 8}


def _small_model(**changes) -> CFA:
    torch.manual_seed(0)
    return CFA(CFAConfig.from_dict({**SMALL, **changes}), pretrained=False).eval()


@pytest.fixture(scope="module")
def paper_model() -> CFA:
    """The paper's configuration (WRN-50-2, strides 4/8/16, 224 px) with random backbone weights."""
    torch.manual_seed(0)
    return CFA(CFAConfig(), pretrained=False).eval()


# --- descriptor sizes (spec 2.3, 2.4) -------------------------------------------------------------------------------


def test_paper_defaults():
    cfg = CFAConfig()
    assert (cfg.backbone, cfg.strides, cfg.image_size, cfg.resize_size) == ("wide_resnet50_2", (4, 8, 16), 224, 256)
    assert (cfg.num_neighbors, cfg.num_hard_negatives, cfg.radius, cfg.alpha) == (3, 3, 1e-5, 0.1)
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.num_epochs) == (1e-3, 5e-4, 4, 30)
    assert (cfg.gamma_d, cfg.gamma_c, cfg.memory_init, cfg.learn_radius) == (1, 1, "kmeans_ema", False)
    assert cfg.smoothing_sigma == 4.0 and cfg.score_mode == "softmin"


def test_paper_descriptor_shapes_and_parameter_count(paper_model):
    assert paper_model.backbone.feature_info.channels == (256, 512, 1024)
    with torch.no_grad():
        stages = paper_model.backbone(torch.rand(1, 3, 224, 224))
        assert [tuple(s.shape[1:]) for s in stages] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14)]
        patch = paper_model.descriptor.patch_features(stages)
        out = paper_model.descriptor(stages)
    assert patch.shape == (1, 1792, 56, 56)  # D = 256 + 512 + 1024
    assert out.shape == (1, 1792, 56, 56) and paper_model.descriptor_dim == 1792  # gamma_d = 1
    conv = paper_model.descriptor.projection
    assert conv.weight.shape == (1792, 1794, 1, 1) and conv.bias.shape == (1792,)  # CoordConv: D + 2 inputs
    assert sum(p.numel() for p in paper_model.descriptor.parameters()) == 3_216_640 == 1794 * 1792 + 1792
    # Only the descriptor is trainable; the backbone is frozen.
    trainable = {name for name, p in paper_model.named_parameters() if p.requires_grad}
    assert trainable == {"descriptor.projection.weight", "descriptor.projection.bias"}


def test_gamma_d_reduces_descriptor_channels():
    # The descriptor's size depends only on D, so resnet18 (D = 448, spec 2.3) checks the reduction cheaply.
    model = _small_model(gamma_d=4)
    assert model.descriptor_dim == 112
    assert sum(p.numel() for p in model.descriptor.parameters()) == 450 * 112 + 112
    assert model.memory_bank.shape == (0, 112)


def test_descriptor_expansion_doubles_the_descriptor_and_the_bank(tmp_path):
    # The CFA code's EfficientNet descriptor maps D = 568 channels to 2 * 568 (spec A14); resnet18 has D = 448.
    from flawscope.model_io import load_model, save_model

    model = _small_model(gamma_d=1, descriptor_expansion=2)
    assert model.descriptor_dim == 896 and model.descriptor.projection.weight.shape == (896, 450, 1, 1)
    assert sum(p.numel() for p in model.descriptor.parameters()) == 450 * 896 + 896
    assert model.memory_bank.shape == (0, 896)
    reduced = _small_model(gamma_d=8, descriptor_expansion=2)
    assert reduced.descriptor_dim == 2 * 448 // 8
    model.memory_bank = torch.randn(16, 896)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert model.describe(images).shape == (2, 896, 16, 16)
        loaded = load_model(save_model(model, tmp_path / "run"))
        assert loaded.config.descriptor_expansion == 2
        torch.testing.assert_close(model.raw_scores(images)[0], loaded.raw_scores(images)[0])


def test_several_blocks_per_stage_widen_the_descriptor(tmp_path):
    # resnet18's layer1 and layer2 have two blocks each: D = 2 * 64 + 2 * 128 + 256 = 640 instead of 448.
    from flawscope.model_io import load_model, save_model

    model = _small_model(backbone_blocks="2,2,1")
    assert model.backbone.feature_info.channels == (128, 256, 256)
    assert model.descriptor_dim == 640 // 8 and model.descriptor.projection.in_channels == 640 + 2
    model.memory_bank = torch.randn(16, 80)  # as fitted: M items of D' channels
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert model.patch_features(images).shape == (2, 640, 16, 16)
        loaded = load_model(save_model(model, tmp_path / "run"))
        assert loaded.config.backbone_blocks == (2, 2, 1)
        torch.testing.assert_close(model.raw_scores(images)[0], loaded.raw_scores(images)[0])

    # The CFA code's EfficientNet descriptor divides each block's pooled map by its channel count (spec A14).
    divided = _small_model(backbone_blocks="2,2,1", channel_division=True)
    assert divided.descriptor.divisors == (64, 128, 256)
    stages = [torch.rand(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate((128, 256, 256))]
    plain = model.descriptor.patch_features(stages)
    scaled = divided.descriptor.patch_features(stages)
    torch.testing.assert_close(scaled[:, :128], plain[:, :128] / 64)
    torch.testing.assert_close(scaled[:, 128:384], plain[:, 128:384] / 128)
    torch.testing.assert_close(scaled[:, 384:], plain[:, 384:] / 256)


def test_he_init_and_the_pytorch_and_orthogonal_variants():
    torch.manual_seed(0)
    he = PatchDescriptor(1792, 1792, init="he").projection
    assert torch.all(he.bias == 0)
    assert he.weight.std().item() == pytest.approx(math.sqrt(2 / 1794), rel=0.01)  # Kaiming normal, fan-in
    torch.manual_seed(0)
    default = PatchDescriptor(1792, 1792, init="pytorch").projection
    bound = 1 / math.sqrt(1794)  # Conv2d's default: Kaiming uniform (a = sqrt 5) = U(-1/sqrt(fan_in), ...)
    assert default.weight.abs().max().item() <= bound and default.bias.abs().max().item() <= bound
    orthogonal = PatchDescriptor(62, 40, init="orthogonal").projection  # D + 2 = 64 inputs, D' = 40 rows
    weight = orthogonal.weight[:, :, 0, 0]
    torch.testing.assert_close(weight @ weight.T, 2 * torch.eye(40))  # orthonormal rows times He's gain sqrt(2)
    assert torch.all(orthogonal.bias == 0)
    points = torch.randn(5, 40) @ weight / 2  # points in the rows' span: their distances are scaled by sqrt 2
    mapped = points @ weight.T
    torch.testing.assert_close(torch.cdist(mapped, mapped), math.sqrt(2) * torch.cdist(points, points))


def test_patch_features_pool_upsample_concat_and_coordinates():
    torch.manual_seed(0)
    stages = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)]
    got = PatchDescriptor(8, 8).patch_features(stages)
    fine = F.avg_pool2d(stages[0], 3, 1, 1, count_include_pad=True)
    coarse = F.interpolate(F.avg_pool2d(stages[1], 3, 1, 1), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, torch.cat([fine, coarse], 1))  # the POOLED coarse map is upsampled
    unpooled = PatchDescriptor(8, 8, pool_size=1).patch_features(stages)  # pool_size=1: no pooling (as PaDiM)
    upsampled = F.interpolate(stages[1], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(unpooled, torch.cat([stages[0], upsampled], 1))
    per_stage = PatchDescriptor(8, 8, pool_size=(3, 1)).patch_features(stages)  # one kernel per stage
    torch.testing.assert_close(per_stage, torch.cat([fine, upsampled], 1))
    with_coords = AddCoords()(torch.zeros(1, 1, 4, 5))
    n_rows, n_cols = torch.arange(4.0) / 3 * 2 - 1, torch.arange(5.0) / 4 * 2 - 1  # public code's formula
    torch.testing.assert_close(with_coords[0, 1], n_rows[:, None].expand(4, 5))
    torch.testing.assert_close(with_coords[0, 2], n_cols[None].expand(4, 5))


# --- coupled-hypersphere loss (Eqs. 1-3) ----------------------------------------------------------------------------


def _bank_at(squared_distances):
    """Memory items on orthogonal axes, so the origin's squared distance to item m is exactly squared_distances[m]."""
    return torch.diag(torch.tensor(squared_distances, dtype=torch.float64).sqrt())


SQ = [0.01, 0.04, 0.09, 0.16, 0.25, 0.36, 0.49, 2.0]


def test_loss_attraction_only_when_spheres_are_small():
    origin = torch.zeros(1, len(SQ), dtype=torch.float64)
    terms = coupled_hypersphere_loss(origin, _bank_at(SQ), torch.tensor(0.2, dtype=torch.float64), alpha=0.1)
    # r^2 = 0.04: attraction to ranks 1-3 = max(0, [0.01, 0.04, 0.09] - 0.04) = [0, 0, 0.05].
    assert terms.attraction.item() == pytest.approx(0.05 / 3)
    # Repulsion from ranks 4-6 = max(0, 0.04 - [0.16, 0.25, 0.36] - 0.1) = 0.
    assert terms.repulsion.item() == 0 and terms.repulsion_active.item() == 0
    assert terms.total.item() == pytest.approx(0.05 / 3)


def test_loss_repulsion_active_with_a_large_radius():
    origin = torch.zeros(1, len(SQ), dtype=torch.float64)
    terms = coupled_hypersphere_loss(origin, _bank_at(SQ), torch.tensor(0.8, dtype=torch.float64), alpha=0.1)
    # r^2 = 0.64: every attractor is inside its sphere; the hard negatives at 0.16, 0.25, 0.36 are closer than
    # r^2 - alpha = 0.54, so each repels: 0.38 + 0.29 + 0.18.
    assert terms.attraction.item() == 0
    assert terms.repulsion.item() == pytest.approx((0.38 + 0.29 + 0.18) / 3)
    assert terms.repulsion_active.item() == 1.0


def test_loss_hard_negatives_are_ranks_k_plus_1_to_k_plus_j():
    origin = torch.zeros(1, len(SQ), dtype=torch.float64)
    terms = coupled_hypersphere_loss(
        origin, _bank_at(SQ), torch.tensor(0.8, dtype=torch.float64), 0.1, num_neighbors=2, num_hard_negatives=3
    )
    # K = 2, J = 3: repulsion from 0.09, 0.16, 0.25 (the public code's slice [J:] would take 0.16, 0.25 only).
    assert terms.repulsion.item() == pytest.approx((0.45 + 0.38 + 0.29) / 3)
    assert terms.attraction.item() == 0


def test_loss_averages_over_locations_and_euclidean_variant():
    points = torch.zeros(2, len(SQ), dtype=torch.float64)
    points[1, -1] = 10.0  # far from every item: attraction large, no repulsion
    bank = _bank_at(SQ)
    r = torch.tensor(0.2, dtype=torch.float64)
    terms = coupled_hypersphere_loss(points, bank, r, alpha=0.1)
    far = ((points[1] - bank) ** 2).sum(1).sort().values[:3]
    assert terms.attraction.item() == pytest.approx((0.05 + (far - 0.04).sum().item()) / 6)
    euclid = coupled_hypersphere_loss(points[:1], bank, r, alpha=0.1, distance="euclidean")
    # Distances 0.1, 0.2, 0.3 against r^2 = 0.04.
    assert euclid.attraction.item() == pytest.approx((0.06 + 0.16 + 0.26) / 3)


def test_paper_radius_never_activates_repulsion():
    # With r = 1e-5 fixed and alpha = 0.1, r^2 - D - alpha < 0 for every D >= 0 (spec 2.6): Eq. 2 is inert.
    torch.manual_seed(0)
    features, bank = torch.randn(500, 4) * 1e-3, torch.randn(50, 4) * 1e-3
    terms = coupled_hypersphere_loss(features, bank, torch.tensor(1e-5), alpha=0.1)
    assert terms.repulsion.item() == 0 and terms.attraction.item() > 0


def test_loss_gradients_for_features_and_learned_radius():
    origin = torch.zeros(1, len(SQ), dtype=torch.float64, requires_grad=True)
    r = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    bank = _bank_at(SQ)
    coupled_hypersphere_loss(origin, bank, r, alpha=0.1).total.backward()
    # Only the third attractor is active: d/dx |x - c|^2 / 3 = 2 (x - c) / 3, d/dr (-r^2) / 3 = -2 r / 3.
    torch.testing.assert_close(origin.grad[0], -2 * bank[2] / 3)
    assert r.grad.item() == pytest.approx(-2 * 0.2 / 3)


# --- memory bank (Algorithm 1 and the public code's variant) --------------------------------------------------------


def _literal_greedy(dist):
    """Algorithm 1's loop as written: Y = patches not yet taken; item j takes argmin over Y."""
    taken, match = set(), []
    for row in dist:
        free = [t for t in range(len(row)) if t not in taken]
        best = min(free, key=lambda t: row[t])
        taken.add(best)
        match.append(best)
    return match


@pytest.mark.parametrize("shape", [(40, 40), (12, 50)])
def test_greedy_unique_matching_matches_the_literal_loop(shape):
    torch.manual_seed(0)
    dist = pairwise_squared_distances(torch.randn(shape[0], 3), torch.randn(shape[1], 3))
    match = greedy_unique_matching(dist)
    assert match.tolist() == _literal_greedy(dist.tolist())
    assert len(set(match.tolist())) == shape[0]


def test_kmeans_ema_bank_follows_algorithm_1():
    torch.manual_seed(0)
    images = [torch.randn(16, 5) for _ in range(3)]
    builder = KMeansEMABank(16, beta=0.0, kmeans_max_iter=50, generator=torch.Generator().manual_seed(0))
    builder.update(images[0])
    torch.testing.assert_close(builder.bank, images[0])  # gamma_c = 1: K-means of T points into T centres
    expected = images[0].clone()
    for i, image in enumerate(images[1:], start=1):
        match = _literal_greedy(pairwise_squared_distances(expected, image).tolist())
        expected = (1 - 1 / (i + 1)) * expected + image[match] / (i + 1)  # beta_i = 1 / (i + 1)
        builder.update(image)
    torch.testing.assert_close(builder.finish(), expected)

    fixed = KMeansEMABank(16, beta=0.25, kmeans_max_iter=50, generator=torch.Generator().manual_seed(0))
    fixed.update(images[0])
    fixed.update(images[1])
    match = greedy_unique_matching(pairwise_squared_distances(images[0], images[1]))
    torch.testing.assert_close(fixed.finish(), 0.75 * images[0] + 0.25 * images[1][match])


def test_compressed_bank_starts_from_kmeans_of_the_first_image():
    torch.manual_seed(0)
    first = torch.randn(64, 6)
    builder = KMeansEMABank(16, 0.0, 100, torch.Generator().manual_seed(3))
    builder.update(first)
    expected = kmeans(first, 16, 100, generator=torch.Generator().manual_seed(3)).centers
    torch.testing.assert_close(builder.finish(), expected)


def test_positional_mean_bank_is_the_per_location_mean():
    images = [torch.randn(16, 4) for _ in range(5)]
    builder = PositionalMeanBank(16, 10, torch.Generator().manual_seed(0))
    for image in images:
        builder.update(image)
    torch.testing.assert_close(builder.finish(), torch.stack(images).mean(0))
    compressed = PositionalMeanBank(4, 10, torch.Generator().manual_seed(0))
    for image in images:
        compressed.update(image)
    assert compressed.finish().shape == (4, 4)


@pytest.mark.parametrize("memory_init", ["kmeans_ema", "positional_mean"])
def test_bank_size_does_not_depend_on_the_number_of_images(tiny_dataset, memory_init):
    model = _small_model(gamma_c=4, memory_init=memory_init, kmeans_max_iter=20)
    train = load_dataset(tiny_dataset).train
    sizes = {n: build_memory_bank(model, train[:n], FitContext(quiet=True))[0].shape for n in (2, 5, 12)}
    # 64 px at stride 4: a 16 x 16 grid, 256 // gamma_c = 64 items of D' = 448 // 8 = 56 values, for every n.
    assert set(sizes.values()) == {torch.Size([64, 56])}


def test_bank_pass_caches_the_patch_features_of_every_image(tiny_dataset):
    model = _small_model(gamma_c=4, kmeans_max_iter=20)
    train = load_dataset(tiny_dataset).train[:5]
    ctx = FitContext(quiet=True)
    bank, cache = build_memory_bank(model, train, ctx, max_cache_bytes=1 << 30)
    images = torch.cat([batch["image"] for batch in ctx.loader(train, model.config, batch_size=5)])
    assert cache.dtype == torch.float16 and cache.shape == (5, 448, 16, 16)
    torch.testing.assert_close(cache.float(), model.patch_features(images), rtol=1e-3, atol=1e-3)
    assert build_memory_bank(model, train, ctx, max_cache_bytes=100)[1] is None  # too large: nothing cached
    torch.testing.assert_close(build_memory_bank(model, train, ctx)[0], bank)


def test_a_training_set_too_large_for_the_cache_trains_as_a_cached_one(tiny_dataset, monkeypatch):
    # Streamed epochs draw the same order from the same generator and round p to float16 as the cache does; before,
    # they were shuffled by a fresh loader (the same order every epoch) in float32, and gave another model.
    import importlib

    fit_module = importlib.import_module("flawscope.models.cfa.fit")  # the package's `fit` is the function
    train = load_dataset(tiny_dataset).train[:6]
    weights = []
    for limit in (1 << 30, 0):
        monkeypatch.setattr(fit_module, "MAX_CACHE_BYTES", limit)
        torch.manual_seed(0)
        model = _small_model(gamma_c=4, kmeans_max_iter=20, num_epochs=2, batch_size=2)
        report = fit(model, train, FitContext(quiet=True))
        assert report["cached_patch_features"] is (limit > 0)
        weights.append(model.descriptor.state_dict())
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


# --- scoring (Eqs. 4-5, spec 2.7) -----------------------------------------------------------------------------------


def test_soft_boundary_score_on_hand_values():
    d = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 4.0]])
    direct = [
        math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3)) * 1.0,
        0.5 * math.exp(-0.5) / (2 * math.exp(-0.5) + math.exp(-4)),
    ]
    torch.testing.assert_close(soft_boundary_score(d), torch.tensor(direct))


@pytest.mark.parametrize(("score_mode", "sigma"), [("softmin", 4.0), ("nearest", 4.0), ("nearest", 0.0)])
def test_scoring_path_matches_a_direct_computation(score_mode, sigma):
    model = _small_model(score_mode=score_mode, smoothing_sigma=sigma)
    torch.manual_seed(1)
    model.memory_bank = torch.randn(300, model.descriptor_dim)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        anomaly_map, score = model.raw_scores(images)
        phi = model.descriptor(model.backbone(images))  # (2, 56, 16, 16)
    queries = phi.permute(0, 2, 3, 1).reshape(-1, 56).double()
    dist = torch.cdist(queries, model.memory_bank.double()).sort(dim=1).values[:, :3]  # Euclidean, K = 3
    s = dist[:, 0]
    grid = torch.exp(-s) / torch.exp(-dist).sum(1) * s if score_mode == "softmin" else s  # Eq. 5 / Eq. 4
    grid = grid.reshape(2, 1, 16, 16).float()
    up = F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)
    expected = np.stack([scipy.ndimage.gaussian_filter(m[0].double().numpy(), sigma=sigma) for m in up])
    assert anomaly_map.shape == (2, 1, 64, 64) and score.shape == (2,)
    np.testing.assert_allclose(anomaly_map[:, 0].numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(score.numpy(), expected.reshape(2, -1).max(1), rtol=1e-4, atol=1e-5)  # max of map


# --- k-means (flawscope.layers.kmeans) ------------------------------------------------------------------------------


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = (centres[:, None] + 0.1 * torch.randn(4, 30, 2)).reshape(-1, 2)
    result = kmeans(points, 4, generator=torch.Generator().manual_seed(0))
    found = result.centers[torch.cdist(centres, result.centers).argmin(1)]
    torch.testing.assert_close(found, points.reshape(4, 30, 2).mean(1))
    assert sorted(torch.bincount(result.labels).tolist()) == [30, 30, 30, 30]
    again = kmeans(points, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.centers, again.centers)


def test_kmeans_inertia_is_close_to_scikit_learn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(c, 1.0, (60, 8)) for c in rng.normal(0, 4, (6, 8))]).astype(np.float32)
    ours = kmeans(torch.from_numpy(points), 12, generator=torch.Generator().manual_seed(0))
    reference = sklearn_cluster.KMeans(12, n_init=1, random_state=0).fit(points)
    assert ours.inertia <= 1.1 * reference.inertia_
    assert ours.inertia == pytest.approx(float(((points - ours.centers.numpy()[ours.labels.numpy()]) ** 2).sum()))


def test_kmeans_edge_cases():
    points = torch.randn(5, 3)
    assert torch.equal(kmeans(points, 5).centers, points)  # k = N: the points are the optimum
    with pytest.raises(ValueError, match=r"num_clusters must be in \[1, 5\]"):
        kmeans(points, 6)
    duplicates = torch.cat([torch.zeros(10, 2), torch.ones(3, 2)])  # only two distinct points for three clusters
    result = kmeans(duplicates, 3, generator=torch.Generator().manual_seed(0))
    assert result.centers.shape == (3, 2) and result.inertia == 0.0


# --- training ------------------------------------------------------------------------------------------------------


def _model_with_bank(**changes) -> CFA:
    model = _small_model(**changes)
    with torch.no_grad():
        model.memory_bank = model.describe(torch.rand(1, 3, 64, 64)).flatten(2)[0].T.contiguous()  # (256, 56)
    return model


@pytest.mark.parametrize("learn_radius", [False, True])
def test_optimizer_and_train_step_update_descriptor_only(learn_radius):
    model = _model_with_bank(learn_radius=learn_radius)
    radius = torch.nn.Parameter(torch.tensor(1e-5)) if learn_radius else torch.tensor(1e-5)
    optimizer = make_optimizer(model, radius)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["amsgrad"]) == (1e-3, 5e-4, True)
    expected = {id(p) for p in model.descriptor.parameters()} | ({id(radius)} if learn_radius else set())
    assert {id(p) for p in group["params"]} == expected

    before = copy.deepcopy(model)
    images = torch.rand(2, 3, 64, 64)
    terms = train_step(model, model.patch_features(images), radius, optimizer)
    assert terms.repulsion.item() == 0 and terms.attraction.item() > 0
    for name, param in model.named_parameters():
        changed = not torch.equal(param, dict(before.named_parameters())[name])
        assert changed == name.startswith("descriptor."), name
    assert torch.equal(model.memory_bank, before.memory_bank)  # the bank is frozen after initialisation
    assert (float(radius.detach()) > 1e-5) == learn_radius  # L_att pushes a learned r up


def test_short_fit_logs_each_epoch_and_is_seeded(tiny_dataset):
    def run():
        model = _small_model(num_epochs=2, gamma_c=4, kmeans_max_iter=20, learn_radius=True)
        ctx = FitContext(quiet=True, seed=0)
        return model, ctx, fit(model, load_dataset(tiny_dataset).train, ctx)

    model, ctx, report = run()
    assert [entry["epoch"] for entry in ctx.log] == [1, 2]
    for entry in ctx.log:
        assert {"loss", "attraction", "repulsion", "repulsion_active", "radius"} <= set(entry)
        assert math.isfinite(entry["loss"]) and entry["loss"] > 0
    assert bool(model.fitted) and not model.training
    assert report["memory_bank_size"] == 64 and report["descriptor_dim"] == 56 and report["num_images"] == 12
    assert report["radius"] == ctx.log[-1]["radius"] > 1e-5
    again, again_ctx, _ = run()
    assert again_ctx.log == ctx.log
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# --- configuration errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"memory_init": "mean"}, r"'memory_init'.*one of 'kmeans_ema', 'positional_mean'; got 'mean'"),
        ({"gamma_c": 0}, r"'gamma_c'.*got 0"),
        ({"image_size": 32, "gamma_c": 16}, r"memory bank would hold 4 items.*Lower gamma_c"),
        ({"score_mode": "max"}, r"'score_mode'.*one of 'softmin', 'nearest'"),
        ({"pool_size": 2}, r"pool_size must be one odd kernel.*got \(2,\)"),
        ({"pool_size": "3,1"}, r"pool_size must be one odd kernel.*one per stage \(3 strides\)"),
        ({"backbone_blocks": "2,1"}, r"backbone_blocks must be one count.*one per stage \(3 strides\)"),
        ({"backbone_blocks": 0}, r"'backbone_blocks'.*got \(0,\)"),
        ({"descriptor_expansion": 0}, r"'descriptor_expansion'.*got 0"),
        ({"radius_init": 1.0}, r"Unknown option\(s\) 'radius_init'.*Valid options:.*radius"),
    ],
)
def test_config_errors_name_the_option_and_valid_values(options, match):
    with pytest.raises(ConfigError, match=match):
        CFAConfig.from_dict({**SMALL, **options})


def test_gamma_d_larger_than_the_feature_length_is_rejected():
    with pytest.raises(ConfigError, match=r"gamma_d=1000 leaves no descriptor channel.*D = 448"):
        _small_model(gamma_d=1000)


def test_fit_without_images_says_so():
    with pytest.raises(DataError, match=r"at least one good training image"):
        fit(_small_model(), [], FitContext(quiet=True))


def test_position_whitening_centres_every_position_of_the_training_features_and_is_saved(tiny_dataset, tmp_path):
    from flawscope.model_io import load_model, save_model

    model = _small_model(num_epochs=1, gamma_c=4, kmeans_max_iter=20, feature_norm="position")
    train = load_dataset(tiny_dataset).train
    fit(model, train, FitContext(quiet=True, seed=0))
    assert model.whitening.mean.shape == (256, 448) and model.whitening.matrix.shape == (256, 448, 448)
    images = torch.stack([ImageDataset(train, 64, 0)[i]["image"] for i in range(len(train))])
    with torch.no_grad():
        raw = model.descriptor.patch_features(model.backbone(images)).flatten(2).transpose(1, 2)  # (12, 256, 448)
        whitened = model.patch_features(images).flatten(2).transpose(1, 2)
    torch.testing.assert_close(raw.double().mean(0), model.whitening.mean.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whitened.mean(0), torch.zeros(256, 448), atol=1e-3, rtol=0)
    # 12 images in 448 dimensions: the eps I term bounds each whitened length, |z| <= |x - mu| / sqrt(eps).
    bound = (raw - model.whitening.mean).norm(dim=-1) / 0.01**0.5
    assert bool((whitened.norm(dim=-1) <= bound * (1 + 1e-4) + 1e-4).all())
    loaded = load_model(save_model(model, tmp_path / "run"))
    with torch.no_grad():
        for a, b in zip(model.raw_scores(images[:2]), loaded.raw_scores(images[:2]), strict=True):
            torch.testing.assert_close(a, b)
