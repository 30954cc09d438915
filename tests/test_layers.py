import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from flawscope.layers import GaussianBlur2d, LocalFeatureAggregator, gaussian_kernel1d


@pytest.mark.parametrize("sigma", [0.5, 1.0, 4.0])
def test_blur_matches_scipy_gaussian_filter(sigma):
    x = torch.rand(2, 1, 37, 41, dtype=torch.float64)
    expected = np.stack([scipy.ndimage.gaussian_filter(m[0].numpy(), sigma) for m in x])
    got = GaussianBlur2d(sigma)(x)[:, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_blur_pads_repeatedly_when_kernel_is_larger_than_the_map():
    x = torch.rand(1, 1, 7, 5, dtype=torch.float64)
    expected = scipy.ndimage.gaussian_filter(x[0, 0].numpy(), 4.0)
    np.testing.assert_allclose(GaussianBlur2d(4.0)(x)[0, 0].numpy(), expected, atol=1e-10)


def test_blur_sigma_zero_is_identity_and_kernel_is_normalised():
    x = torch.rand(1, 1, 8, 8)
    assert torch.equal(GaussianBlur2d(0)(x), x)
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 33 and kernel.sum().item() == pytest.approx(1.0)


def _reference_patchcore_embedding(features, patch_size, pretrain_dim, target_dim):
    """The public PatchCore/SimpleNet code's steps, written out literally (PatchMaker + MeanMapper + Aggregator)."""
    ref_h, ref_w = features[0].shape[-2:]
    per_layer = []
    for f in features:
        b, c, h, w = f.shape
        unfolded = torch.nn.Unfold(patch_size, stride=1, padding=patch_size // 2)(f)
        patches = unfolded.reshape(b, c, patch_size, patch_size, -1).permute(0, 4, 1, 2, 3)  # (B, hw, C, p, p)
        if (h, w) != (ref_h, ref_w):
            p = patches.reshape(b, h, w, c, patch_size, patch_size).permute(0, 3, 4, 5, 1, 2)
            p = p.reshape(-1, h, w)
            p = F.interpolate(p.unsqueeze(1), size=(ref_h, ref_w), mode="bilinear", align_corners=False).squeeze(1)
            p = p.reshape(b, c, patch_size, patch_size, ref_h, ref_w).permute(0, 4, 5, 1, 2, 3)
            patches = p.reshape(b, ref_h * ref_w, c, patch_size, patch_size)
        rows = patches.reshape(-1, c * patch_size * patch_size)
        per_layer.append(F.adaptive_avg_pool1d(rows.unsqueeze(1), pretrain_dim).squeeze(1))
    stacked = torch.stack(per_layer, dim=1).reshape(per_layer[0].shape[0], 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_dim).reshape(-1, target_dim)


def test_local_features_match_the_public_code_recipe():
    torch.manual_seed(0)
    features = [torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)]
    got = LocalFeatureAggregator([8, 16], 3, 24, 20)(features)  # (B, D, h, w)
    expected = _reference_patchcore_embedding(features, 3, 24, 20)  # (B*h*w, D)
    assert got.shape == (2, 20, 6, 6)
    torch.testing.assert_close(got.permute(0, 2, 3, 1).reshape(-1, 20), expected)


def test_local_features_of_a_constant_map_are_the_neighbourhood_mean():
    # With zero padding, an interior location of a constant map averages to the constant; a corner sees 4 of 9.
    features = [torch.ones(1, 1, 5, 5)]
    got = LocalFeatureAggregator([1], 3, 3, 3)(features)  # pretrain_dim 3 = one value per kernel row
    assert torch.allclose(got[0, :, 2, 2], torch.ones(3))
    assert torch.allclose(got[0, :, 0, 0], torch.tensor([0.0, 2 / 3, 2 / 3]))


def test_image_context_appends_the_weighted_image_mean_to_every_location():
    torch.manual_seed(0)
    features = [torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)]
    plain = LocalFeatureAggregator([8, 16], 3, 24, 20)(features)  # (2, 20, 6, 6)
    aggregator = LocalFeatureAggregator([8, 16], 3, 24, 20, context_weight=3.0)
    got = aggregator(features)
    assert aggregator.out_dim == 40 and got.shape == (2, 40, 6, 6)
    torch.testing.assert_close(got[:, :20], plain)
    for image in range(2):  # each image's own mean, the same at every location
        expected = 3.0 * plain[image].reshape(20, -1).mean(dim=1)
        torch.testing.assert_close(got[image, 20:], expected[:, None, None].expand(20, 6, 6))
    with pytest.raises(ValueError, match="context_weight must be >= 0"):
        LocalFeatureAggregator([8], 3, 4, 4, context_weight=-1.0)


