"""PatchCore: distances, the paper's score reweighting (Eq. 7), the patch map, feature collection and the bank."""

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from flawscope.data import load_dataset
from flawscope.errors import ConfigError
from flawscope.fitting import FitContext
from flawscope.layers import pairwise_squared_distances as squared_distances
from flawscope.models.patchcore import PatchCore, PatchCoreConfig, fit
from flawscope.models.patchcore.fit import collect_features
from flawscope.sampling import nearest_in_bank

# A hand-made 2-D memory bank without distance ties around the points used below.
BANK = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [5.0, -1.0]])
# Each row's 3 nearest bank rows, itself first, worked out by hand.
BANK_NEIGHBORS_3 = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1], [3, 2, 1], [4, 1, 3]])
# Two images, 2 x 2 grids of 2-D local features (B, h, w, D).
QUERIES = torch.tensor(
    [
        [[[0.1, 0.1], [1.0, 0.2]], [[2.5, 2.0], [0.0, 1.9]]],  # worst patch (2.5, 2) -> m* = (3, 3)
        [[[4.6, -0.5], [0.0, 0.0]], [[1.0, 1.0], [0.5, 0.5]]],  # worst patch (1, 1) -> m* = (1, 0)
    ]
)
SMALL = {"backbone": "resnet18", "image_size": 64, "resize_size": 0, "pretrain_embed_dim": 64, "target_embed_dim": 64}


def _controlled_model(monkeypatch, features, bank, neighbors, **changes) -> PatchCore:
    """A PatchCore whose local features are ``features`` (B, D, h, w) and whose bank is set by hand."""
    dim = bank.shape[1]
    cfg = PatchCoreConfig.from_dict({**SMALL, "target_embed_dim": dim, "pretrain_embed_dim": dim, **changes})
    model = PatchCore(cfg, pretrained=False).eval()
    model.memory_bank = bank.clone()
    model.bank_neighbors = neighbors.clone()
    monkeypatch.setattr(model, "local_features", lambda images: features)
    return model


def _eq7(query, bank, neighbors):
    """The paper's Eq. 7 written out: s = (1 - exp(|q - m*|) / sum_{m in N_b(m*)} exp(|q - m|)) * |q - m*|."""
    dist = [math.dist(query, m) for m in bank.tolist()]
    star = min(range(len(dist)), key=dist.__getitem__)
    support = [math.dist(query, bank[j].tolist()) for j in neighbors[star].tolist()]
    return (1 - math.exp(dist[star]) / sum(math.exp(d) for d in support)) * dist[star]


