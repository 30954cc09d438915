"""CFA (Lee, Lee, Song, IEEE Access 2022): a patch descriptor adapted with a coupled-hypersphere loss.

Inference graph: frozen backbone stages at strides 4, 8, 16 (each optionally the concatenated outputs of its last
few blocks) -> per stage 3x3 average pooling -> bilinear upsampling to the stride-4 grid -> concatenation (D
channels) -> patch descriptor (CoordConv: two coordinate channels, then a 1x1 convolution to D' = D / gamma_d, or
twice that with the code's EfficientNet width) -> Euclidean distances to the memory bank by one matrix product ->
soft-boundary score of Eq. 5 over the K nearest memory items -> bilinear upsampling, Gaussian sigma 4 px; the image
score is the maximum of the smoothed map. The memory bank is built and the descriptor trained in ``fit.py``; see
``shared/specs/cfa.md`` and ``docs/methods.md`` for where the paper and the public code differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbones import create_backbone
from ...config import ModelConfig, option, position_shrinkage_option
from ...errors import ConfigError
from ...layers import GaussianBlur2d, PositionWhitening, linspace_like, pairwise_squared_distances
from ..base import AnomalyModel


@dataclass(frozen=True)
class CFAConfig(ModelConfig):
    """CFA hyperparameters. Defaults follow the paper (section 4.1); the public code's choices are options."""

    strides: tuple[int, ...] = option(
        (4, 8, 16), "backbone stages used, by stride (C2, C3, C4 = ResNet layer1-3)", low=1, high=64
    )
    backbone_blocks: tuple[int, ...] = option(
        (1,),
        "how many of the last blocks of each stage to concatenate: one count for every stage or one per stride "
        "(1 = the stage's output, paper's ResNets; the CFA code's EfficientNet-B5 takes 5, 3, 1); named backbones only",
        low=1,
    )
    channel_division: bool = option(
        False,
        "divide each block's pooled map by its channel count (the CFA code's EfficientNet descriptor, spec A14; the "
        "paper: 'divided into channel dimension values'); off for the paper's ResNets",
    )
    gamma_d: int = option(1, "descriptor channel reduction: D' = descriptor_expansion * D // gamma_d (Table 6)", low=1)
    descriptor_expansion: int = option(
        1,
        "descriptor width factor: D' = descriptor_expansion * D // gamma_d (paper: 1; the CFA code's EfficientNet "
        "descriptor: 2)",
        low=1,
        high=64,
    )
    gamma_c: int = option(1, "memory compression: bank items = h*w // gamma_c (Table 6)", low=1)
    memory_init: str = option(
        "kmeans_ema",
        "kmeans_ema: Algorithm 1 (K-means of the first image, then nearest-neighbour matching and EMA over the "
        "rest); positional_mean: public code (per-location mean over all images, K-means only if gamma_c > 1)",
        choices=("kmeans_ema", "positional_mean"),
    )
    ema_beta: float = option(
        0.0, "EMA weight of Algorithm 1 (not given in the paper); 0 = running mean, beta_i = 1/(i+1)", low=0, high=1
    )
    kmeans_max_iter: int = option(3000, "most Lloyd iterations of the K-means (public code: 3000)", low=1)
    num_neighbors: int = option(3, "K: attracting memory items, also used by the score (Eq. 1, 5)", low=1)
    num_hard_negatives: int = option(3, "J: repelling memory items, ranks K+1..K+J (Eq. 2)", low=0)
    radius: float = option(1e-5, "r, the hypersphere radius (initial value when learned)", low=0)
    learn_radius: bool = option(False, "paper: r is a fixed hyperparameter; public code: r is learned with AdamW")
    alpha: float = option(0.1, "repulsion margin alpha of Eq. 2", low=0)
    loss_distance: str = option(
        "squared",
        "D in Eqs. 1-2: squared (compared with r^2, as the public code) or euclidean",
        choices=("squared", "euclidean"),
    )
    loss_scale: float = option(
        1000.0, "the loss is multiplied by this (public code: 1/nu = 1000)", low=0, low_open=True
    )
    descriptor_init: str = option(
        "he",
        "he: Kaiming normal, zero bias (paper); pytorch: Conv2d default (public code); orthogonal: orthonormal rows "
        "scaled by He's gain sqrt(2), zero bias (flawscope's option: keeps the distances of whitened features)",
        choices=("he", "pytorch", "orthogonal"),
    )
    lr: float = option(1e-3, "AdamW learning rate (amsgrad, no scheduler)", low=0, low_open=True)
    weight_decay: float = option(5e-4, "AdamW decoupled weight decay", low=0)
    num_epochs: int = option(30, "passes over the training images", low=1)
    batch_size: int = option(4, "images per training step", low=1)
    score_mode: str = option(
        "softmin",
        "softmin: soft-boundary score (Eq. 5); nearest: plain distance (Eq. 4)",
        choices=("softmin", "nearest"),
    )
    smoothing_sigma: float = option(4.0, "Gaussian smoothing of the upsampled map, pixels", low=0)
    pool_size: tuple[int, ...] = option(
        (3,),
        "kernel of the average pooling of each stage before upsampling: one value for every stage or one per stage, "
        "finest first (public code: 3; the paper does not pool; 1 = no pooling, as PaDiM)",
        low=1,
    )
    feature_norm: str = option(
        "none",
        "none: the backbone's patch features (paper); position: whiten each grid position with its training mean "
        "and covariance before the descriptor (PaDiM's Gaussian; flawscope's option for aligned parts)",
        choices=("none", "position"),
    )
    position_shrinkage: float = position_shrinkage_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        grid = self.image_size // self.strides[0]
        if any(size % 2 == 0 for size in self.pool_size) or len(self.pool_size) not in (1, len(self.strides)):
            raise ConfigError(
                f"pool_size must be one odd kernel for every stage or one per stage ({len(self.strides)} strides), "
                f"so that each pooled map keeps its grid; got {self.pool_size}."
            )
        if len(self.backbone_blocks) not in (1, len(self.strides)):
            raise ConfigError(
                f"backbone_blocks must be one count for every stage or one per stage ({len(self.strides)} strides); "
                f"got {self.backbone_blocks}."
            )
        if grid * grid // self.gamma_c < self.num_neighbors + self.num_hard_negatives:
            raise ConfigError(
                f"CFA's memory bank would hold {grid * grid // self.gamma_c} items ({grid}x{grid} locations // "
                f"gamma_c={self.gamma_c}), fewer than num_neighbors + num_hard_negatives = "
                f"{self.num_neighbors + self.num_hard_negatives}. Lower gamma_c or raise image_size."
            )


