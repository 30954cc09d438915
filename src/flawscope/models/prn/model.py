"""PRN (Zhang et al., CVPR 2023): prototypical residual network for few-shot supervised anomaly segmentation.

Inference graph (spec §2): frozen encoder stages at strides 4/8/16 (F_1..F_3, ResNet-18 layer1-3) and 32 (F_4,
layer4, the decoder's start), each whitened per grid position with ``feature_norm=position`` (flawscope's option);
per scale the residual D_j = |F_j - P_j*| to the nearest of K fixed prototypes
(whole-map L2); multi-scale fusion (MF) of the features and, separately, of the residuals; C_j = [F*_j, D*_j];
N = 3 stacked multi-size self-attention blocks (MSA, 4 patch sizes) per scale; a second MF; a U-Net decoder; a
sigmoid. The anomaly map is the sigmoid output; the image score is the mean of its top-100 pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ...backbones import create_backbone
from ...config import ModelConfig, option, position_shrinkage_option, train_precision_option
from ...errors import ConfigError
from ...layers import PositionWhitening, pairwise_squared_distances
from ...synthesis.augment import AFFINE_RANGES
from ...synthesis.regions import TARGET_SHAPES
from ..base import AnomalyModel
from .blocks import MultiScaleFusion, MultiSizeAttention, UNetDecoder


@dataclass(frozen=True)
class PRNConfig(ModelConfig):
    """PRN hyperparameters. Defaults follow the paper; [proposal] / [xcyao00] alternatives are options."""

    backbone: str = option("resnet18", "frozen encoder (paper: ImageNet ResNet-18)")
    image_size: int = option(256, "side of the square model input (paper: 256)", low=32, high=4096)
    resize_size: int = option(
        0,
        "0 = resize the whole image to image_size (paper: 'resized to 256 x 256'); else the shorter side before "
        "the centre crop",
        low=0,
        high=8192,
    )
    strides: tuple[int, ...] = option((4, 8, 16), "encoder stages for prototypes/fusion/attention (layer1-3)", low=2)
    decoder_stride: int = option(32, "encoder stage that starts the decoder (layer4)", low=4)
    train_layer4: bool = option(
        False,
        "train the encoder's blocks from the last prototype stage to decoder_stride (ResNet: layer4) with the "
        "decoder, their BatchNorm in training mode (P2; paper and xcyao00: frozen)",
    )
    feature_norm: str = option(
        "none",
        "none: the encoder's stages (paper); position: whiten every stage's grid positions with their mean and "
        "covariance over the prototype images, before prototypes, residuals and decoder (PaDiM's Gaussian; "
        "flawscope's option for aligned parts)",
        choices=("none", "position"),
    )
    position_shrinkage: float = position_shrinkage_option()
    prototype_ratio: float = option(0.1, "K = max(1, floor(ratio x normal images)) prototypes per scale", low=0)
    prototype_holdout: float = option(
        0.0,
        "share of the good images that only make prototypes and never enter a training batch; 0 = all do both "
        "(paper). Images inside a cluster sit closer to its prototype than unseen ones, so with 0 the decoder "
        "learns residuals smaller than a test image's (Table 6's 100 % row is the extreme)",
        low=0,
        high=0.9,
    )
    kmeans_init: str = option(
        "random", "random: K sampled maps (paper); k-means++ (xcyao00 via sklearn)", choices=("random", "k-means++")
    )
    kmeans_max_iter: int = option(300, "k-means iterations (paper: 300)", low=1)
    residual: str = option("abs", "abs: |F - P*| (paper, literal); sq: (F - P*)^2 (xcyao00)", choices=("abs", "sq"))
    mf_downsample: str = option(
        "separable",
        "separable: depthwise + pointwise conv (paper's 'depth-wise separable'); grouped: one grouped conv (xcyao00)",
        choices=("separable", "grouped"),
    )
    mf_share_weights: bool = option(False, "one MF block for features and residuals (xcyao00) instead of two")
    mf_align_corners: bool = option(False, "align_corners of MF's bilinear upsampling (paper: silent; xcyao00: true)")
    msa_patch_divisors: tuple[int, ...] = option((1, 2, 4, 8), "MSA heads: patch size p = ceil(h / d)", low=1)
    msa_depth: int = option(3, "stacked MSA blocks per scale (N)", low=1)
    msa_qkv: str = option(
        "conv1x1",
        "conv1x1: Q/K/V as 1x1 convolutions before patchifying (proposal; the paper's dense FC layers would need "
        "up to 2.7e11 weights); diag: per-element projections (xcyao00)",
        choices=("conv1x1", "diag"),
    )
    msa_attn_scale: str = option(
        "1/d", "softmax(QK^T x scale): 1/d (paper Eq. 3) or 1/sqrt(d)", choices=("1/d", "1/sqrt(d)")
    )
    decoder_channels: tuple[int, ...] = option(
        (256, 128, 64, 64), "decoder widths at strides 16, 8, 4, 1", low=1, high=4096
    )
    image_score_topk: int = option(100, "image score = mean of the top-k pixels of the map", low=1)
    # Training (fit.py)
    num_epochs: int = option(700, "epochs of ceil(N_normal / batch_normal) steps (paper: 700)", low=1)
    steps_per_epoch: int = option(0, "steps per epoch; 0 = ceil(N_normal / batch_normal) (spec P17)", low=0)
    batch_normal: int = option(32, "good images per batch (paper: 32)", low=0)
    batch_extended: int = option(16, "extended real anomalies per batch (paper: 16)", low=0)
    batch_simulated: int = option(16, "simulated anomalies per batch (paper: 16)", low=0)
    lr: float = option(1e-4, "Adam learning rate, constant (paper)", low=0, low_open=True)
    weight_decay: float = option(
        1e-2, "Adam (L2-coupled) weight decay (paper's English text; translation: 1e-5)", low=0
    )
    loss_lambda: float = option(5.0, "weight of the focal loss against smooth L1", low=0)
    focal_alpha: float = option(0.5, "focal loss alpha (0.5 = both classes weighted equally)", low=0, high=1)
    focal_gamma: float = option(4.0, "focal loss gamma (paper: 4)", low=0)
    smooth_l1_beta: float = option(1.0, "smooth-L1 beta", low=0, low_open=True)
    train_precision: str = train_precision_option()
    precise_bn_batches: int = option(
        32, "after training, BatchNorm statistics re-estimated over this many batches (0 = running averages)", low=0
    )
    hea_prob: float = option(
        0.5, "share of simulated anomalies blended with textures (HEA); the rest HOA", low=0, high=1
    )
    texture_dir: str = option("", "folder of texture images for HEA (DTD in the paper); empty = procedural textures")
    grey_pseudo: bool = option(
        False, "make synthetic defects grey on grey training images (flawscope's; HEA textures are coloured)"
    )
    aug_num_ops: int = option(2, "colour operations per augmented source (Aug_1: 2 of 7)", low=0, high=7)
    perlin_max_exponent: int = option(5, "Perlin scales 2^0..2^this per axis", low=0, high=8)
    perlin_threshold: float = option(
        0.5,
        "Perlin noise threshold of the mask (the noise stays below 1: at 1 every mask is empty)",
        low=0,
        high=1,
        high_open=True,
    )
    opacity_range: tuple[float, ...] = option(
        (0.0, 0.8), "beta ~ U(low, high), share of the good image kept", low=0, high=1
    )
    hoa_grid: int = option(8, "grid of the homologous shuffle", low=1)
    use_target_area: bool = option(True, "confine generated anomalies to a random target area (TA)")
    target_area_shapes: tuple[str, ...] = option(
        TARGET_SHAPES, "shapes a target area is drawn from (circle, rectangle, polygon: the spec's proposal P21)"
    )
    aug2_ranges: tuple[float, ...] = option(
        AFFINE_RANGES,
        "Aug_2 of extended anomalies: rotation (+-degrees), shear (+-degrees), shift (+-fraction of the side); the "
        "spec's proposal P20",
        low=0,
    )
    redraw_empty_simulated: bool = option(
        True,
        "redraw a simulated anomaly's mask (up to 10 times) while it misses the target area; false: one draw, and "
        "an empty mask leaves a normal sample (the spec's reading of DRAEM, P26: about 40 % of them)",
    )
    foreground: str = option(
        "none",
        "none: defects anywhere (textures); otsu: centre target areas on the Otsu foreground (objects)",
        choices=("none", "otsu"),
    )
    include_raw_seen: bool = option(False, "half of the EA slots are the raw seen defects (xcyao00 reuses them)")
    base_rotate_prob: float = option(
        0.0,
        "chance that the good image an extended or simulated anomaly is made on is first rotated by U(-90, 90) "
        "degrees, corners black (xcyao00 and DRAEM: 0.3; the paper: none)",
        low=0,
        high=1,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_normal + self.batch_extended + self.batch_simulated < 1:
            raise ConfigError(
                "batch_normal, batch_extended and batch_simulated are all 0: a training batch would hold no image. "
                "Give at least one of them a count (the paper: 32, 16, 16)."
            )
        if not self.target_area_shapes or set(self.target_area_shapes) - set(TARGET_SHAPES):
            raise ConfigError(
                f"target_area_shapes must be a non-empty subset of {TARGET_SHAPES}; got {self.target_area_shapes}."
            )
        if len(self.aug2_ranges) != 3 or not (
            self.aug2_ranges[0] <= 180 and self.aug2_ranges[1] < 90 and self.aug2_ranges[2] <= 1
        ):
            raise ConfigError(
                "aug2_ranges needs three values ROTATE,SHEAR,SHIFT with rotate <= 180 and shear < 90 degrees and "
                f"shift <= 1 (a fraction of the side); got {','.join(map(str, self.aug2_ranges))}."
            )
        if self.strides and self.decoder_stride <= max(self.strides):
            raise ConfigError(
                f"decoder_stride ({self.decoder_stride}) must be deeper than every stage in strides "
                f"({','.join(map(str, self.strides))}): the decoder starts from a later stage (layer4, 32)."
            )
        if self.train_layer4 and self.feature_norm == "position":
            raise ConfigError(
                "feature_norm=position whitens every encoder stage with statistics fitted once before training, so "
                "the stage that starts the decoder must stay fixed: leave train_layer4 off with it."
            )
        if len(self.opacity_range) != 2 or self.opacity_range[0] > self.opacity_range[1]:
            raise ConfigError(
                f"opacity_range must be two numbers LOW,HIGH with LOW <= HIGH (beta ~ U(LOW, HIGH)); got "
                f"{','.join(map(str, self.opacity_range))}."
            )


class PRN(AnomalyModel):
    """PRN's inference module; prototypes are buffers set by ``fit``."""

    method = "prn"
    config_class = PRNConfig

    def __init__(self, config: PRNConfig, pretrained: bool = True, weights_path: str | Path | None = None):
        super().__init__(config)
        strides = (*config.strides, config.decoder_stride)
        self.backbone = create_backbone(config.backbone, strides, pretrained=pretrained, weights_path=weights_path)
        *channels, deep_channels = self.backbone.feature_info.channels
        # Fitted with the prototypes when feature_norm=position; the identity otherwise (the paper's graph).
        self.whitening = nn.ModuleList(
            PositionWhitening(c, config.position_shrinkage) for c in self.backbone.feature_info.channels
        )
        sizes = [math.ceil(config.image_size / s) for s in config.strides]
        fusion = {"downsample": config.mf_downsample, "align_corners": config.mf_align_corners}
        self.feature_fusion = MultiScaleFusion(channels, **fusion)
        self.residual_fusion = self.feature_fusion if config.mf_share_weights else MultiScaleFusion(channels, **fusion)
        self.attention = nn.ModuleList(
            nn.Sequential(
                *(
                    MultiSizeAttention(2 * c, size, config.msa_patch_divisors, config.msa_qkv, config.msa_attn_scale)
                    for _ in range(config.msa_depth)
                )
            )
            for c, size in zip(channels, sizes, strict=True)
        )
        self.attention_fusion = MultiScaleFusion([2 * c for c in channels], **fusion)
        self.decoder = UNetDecoder(deep_channels, [2 * c for c in channels][::-1], config.decoder_channels)
        # One zero prototype per scale until fit sets K of them (load_state resizes these buffers).
        for j, (c, size) in enumerate(zip(channels, sizes, strict=True)):
            self.register_buffer(f"prototypes{j}", torch.zeros(1, c, size, size))
        if config.train_layer4:  # the shared Backbone is frozen; P2's option trains its last stage
            for module in self.decoder_stage():
                module.requires_grad_(True)

    def decoder_stage(self) -> list[nn.Module]:
        """The encoder's modules after the last prototype stage, up to the one that starts the decoder (ResNet:
        ``layer4``; EfficientNet-Lite: the stride-32 blocks)."""
        body = self.backbone.body
        if not hasattr(body, "return_layers"):
            raise ConfigError(
                f"train_layer4 needs an encoder whose stages are named modules (the named backbones, e.g. resnet18 "
                f"or efficientnet_lite0, and timm ResNets); {self.config.backbone} is not one. Leave train_layer4 off "
                "or choose such a backbone."
            )
        *_, last, deep = body.return_layers  # stage names, in network order
        names = list(body.keys())
        return [body[name] for name in names[names.index(last) + 1 : names.index(deep) + 1]]

    def train(self, mode: bool = True) -> PRN:
        """As nn.Module.train; with ``train_layer4`` the decoder's encoder stage follows ``mode`` too (the frozen
        Backbone wrapper keeps the rest in eval mode)."""
        super().train(mode)
        if self.config.train_layer4:
            for module in self.decoder_stage():
                nn.Module.train(module, mode)
        return self

    def prototypes(self) -> list[Tensor]:
        """The K prototypes of each scale, [(K, c_j, h_j, w_j)]."""
        return [getattr(self, f"prototypes{j}") for j in range(len(self.config.strides))]

    def set_prototypes(self, prototypes: list[Tensor]) -> None:
        """Stores fitted prototypes [(K, c_j, h_j, w_j)], one tensor per scale."""
        for j, p in enumerate(prototypes):
            self.register_buffer(f"prototypes{j}", p.detach().to(self.prototypes0.device).contiguous())

    def stages(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) in [0, 1] -> the encoder stages [(B, c_j, h_j, w_j)] at ``strides`` and
        ``decoder_stride``, each whitened per grid position once ``feature_norm=position`` has been fitted."""
        return [whitening.whiten_map(f) for whitening, f in zip(self.whitening, self.backbone(images), strict=True)]

    def residuals(self, features: list[Tensor]) -> list[Tensor]:
        """Eq. 1: per scale, D_j = D(F_j - P_j*) with P_j* the prototype nearest to the whole map F_j (L2).

        Args:
            features: [(B, c_j, h_j, w_j)].

        Returns:
            [(B, c_j, h_j, w_j)], |F - P*| (residual 'abs') or (F - P*)^2 ('sq').
        """
        out = []
        for f, protos in zip(features, self.prototypes(), strict=True):
            queries, keys = f.flatten(1), protos.flatten(1)
            if torch.is_autocast_enabled(f.device.type):
                # bfloat16 training (train_precision): search in float32 as inference does; near-ties decided in
                # bfloat16 chose another prototype for 2-4 % of MTD images in a reviewer's check.
                with torch.autocast(f.device.type, enabled=False):
                    distances = pairwise_squared_distances(queries.float(), keys.float())
            else:
                distances = pairwise_squared_distances(queries, keys)
            nearest = distances.argmin(dim=1)  # (B,)
            diff = f - protos[nearest]
            out.append(diff.abs() if self.config.residual == "abs" else diff.square())
        return out

    def segment_logits(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] -> (B, 1, H, W) logits of the anomaly map (before the sigmoid)."""
        *features, deep = self.stages(images)
        fused = self.feature_fusion(features)
        fused_residuals = self.residual_fusion(self.residuals(features))
        tokens = [
            block(torch.cat([f, d], dim=1)) for block, f, d in zip(self.attention, fused, fused_residuals, strict=True)
        ]
        skips = self.attention_fusion(tokens)
        return self.decoder(deep, skips[::-1], images.shape[-2:])

    def raw_scores(self, images: Tensor) -> tuple[Tensor, Tensor]:
        anomaly_map = torch.sigmoid(self.segment_logits(images))
        k = min(self.config.image_score_topk, anomaly_map[0].numel())
        score = anomaly_map.flatten(1).topk(k, dim=1).values.mean(dim=1)
        return anomaly_map, score
