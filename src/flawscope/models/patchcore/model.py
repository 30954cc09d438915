"""PatchCore's inference graph: local features, nearest neighbour in a memory bank, the paper's reweighting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ...backbones import local_feature_extractor
from ...config import ModelConfig, context_weight_option, option
from ...errors import ConfigError
from ...layers import GaussianBlur2d, pairwise_squared_distances
from ..base import AnomalyModel


@dataclass(frozen=True)
class PatchCoreConfig(ModelConfig):
    """PatchCore hyperparameters; defaults follow the paper (WideResNet-50, layer2+3, 10 % coreset)."""

    strides: tuple[int, ...] = option(
        (8, 16), "backbone stages used, by stride (layer2 and layer3 of a ResNet)", low=4, high=32
    )
    patch_size: int = option(3, "neighbourhood aggregated at each location (odd: centred)", choices=(1, 3, 5, 7, 9))
    context_weight: float = context_weight_option()
    pretrain_embed_dim: int = option(1024, "per-stage feature length after pooling", low=1, high=16384)
    target_embed_dim: int = option(1024, "memory bank feature length", low=1, high=16384)
    coreset_ratio: float = option(
        0.1, "fraction of training features kept by the greedy coreset", low=0, high=1, low_open=True
    )
    projection_dim: int = option(
        128, "random projection used to speed up the coreset search; 0 = none", low=0, high=16384
    )
    num_neighbors: int = option(9, "b, the bank neighbourhood of the paper's score reweighting; 1 = off", low=1)
    distance: str = option(
        "euclidean",
        "patch score: euclidean distance to the nearest bank feature (paper) or squared (the reference code's FAISS "
        "L2, which has no reweighting: needs num_neighbors=1); the map is smoothed after this, so the two maps "
        "differ by more than a monotone change",
        choices=("euclidean", "squared"),
    )
    max_train_features: int = option(
        2_000_000, "features collected before the coreset, at most (or one per image if larger)", low=1
    )
    smoothing_sigma: float = option(4.0, "Gaussian smoothing of the upsampled map, pixels", low=0)
    batch_size: int = option(8, "images per batch during feature extraction", low=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distance == "squared" and self.num_neighbors > 1:
            raise ConfigError(
                "distance=squared is the reference code's score, which does not reweight (Eq. 7 is on Euclidean "
                f"distances); add num_neighbors=1 (got {self.num_neighbors})."
            )


class PatchCore(AnomalyModel):
    """Scores each location by its distance to the nearest memory-bank feature.

    Buffers:
        memory_bank: (M, D) coreset of training features (D = target_embed_dim, twice that with context_weight).
        bank_neighbors: (M, b) indices of each bank feature's b nearest bank features (itself first),
            precomputed at fit time for the reweighting of Eq. 7.
    """

    method = "patchcore"
    config_class = PatchCoreConfig

    def __init__(self, config: PatchCoreConfig, pretrained: bool = True, weights_path: str | Path | None = None):
        super().__init__(config)
        self.backbone, self.aggregator = local_feature_extractor(
            config.backbone,
            config.strides,
            config.patch_size,
            config.pretrain_embed_dim,
            config.target_embed_dim,
            config.context_weight,
            pretrained=pretrained,
            weights_path=weights_path,
        )
        self.blur = GaussianBlur2d(config.smoothing_sigma)
        self.register_buffer("memory_bank", torch.zeros(0, self.aggregator.out_dim))
        self.register_buffer("bank_neighbors", torch.zeros(0, config.num_neighbors, dtype=torch.long))

    def local_features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> (B, D, h, w) aggregated local features."""
        with torch.no_grad():
            return self.aggregator(self.backbone(images))

    def raw_scores(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.local_features(images)  # (B, D, h, w)
        batch, dim, height, width = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(-1, dim)  # (B*h*w, D)
        nearest_sq, nearest_idx = pairwise_squared_distances(queries, self.memory_bank).min(dim=1)  # float32
        patch_scores = nearest_sq if self.config.distance == "squared" else nearest_sq.sqrt()
        patch_scores = patch_scores.to(features.dtype).reshape(batch, height * width)  # (B, h*w)

        max_score, max_pos = patch_scores.max(dim=1)  # (B,)
        if self.bank_neighbors.shape[1] == 1:  # b = 1 (or a one-row bank): nothing to reweight against
            score = max_score
        else:
            score = self._reweight(queries, nearest_idx, max_score, max_pos)
        patch_map = patch_scores.reshape(batch, 1, height, width)
        anomaly_map = F.interpolate(patch_map, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.blur(anomaly_map), score

    def _reweight(self, queries: Tensor, nearest_idx: Tensor, max_score: Tensor, max_pos: Tensor) -> Tensor:
        """Eq. 7: down-weights the image score when its worst patch's neighbour sits in a dense bank region."""
        batch = max_score.shape[0]
        queries = queries.reshape(batch, -1, queries.shape[-1])  # (B, h*w, D)
        nearest_idx = nearest_idx.reshape(batch, -1)  # (B, h*w)
        query = queries.gather(1, max_pos[:, None, None].expand(-1, 1, queries.shape[-1]))[:, 0]  # (B, D)
        anchor = nearest_idx.gather(1, max_pos[:, None])[:, 0]  # (B,)
        neighbours = self.memory_bank[self.bank_neighbors[anchor]]  # (B, b, D)
        # (B, b), column 0 is m* itself; in float32, as the float16 squares overflow (pairwise_squared_distances)
        neighbour_dist = (neighbours.float() - query.float()[:, None]).pow(2).sum(-1).sqrt()
        weight = 1 - torch.softmax(neighbour_dist, dim=1)[:, 0]
        return weight.to(max_score.dtype) * max_score