def test_position_whitening_without_shrinkage_on_too_few_images_says_what_to_do():
    from flawscope.errors import ConfigError
    from flawscope.layers import PositionWhitening

    whitening = PositionWhitening(8, shrinkage=0.0)
    features = torch.randn(3, 2, 8)  # 3 images, 2 positions, 8 channels: rank-deficient covariances
    with pytest.raises(ConfigError, match="singular.*3 training images for 8 feature channels.*position_shrinkage"):
        whitening.fit([features])
    assert not whitening.fitted
    with pytest.raises(ConfigError, match="at least 2 training images"):
        whitening.fit([features[:1]])
    for chunks in ([features[..., :7]], [features[0]], [features, features[:, :1]]):  # D 7, 2-D, P 2 then 1
        with pytest.raises(ConfigError, match=r"\(images, positions, 8\) feature chunks.*got"):
            whitening.fit(chunks)
    whitening = PositionWhitening(8, shrinkage=0.01)
    whitening.fit([features])
    assert whitening.fitted and whitening(features).shape == (3, 2, 8)


@pytest.mark.parametrize("values_per_step", [1, 2 * 6 * 6, 2**24])  # one position, two, all at a time
def test_position_whitening_equals_numpy_per_position_whatever_the_chunking(monkeypatch, values_per_step):
    from flawscope.layers import PositionWhitening, whitening

    monkeypatch.setattr(whitening, "VALUES_PER_STEP", values_per_step)
    generator = torch.Generator().manual_seed(0)
    # 23 images, 5 positions, 6 channels, each position with its own mean and correlated channels.
    mixing = torch.randn(5, 6, 6, generator=generator)
    features = (
        torch.einsum("npd,ped->npe", torch.randn(23, 5, 6, generator=generator), mixing) + torch.arange(5.0)[:, None]
    )
    layer = PositionWhitening(6, shrinkage=1e-6)
    layer.fit(features.split(4))  # streamed in uneven chunks: 4, 4, 4, 4, 4, 3
    x = features.double().numpy()
    for p in range(5):
        mean = x[:, p].mean(0)
        cov = np.cov(x[:, p], rowvar=False) + 1e-6 * np.eye(6)
        expected = np.linalg.inv(np.linalg.cholesky(cov))
        np.testing.assert_allclose(layer.mean[p].numpy(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.matrix[p].numpy(), expected, rtol=1e-4, atol=1e-4)
    whitened = layer(features).double()  # training features: zero mean, identity covariance
    np.testing.assert_allclose(whitened.mean(0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(whitened[:, 2].numpy(), rowvar=False), np.eye(6), atol=1e-3)


def test_position_whitening_keeps_its_buffers_on_the_modules_device():
    # PRN accumulates the statistics from CPU chunks while the model sits on the GPU; "meta" stands in for it.
    from flawscope.layers import PositionWhitening

    layer = PositionWhitening(4, shrinkage=0.01).to("meta")
    layer.fit([torch.randn(6, 3, 4)])
    assert layer.mean.device.type == layer.matrix.device.type == "meta"
    assert layer.mean.dtype == torch.float32 and layer.mean.shape == (3, 4)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 28, 56, 224, 1000])
def test_ranges_built_from_a_tensor_match_torch(n):
    from flawscope.layers import arange_like, linspace_like

    like = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(arange_like(like, n, torch.long), torch.arange(n))
    assert arange_like(like, n).dtype == torch.float64
    got = linspace_like(torch.zeros(1), -1.0, 1.0, n)
    torch.testing.assert_close(got, torch.linspace(-1.0, 1.0, n), rtol=0, atol=6e-8)  # half an ulp of 1
    assert got[0] == -1.0 and got[-1] == (1.0 if n > 1 else -1.0)