def soft_boundary_score(distances: Tensor) -> Tensor:
    """Eq. 5: softmin weight of the nearest item times its distance.

    Args:
        distances: (..., K) Euclidean distances to the K nearest memory items, ascending.

    Returns:
        (...) A = exp(-S) / sum_k exp(-d_k) * S with S = d_1.
    """
    return torch.softmax(-distances, dim=-1)[..., 0] * distances[..., 0]


class AddCoords(nn.Module):
    """CoordConv's input: appends a row and a column coordinate channel, each spaced linearly in [-1, 1]."""

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, C + 2, H, W); channel C is the row coordinate, C + 1 the column coordinate."""
        batch, _, height, width = x.shape
        rows, cols = linspace_like(x, -1.0, 1.0, height), linspace_like(x, -1.0, 1.0, width)
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # (2, H, W)
        return torch.cat([x, grid.expand(batch, 2, height, width)], dim=1)


class PatchDescriptor(nn.Module):
    """phi: backbone stages -> target-oriented patch features on the finest grid.

    Each stage is average pooled over k x k (stride 1, zero padding counted; k = 3 as in the public code, 1 = no
    pooling), the coarser ones are upsampled bilinearly to the finest stage's grid, everything is concatenated
    (p_t, D channels), and a 1x1 CoordConv maps it to D' channels.

    Args:
        in_channels: D, the summed channels of the stages.
        out_channels: D'.
        init: "he" (Kaiming normal weights, zero bias; the paper), "pytorch" (Conv2d's default; the public code) or
            "orthogonal" (orthonormal rows times He's gain sqrt(2), zero bias: every distance in the rows' span is
            scaled by exactly sqrt(2), where He's random matrix stretches some directions and nearly drops others).
        pool_size: odd kernel k of the average pooling: one for every stage, or one per stage, finest first.
        divisors: each stage's pooled map is divided by its divisor (one per stage, finest first); None = 1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        init: str = "he",
        pool_size: int | tuple[int, ...] = 3,
        divisors: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        self.pool_size = (pool_size,) if isinstance(pool_size, int) else tuple(pool_size)
        self.divisors = divisors
        self.add_coords = AddCoords()
        self.projection = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1, bias=True)
        if init == "he":
            nn.init.kaiming_normal_(self.projection.weight, nonlinearity="relu")
            nn.init.zeros_(self.projection.bias)
        elif init == "orthogonal":
            nn.init.orthogonal_(self.projection.weight, gain=nn.init.calculate_gain("relu"))
            nn.init.zeros_(self.projection.bias)

    def patch_features(self, stages: list[Tensor]) -> Tensor:
        """Stages [(B, C_i, H_i, W_i)], finest first -> F (B, D, H_0, W_0), the paper's p_t at every location."""
        size = stages[0].shape[-2:]
        pooled = []
        sizes = self.pool_size * len(stages) if len(self.pool_size) == 1 else self.pool_size
        divisors = self.divisors or (1.0,) * len(stages)
        for stage, kernel, divisor in zip(stages, sizes, divisors, strict=True):
            if kernel > 1:
                stage = F.avg_pool2d(stage, kernel_size=kernel, stride=1, padding=kernel // 2)
            if divisor != 1:
                stage = stage / divisor
            if stage.shape[-2:] != size:
                stage = F.interpolate(stage, size=size, mode="bilinear", align_corners=False)
            pooled.append(stage)
        return torch.cat(pooled, dim=1)

    def project(self, patch_features: Tensor) -> Tensor:
        """F (B, D, H, W) -> (B, D', H, W): the learned CoordConv."""
        return self.projection(self.add_coords(patch_features))

    def forward(self, stages: list[Tensor]) -> Tensor:
        """Stages [(B, C_i, H_i, W_i)] -> (B, D', H_0, W_0)."""
        return self.project(self.patch_features(stages))


class CFA(AnomalyModel):
    """CFA's inference module; the memory bank and the descriptor are fitted in ``fit.py``.

    Buffers:
        memory_bank: (M, D') memorised patch features c, M = h*w // gamma_c whatever the number of images.
    """

    method = "cfa"
    config_class = CFAConfig

    def __init__(self, config: CFAConfig, pretrained: bool = True, weights_path: str | Path | None = None):
        super().__init__(config)
        self.backbone = create_backbone(
            config.backbone, config.strides, pretrained, weights_path, blocks=config.backbone_blocks
        )
        in_channels = sum(self.backbone.feature_info.channels)
        out_channels = config.descriptor_expansion * in_channels // config.gamma_d
        if out_channels < 1:
            raise ConfigError(
                f"gamma_d={config.gamma_d} leaves no descriptor channel: backbone {config.backbone!r} gives "
                f"D = {in_channels} channels at strides {config.strides} (descriptor_expansion="
                f"{config.descriptor_expansion}). Set gamma_d <= {config.descriptor_expansion * in_channels}."
            )
        divisors = None
        if config.channel_division:  # every block of a stage has the stage's channels / its number of blocks
            channels, blocks = self.backbone.feature_info.channels, config.backbone_blocks
            blocks = blocks * len(channels) if len(blocks) == 1 else blocks
            divisors = tuple(c / n for c, n in zip(channels, blocks, strict=True))
        self.descriptor = PatchDescriptor(in_channels, out_channels, config.descriptor_init, config.pool_size, divisors)
        self.blur = GaussianBlur2d(config.smoothing_sigma)
        self.register_buffer("memory_bank", torch.zeros(0, out_channels))
        self.whitening = PositionWhitening(in_channels, config.position_shrinkage)  # fitted with feature_norm=position

    @property
    def descriptor_dim(self) -> int:
        """D', the length of the descriptor's features and of the memory items."""
        return self.descriptor.projection.out_channels

    @torch.no_grad()
    def patch_features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> p (B, D, h, w): the frozen part of the graph (training caches it).

        With feature_norm=position each location's p is whitened with its grid position's training Gaussian.
        """
        patches = self.descriptor.patch_features(self.backbone(images))
        if not self.whitening.fitted:
            return patches
        whitened = self.whitening(patches.flatten(2).transpose(1, 2))  # (B, h*w, D)
        return whitened.transpose(1, 2).reshape(patches.shape)

    def describe(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> phi(p) (B, D', h, w); gradients flow into the descriptor only."""
        return self.descriptor.project(self.patch_features(images))

    def raw_scores(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.describe(images)  # (B, D', h, w)
        batch, _, height, width = features.shape
        queries = features.flatten(2).transpose(1, 2)  # (B, h*w, D')
        squared = pairwise_squared_distances(queries, self.memory_bank)  # (B, h*w, M)
        # Top-K on squared distances, then the root of only K values: the same order, far fewer square roots.
        nearest = squared.topk(self.config.num_neighbors, dim=-1, largest=False).values.sqrt()  # (B, h*w, K)
        scores = soft_boundary_score(nearest) if self.config.score_mode == "softmin" else nearest[..., 0]  # Eq. 5 / 4
        patch_map = scores.to(features.dtype).reshape(batch, 1, height, width)  # the distances are float32
        anomaly_map = self.blur(F.interpolate(patch_map, size=images.shape[-2:], mode="bilinear", align_corners=False))
        return anomaly_map, anomaly_map.flatten(1).amax(dim=1)