def test_squared_distances_equal_cdist_squared():
    torch.manual_seed(0)
    queries, bank = torch.randn(7, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    torch.testing.assert_close(squared_distances(queries, bank), torch.cdist(queries, bank) ** 2)
    same = squared_distances(bank, bank)
    assert (same >= 0).all()
    torch.testing.assert_close(same.diagonal(), torch.zeros(11, dtype=torch.float64))
    # float16 features (a --half export) are computed in float32: in float16 |q|^2 = 4 * 150^2 overflows, so equal
    # points would give inf - inf = NaN, and a distance of 600 would square to inf.
    point = torch.full((1, 4), 150.0).half()
    assert squared_distances(point, point).dtype == torch.float32 and squared_distances(point, point).item() == 0
    assert squared_distances(-point, point).item() == 4 * 300.0**2


def test_hand_made_bank_neighbours_are_right():
    order = torch.cdist(BANK, BANK).argsort(dim=1)[:, :3]
    assert torch.equal(order, BANK_NEIGHBORS_3)
    assert torch.equal(nearest_in_bank(BANK, 3), BANK_NEIGHBORS_3)


def test_reweighted_score_matches_eq7(monkeypatch):
    features = QUERIES.permute(0, 3, 1, 2)  # (B, D, h, w)
    model = _controlled_model(monkeypatch, features, BANK, BANK_NEIGHBORS_3, num_neighbors=3)
    score = model(torch.zeros(2, 3, 2, 2)).pred_score
    worst = [(2.5, 2.0), (1.0, 1.0)]
    expected = [_eq7(q, BANK, BANK_NEIGHBORS_3) for q in worst]
    # Image 0 by hand: d* = sqrt(1.25) to (3, 3); its neighbours (0, 2) and (1, 0) are both 2.5 away.
    star = math.sqrt(1.25)
    assert expected[0] == pytest.approx((1 - math.exp(star) / (math.exp(star) + 2 * math.exp(2.5))) * star)
    torch.testing.assert_close(score, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert (score < torch.tensor([star, 1.0])).all()  # reweighting only ever lowers the score


def test_single_neighbour_gives_the_plain_max_distance(monkeypatch):
    features = QUERIES.permute(0, 3, 1, 2)
    model = _controlled_model(monkeypatch, features, BANK, torch.arange(5)[:, None], num_neighbors=1)
    score = model(torch.zeros(2, 3, 2, 2)).pred_score
    expected = torch.cdist(QUERIES.reshape(2, 4, 2), BANK[None].expand(2, -1, -1)).amin(2).amax(1)
    torch.testing.assert_close(score, expected)
    torch.testing.assert_close(score, torch.tensor([math.sqrt(1.25), 1.0]))


def test_squared_distance_is_the_reference_codes_score(monkeypatch):
    features = QUERIES.permute(0, 3, 1, 2)
    model = _controlled_model(
        monkeypatch, features, BANK, torch.arange(5)[:, None], num_neighbors=1, smoothing_sigma=0, distance="squared"
    )
    output = model(torch.zeros(2, 3, 2, 2))
    grid = torch.cdist(QUERIES.reshape(2, 4, 2), BANK[None].expand(2, -1, -1)).amin(2)
    torch.testing.assert_close(output.anomaly_map, (grid**2).reshape(2, 1, 2, 2))
    torch.testing.assert_close(output.pred_score, torch.tensor([1.25, 1.0]))


def test_squared_distance_without_reweighting_only():
    with pytest.raises(ConfigError, match="add num_neighbors=1"):
        PatchCoreConfig(distance="squared")


def test_patch_map_is_the_brute_force_nearest_distance(monkeypatch):
    torch.manual_seed(0)
    features = torch.randn(2, 5, 3, 4)  # (B, D, h, w)
    bank = torch.randn(7, 5)
    grid = torch.cdist(features.permute(0, 2, 3, 1).reshape(2, 12, 5), bank[None].expand(2, -1, -1)).amin(2)
    grid = grid.reshape(2, 1, 3, 4)
    neighbors = nearest_in_bank(bank, 1)

    # No smoothing and no upsampling: the map is the grid itself.
    raw = _controlled_model(monkeypatch, features, bank, neighbors, num_neighbors=1, smoothing_sigma=0)
    torch.testing.assert_close(raw(torch.zeros(2, 3, 3, 4)).anomaly_map, grid)

    # Default path: bilinear upsampling (align_corners=False), then scipy's Gaussian with sigma 4.
    smooth = _controlled_model(monkeypatch, features, bank, neighbors, num_neighbors=1)
    got = smooth(torch.zeros(2, 3, 24, 32)).anomaly_map
    upsampled = F.interpolate(grid, size=(24, 32), mode="bilinear", align_corners=False)
    expected = np.stack([scipy.ndimage.gaussian_filter(m.double().numpy(), sigma=4) for m in upsampled])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


# --- fitting on the tiny data set (random ResNet-18, 64 px: 12 images x 8 x 8 locations) ---------------------------


@pytest.fixture(scope="module")
def train_samples(tiny_dataset):
    return load_dataset(tiny_dataset).train


def _model(**changes) -> PatchCore:
    torch.manual_seed(0)
    return PatchCore(PatchCoreConfig.from_dict({**SMALL, **changes}), pretrained=False).eval()


@pytest.fixture(scope="module")
def all_features(train_samples):
    return collect_features(_model(), train_samples, FitContext(quiet=True))


def test_collect_features_keeps_every_location_under_the_cap(all_features):
    assert all_features.shape == (12 * 64, 64) and all_features.dtype == torch.float16


def test_collect_features_subsamples_each_image_with_the_seed(train_samples, all_features):
    cap = 100
    ctx = FitContext(quiet=True, seed=5)
    got = collect_features(_model(max_train_features=cap), train_samples, ctx)
    per_image = cap // 12  # 8 of the 64 locations of each image
    assert got.shape == (12 * per_image, 64)
    # The same rows, drawn image by image from the fit's generator (seed + 1).
    generator = torch.Generator().manual_seed(ctx.seed + 1)
    full = all_features.reshape(12, 64, 64)
    expected = torch.cat([full[i, torch.randperm(64, generator=generator)[:per_image]] for i in range(12)])
    assert torch.equal(got, expected)
    again = collect_features(_model(max_train_features=cap), train_samples, FitContext(quiet=True, seed=5))
    assert torch.equal(got, again)
    other = collect_features(_model(max_train_features=cap), train_samples, FitContext(quiet=True, seed=6))
    assert not torch.equal(got, other)


def test_collect_features_never_exceeds_the_cap(train_samples):
    got = collect_features(_model(max_train_features=100), train_samples, FitContext(quiet=True))
    assert got.shape[0] <= 100


def test_fit_with_full_coreset_keeps_every_feature(train_samples, all_features):
    model = _model(coreset_ratio=1.0)
    report = fit(model, train_samples, FitContext(quiet=True))
    assert report["num_features"] == report["memory_bank_size"] == 768
    assert bool(model.fitted)
    assert model.memory_bank.dtype == torch.float32
    assert torch.equal(model.memory_bank, all_features.float())  # same rows, same order
    neighbors = model.bank_neighbors
    assert neighbors.shape == (768, 9)
    assert torch.equal(neighbors[:, 0], torch.arange(768))
    # The neighbours are the 9 nearest rows (compared by distance, which is robust to ties).
    dist = torch.cdist(model.memory_bank.double(), model.memory_bank.double())
    torch.testing.assert_close(dist.gather(1, neighbors), dist.sort(dim=1).values[:, :9], rtol=1e-4, atol=1e-4)


def test_one_feature_bank_scores_by_distance(train_samples):
    model = _model(coreset_ratio=1e-4)  # round(1e-4 * 768) = 0 -> a bank of one feature
    fit(model, train_samples, FitContext(quiet=True))
    assert model.memory_bank.shape == (1, 64)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        score = model(images).pred_score
        queries = model.local_features(images).permute(0, 2, 3, 1).reshape(2, -1, 64)
    expected = torch.cdist(queries, model.memory_bank[None].expand(2, -1, -1)).amin(2).amax(1)
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-4)


def test_image_context_bank_holds_local_and_image_features(train_samples, all_features):
    model = _model(coreset_ratio=1.0, context_weight=2.0)
    fit(model, train_samples, FitContext(quiet=True))
    bank = model.memory_bank  # (768, 128): 12 images x 64 locations, each [local, 2 x its image's mean]
    assert bank.shape == (768, 128)
    torch.testing.assert_close(bank[:, :64], all_features.float())
    image_means = all_features.float().reshape(12, 64, 64).mean(dim=1)  # (12, 64)
    torch.testing.assert_close(bank[:, 64:], 2.0 * image_means.repeat_interleave(64, dim=0), rtol=2e-3, atol=2e-3)
