"""MLFF (Tang et al., J. NUDT 2025): multi-level feature fusion trained on pseudo-anomalies.

Inference graph (spec 2.2, shapes for ResNet-50 at 256 px): backbone stages 1-3 (stride 4, 8, 16) -> texture branch
on the fused stages 1+2 (avg-pool stage 1 to stride 8, concat, 1x1 conv to 256 = X0; TEM -> T1; PTFEM on [T1, X0]
-> T2; texture = [T2, T1, X0], 768 ch) and self-calibrated convolution on stage 3 (1024 ch, upsampled to stride 8)
-> concat -> 1x1 conv -> per-pixel features psi (B, 256, 32, 32) -> score head eta (1x1 conv) -> S (B, 1, 32, 32).
The map is S upsampled bilinearly to the input; the image score is its maximum (spec 2.9). ``texture_stride=4``
runs the texture branch on stage 1's grid (stage 2 upsampled, M1's alternative); ``out_stride=4`` fuses psi there
(M2's alternative).

Switching ``texture_branch`` and ``sc_branch`` off gives the ablation baseline of Table 4 (stages 1-3 fused directly,
M23); ``score_source="distance"`` scores with the hypersphere distance A = sqrt(|psi|^2 + 1) - 1 instead of eta.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbones import create_backbone
from ...config import ModelConfig, option, position_shrinkage_option
from ...layers import GaussianBlur2d, PositionWhitening
from ..base import AnomalyModel
from .texture import PyramidTexture, TextureEnhancement, conv_bn_act

PSEUDO_KINDS = ("confetti", "cutpaste")  # the paper's generators (spec 2.6)
EXTRA_PSEUDO_KINDS = ("perlin",)  # flawscope's: a Perlin-mask blend (flawscope.synthesis.synthetic_defect)


@dataclass(frozen=True)
class MLFFConfig(ModelConfig):
    """MLFF hyperparameters. Defaults follow the paper; [proposal] marks the spec's reconstructions (M1-M23)."""

    backbone: str = option("resnet50", "feature extractor; stages at stride 4, 8, 16 are used (ResNet layer1-3)")
    image_size: int = option(256, "side of the square model input, pixels", low=32, high=4096)
    resize_size: int = option(
        0,
        "0 = resize the whole image to image_size (paper: input resolution 256 x 256); else the shorter side "
        "before the centre crop",
        low=0,
        high=8192,
    )
    freeze_backbone: bool = option(False, "keep the backbone's ImageNet weights fixed (paper: fine-tuned, M6)")
    backbone_batchnorm: str = option(
        "train",
        "when fine-tuning: train = the backbone's batch-norm layers train with the rest (a plain fine-tune, M6); "
        "frozen = they keep their ImageNet statistics (flawscope before this option)",
        choices=("train", "frozen"),
    )
    feature_norm: str = option(
        "none",
        "none: the backbone's stages (paper); position: whiten each stage's grid positions with their training mean "
        "and covariance before the branches (PaDiM's Gaussian; flawscope's option for aligned parts; needs "
        "freeze_backbone)",
        choices=("none", "position"),
    )
    position_shrinkage: float = position_shrinkage_option()
    texture_branch: bool = option(True, "STLNet texture branch on stages 1+2 (False: plain fusion, Table 4 baseline)")
    sc_branch: bool = option(True, "self-calibrated convolution on stage 3 (False: stage 3 as is)")
    texture_dim: int = option(256, "width of X0, T1 and T2 in the texture branch [proposal, M3]", low=1, high=4096)
    feat_dim: int = option(256, "channels C of the fused feature psi [proposal, M2]", low=1, high=4096)
    texture_stride: int = option(
        8,
        "grid of the fused stages 1+2 that the texture branch works on: 8 (stage 1 average-pooled) or 4 (stage 2 "
        "upsampled) [proposal, M1]",
        choices=(4, 8),
    )
    out_stride: int = option(
        8, "grid of the fused features psi and the score map: 8 or 4 (the finer stage's) [proposal, M2]", choices=(4, 8)
    )
    tem_levels: int = option(128, "TEM quantisation levels N [M3]", low=2, high=4096)
    tem_stat_dim: int = option(128, "TEM statistics width [M3]", low=1, high=4096)
    ptfem_scales: tuple[int, ...] = option(
        (1, 2, 4, 8), "PTFEM pyramid scales (paper; public STLNet code: 1,2,3,6)", low=1
    )
    ptfem_levels: int = option(8, "PTFEM quantisation levels per axis [M3]", low=2)
    qco_window: str = option(
        "spacing",
        "QCO window: level spacing (public code) or half of it (STLNet paper) [M4]",
        choices=("spacing", "half"),
    )
    sc_pooling_r: int = option(4, "SCConv down-sampling rate r [M5]", low=1)
    sc_reduce: int = option(
        0, "1x1 conv to this many channels before SCConv; 0 = none (literal) [M5]", low=0, high=4096
    )
    score_source: str = option(
        "head",
        "map from the score head eta (paper) or the hypersphere distance A (Table 4 baseline)",
        choices=("head", "distance"),
    )
    smoothing_sigma: float = option(
        0.0,
        "Gaussian smoothing of the upsampled map, pixels (paper: none; 4 = CFA's and SimpleNet's smoothing, "
        "flawscope's option)",
        low=0,
    )
    # Losses (spec 2.7).
    loss_weights: tuple[float, ...] = option((1.0, 1.0, 1.0), "alpha, beta, xi: feature, score, consistency", low=0)
    gamma_margin: float = option(2.5, "gamma: normal scores are pushed below it", low=0)
    lambda_margin: float = option(5.0, "lambda: anomalous minus normal score is pushed above it", low=0)
    score_pairing: str = option(
        "image_mean",
        "normal score paired with each anomalous pixel [proposal, M9]",
        choices=("image_mean", "batch_mean", "random_pair"),
    )
    consistency_patch: int = option(2, "pooling window of the consistency loss's patches [proposal, M11]", low=1)
    consistency_sign: str = option("neg", "softmax of negated (neg) or raw distances [M10]", choices=("neg", "raw"))
    consistency_tau: float = option(1.0, "softmax temperature of the consistency loss", low=0, low_open=True)
    detach_features: bool = option(False, "stop the consistency gradient into the features [M12]")
    feature_loss_counts: str = option(
        "batch",
        "N1, N2 of Eq. 4 counted over the batch (proposal) or per image (Eq. 4 per image, then the batch mean) [M8]",
        choices=("batch", "image"),
    )
    loss_resolution: str = option(
        "input",
        "losses on maps upsampled to the input (proposal) or on the feature grid [M7]",
        choices=("input", "feature"),
    )
    # Pseudo-anomalies and schedule (spec 2.6, 2.8).
    repeat_factor: int = option(10, "the training set is repeated this many times per epoch", low=1)
    pseudo_ratio: float = option(0.5, "fraction of the repeated set made pseudo-anomalous (Table 3)", low=0, high=1)
    pseudo_kinds: tuple[str, ...] = option(
        PSEUDO_KINDS,
        "pseudo-anomaly generators, drawn with equal probability; 'perlin' (not in the paper) adds a Perlin-mask blend "
        "of a texture or the image itself grid-shuffled",
    )
    pseudo_probs: tuple[float, ...] = option(
        (), "probability of each pseudo_kinds entry, in order (normalised to sum 1); empty = equal", low=0
    )
    pseudo_selection: str = option(
        "exact",
        "exact: exactly pseudo_ratio of the repeated set, drawn per epoch (the paper's 'select half'); bernoulli: "
        "each copy independently with probability pseudo_ratio (the spec's proposal M13, FCDD's online supervisor)",
        choices=("exact", "bernoulli"),
    )
    texture_dir: str = option("", "folder of texture images for the 'perlin' kind; empty = procedural textures")
    grey_pseudo: bool = option(
        False, "make pseudo-anomalies grey on grey training images (flawscope's; the paper's confetti is coloured)"
    )
    cutpaste_variant: str = option("normal", "CutPaste variant [M21]", choices=("normal", "scar", "3way"))
    cutpaste_area: tuple[float, ...] = option(
        (0.02, 0.15), "LOW,HIGH: the CutPaste rectangle's area as a fraction of the image [M21]", low=0, high=1
    )
    cutpaste_aspect: tuple[float, ...] = option(
        (0.3, 3.3), "LOW,HIGH: its width/height, from U(LOW, 1) or U(1, HIGH) [M21]", low=0, low_open=True
    )
    cutpaste_jitter: float = option(0.1, "ColorJitter strength of the pasted patch [M21]", low=0, high=1)
    confetti_probs: tuple[float, ...] = option(
        (1.8e-5, 1.2e-5),
        "COLOUR,GREY: per-pixel probabilities of seeding a confetti square (FCDD) [M20]",
        low=0,
        high=1,
    )
    confetti_sides: tuple[int, ...] = option((8, 54), "LOW,HIGH: confetti square sides, pixels (FCDD) [M20]", low=1)
    lr: float = option(1e-3, "SGD learning rate", low=0, low_open=True)
    momentum: float = option(0.9, "SGD momentum, Nesterov [proposal, M15]", low=0, high=1)
    weight_decay: float = option(3e-5, "SGD weight decay ('decay rate' 0.00003) [M15]", low=0)
    batch_size: int = option(32, "images per step", low=1)
    num_epochs: int = option(200, "epochs over the repeated training set", low=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        from ...errors import ConfigError

        known = PSEUDO_KINDS + EXTRA_PSEUDO_KINDS
        unknown = [k for k in self.pseudo_kinds if k not in known]
        if unknown or not self.pseudo_kinds:
            raise ConfigError(f"pseudo_kinds must be a non-empty subset of {known}; got {self.pseudo_kinds}.")
        if self.pseudo_probs and (len(self.pseudo_probs) != len(self.pseudo_kinds) or sum(self.pseudo_probs) <= 0):
            raise ConfigError(
                f"pseudo_probs needs one non-negative weight per pseudo_kinds entry {self.pseudo_kinds}, not all 0; "
                f"got {self.pseudo_probs}."
            )
        from ...synthesis.confetti import check_confetti_params
        from ...synthesis.cutpaste import check_cutpaste_params

        check_cutpaste_params(
            self.cutpaste_area,
            self.cutpaste_aspect,
            self.cutpaste_jitter,
            ("cutpaste_area", "cutpaste_aspect", "cutpaste_jitter"),
        )
        check_confetti_params(self.confetti_probs, self.confetti_sides, ("confetti_probs", "confetti_sides"))
        if len(self.loss_weights) != 3:
            raise ConfigError(f"loss_weights needs three values (alpha, beta, xi); got {self.loss_weights}.")
        if self.feature_norm == "position" and not self.freeze_backbone:
            raise ConfigError(
                "feature_norm=position whitens the backbone's stages with statistics fitted once before training, "
                "so the backbone must stay fixed: add freeze_backbone=true."
            )
        if self.score_source == "head" and self.loss_weights[1] == 0:
            raise ConfigError("score_source='head' needs a score loss (beta > 0) to train the head; use 'distance'.")
        cells = -(-self.image_size // 16)  # the stride-16 grid's side (the backbones pad)
        if self.sc_branch and cells < self.sc_pooling_r:
            raise ConfigError(
                f"image_size={self.image_size} gives a {cells} x {cells} stride-16 grid, which the self-calibrated "
                f"branch cannot pool by sc_pooling_r={self.sc_pooling_r}: use image_size >= "
                f"{16 * (self.sc_pooling_r - 1) + 1}, a smaller sc_pooling_r, or sc_branch=false."
            )


class SelfCalibratedConv(nn.Module):
    """SCConv (Liu et al., CVPR 2020; spec 2.5): a pooled branch gates the full-resolution one.

    (B, C, H, W) -> (B, C, H, W): y = k3(x) * sigmoid(x + up(k2(avgpool_r(x)))), out = ReLU(BN(conv(y))).
    """

    def __init__(self, channels: int, pooling_r: int = 4):
        super().__init__()
        self.pool = nn.AvgPool2d(pooling_r, pooling_r)
        self.k2 = conv_bn_act(channels, channels, 3, nn.Identity())
        self.k3 = conv_bn_act(channels, channels, 3, nn.Identity())
        self.k4 = conv_bn_act(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        context = F.interpolate(self.k2(self.pool(x)), size=x.shape[-2:], mode="nearest")
        return self.k4(self.k3(x) * torch.sigmoid(x + context))


class TextureBranch(nn.Module):
    """Stages 1+2 -> [T2, T1, X0] (spec 2.2 rows 5-10): (B, c1, 2h, 2w), (B, c2, h, w) -> (B, 3 * dim, h, w)."""

    def __init__(self, in_ch: int, cfg: MLFFConfig):
        super().__init__()
        dim = cfg.texture_dim
        self.start = conv_bn_act(in_ch, dim)
        self.tem = TextureEnhancement(dim, dim, cfg.tem_stat_dim, cfg.tem_levels, cfg.qco_window)
        self.ptfem = PyramidTexture(2 * dim, dim, cfg.ptfem_scales, cfg.ptfem_levels, dim // 2, cfg.qco_window)

    def forward(self, low: Tensor) -> Tensor:
        x0 = self.start(low)
        t1 = self.tem(x0)
        t2 = self.ptfem(torch.cat([t1, x0], dim=1))
        return torch.cat([t2, t1, x0], dim=1)


class MLFF(AnomalyModel):
    """MLFF's inference module: features psi and score head eta; training lives in ``fit.py``."""

    method = "mlff"
    config_class = MLFFConfig

    def __init__(self, config: MLFFConfig, pretrained: bool = True, weights_path: str | Path | None = None):
        super().__init__(config)
        self.backbone = create_backbone(config.backbone, (4, 8, 16), pretrained=pretrained, weights_path=weights_path)
        # The shared Backbone is frozen and always in eval mode; fine-tuning makes its weights trainable, and train()
        # below lets its batch-norm layers train too unless backbone_batchnorm=frozen.
        self.backbone.body.requires_grad_(not config.freeze_backbone)
        c1, c2, c3 = self.backbone.feature_info.channels
        # Fitted by fit() with feature_norm=position; the identity otherwise, which keeps the paper's graph.
        self.whitening = nn.ModuleList(PositionWhitening(c, config.position_shrinkage) for c in (c1, c2, c3))
        self.texture = TextureBranch(c1 + c2, config) if config.texture_branch else nn.Identity()
        low_ch = 3 * config.texture_dim if config.texture_branch else c1 + c2
        high = [nn.Conv2d(c3, config.sc_reduce, 1)] if config.sc_reduce else []
        high_ch = config.sc_reduce or c3
        if config.sc_branch:
            high.append(SelfCalibratedConv(high_ch, config.sc_pooling_r))
        self.high = nn.Sequential(*high)
        self.fuse = nn.Conv2d(low_ch + high_ch, config.feat_dim, 1)
        self.score_head = nn.Conv2d(config.feat_dim, 1, 1)
        self.blur = GaussianBlur2d(config.smoothing_sigma)  # the identity at the paper's sigma = 0

    def train(self, mode: bool = True) -> MLFF:
        """As nn.Module.train; a fine-tuned backbone's body follows ``mode`` (the Backbone wrapper stays in eval)."""
        super().train(mode)
        if not self.config.freeze_backbone and self.config.backbone_batchnorm == "train":
            nn.Module.train(self.backbone.body, mode)
        return self

    def features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] -> psi (B, C, H/s, W/s), s = ``out_stride`` (8 by default)."""
        stage1, stage2, stage3 = self.stages(images)
        grids = {4: stage1.shape[-2:], 8: stage2.shape[-2:]}
        low_size, size = grids[self.config.texture_stride], grids[self.config.out_stride]
        low = self.texture(torch.cat([_resize(stage1, low_size), _resize(stage2, low_size)], dim=1))
        high = F.interpolate(self.high(stage3), size=size, mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([_resize(low, size), high], dim=1))

    def stages(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> the three backbone stages (B, C_i, H_i, W_i), each whitened per grid position when
        ``feature_norm=position`` has been fitted (unchanged otherwise)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_backbone):
            stages = self.backbone(images)
        return [whitening.whiten_map(stage) for whitening, stage in zip(self.whitening, stages, strict=True)]

    def score_map(self, psi: Tensor) -> Tensor:
        """psi (B, C, h, w) -> (B, 1, h, w) anomaly scores on the feature grid (eta, or the distance A)."""
        if self.config.score_source == "distance":
            return hypersphere_distance(psi)
        return self.score_head(psi)

    def raw_scores(self, images: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.score_map(self.features(images))
        anomaly_map = self.blur(F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False))
        return anomaly_map, anomaly_map.flatten(1).amax(dim=1)


def _resize(x: Tensor, size: torch.Size) -> Tensor:
    """(B, C, h, w) -> (B, C, *size): average pooling to a coarser grid, bilinear upsampling to a finer one."""
    if x.shape[-2:] == size:
        return x
    if x.shape[-1] > size[-1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def hypersphere_distance(psi: Tensor) -> Tensor:
    """Pseudo-Huber distance to the origin, A = sqrt(|psi|^2 + 1) - 1: (B, C, h, w) -> (B, 1, h, w)."""
    return (psi.pow(2).sum(1, keepdim=True) + 1).sqrt() - 1
