"""SimpleNet (Liu et al., CVPR 2023): frozen local features, a linear adaptor and an MLP discriminator.

Inference graph: backbone stages (stride 8 and 16) -> PatchCore-style 3x3 aggregation -> adaptor (one linear layer;
``adaptor_layers`` for the public code's deeper or absent one) -> discriminator; the anomaly score of a location is
-D(q). The image score is the maximum of the raw score grid (Eq. 11); the map is upsampled bilinearly and smoothed
with a Gaussian of sigma 4 px (Eq. 10).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbones import local_feature_extractor
from ...config import ModelConfig, context_weight_option, option, position_shrinkage_option
from ...errors import ConfigError
from ...layers import GaussianBlur2d, PositionWhitening
from ..base import AnomalyModel

# The backbones of the paper's Table 4 (ResNet18/50/101, WideResNet50), for which the absolute noise sigma of 0.015
# was tuned. WideResNet101 is not among them.
PAPER_BACKBONES = ("resnet18", "resnet50", "resnet101", "wide_resnet50_2")


@dataclass(frozen=True)
class SimpleNetConfig(ModelConfig):
    """SimpleNet hyperparameters. Defaults follow the paper; the public code's choices are noted per field."""

    strides: tuple[int, ...] = option((8, 16), "backbone stages used, by stride (layer2+layer3)", low=4, high=32)
    patch_size: int = option(3, "neighbourhood aggregated at each location (odd: centred)", choices=(1, 3, 5, 7, 9))
    context_weight: float = context_weight_option()
    embed_dim: int = option(1536, "feature length after aggregation = adaptor width", low=1, high=16384)
    adaptor_bias: bool = option(False, "bias in the adaptor (paper: none; public code: bias)")
    adaptor_layers: int = option(
        1,
        "linear layers of the adaptor, each as wide as its input (embed_dim, twice that with context_weight); 0 = no "
        "adaptor (public code: pre_proj)",
        low=0,
        high=8,
    )
    adaptor_activation: bool = option(
        False, "LeakyReLU(0.2) between adaptor layers (public code: proj_layer_type > 1); needs adaptor_layers > 1"
    )
    discriminator_hidden: int = option(1024, "hidden width of the discriminator (public code)", low=1, high=16384)
    discriminator_layers: int = option(
        2,
        "linear layers of the discriminator: Linear-BatchNorm-LeakyReLU blocks of discriminator_hidden, then a "
        "Linear to one score (paper and public code: 2; 1 = a linear score; public code: dsc_layers)",
        low=1,
        high=8,
    )
    noise_std: float = option(
        0.015, "sigma of the Gaussian noise that makes fake features (absolute mode)", low=0, low_open=True
    )
    noise_mode: str = option(
        "auto",
        "absolute: sigma = noise_std; relative: sigma = noise_std_relative x the "
        "training features' std; auto: absolute for the paper's ResNet backbones, else relative",
        choices=("auto", "absolute", "relative"),
    )
    noise_std_relative: float = option(
        0.25, "sigma as a fraction of the feature std (relative mode)", low=0, low_open=True
    )
    feature_norm: str = option(
        "auto",
        "none: raw local features (paper); channel: standardise each feature channel with training statistics "
        "before the adaptor; position: channel, then whiten each grid position with its training mean and "
        "covariance (PaDiM's Gaussian; flawscope's option for aligned parts); auto: none for the paper's ResNet "
        "backbones, else channel",
        choices=("auto", "none", "channel", "position"),
    )
    position_shrinkage: float = position_shrinkage_option()
    margin: float = option(0.5, "th+ = margin, th- = -margin of the truncated L1 loss", low=0)
    lr_adaptor: float = option(1e-4, "adaptor learning rate", low=0, low_open=True)
    lr_discriminator: float = option(2e-4, "discriminator learning rate", low=0, low_open=True)
    weight_decay: float = option(1e-5, "weight decay of both optimisers", low=0)
    adaptor_optimizer: str = option(
        "adam", "adam (paper) or adamw (public code, decoupled decay 0.01)", choices=("adam", "adamw")
    )
    num_epochs: int = option(160, "passes over the training features", low=1)
    batch_size: int = option(4, "images per training step (public code: 8)", low=1)
    smoothing_sigma: float = option(4.0, "Gaussian smoothing of the upsampled map, pixels", low=0)
    image_top_k: int = option(
        1, "image score: mean of the k highest raw grid scores; 1 = the maximum (paper; the public code's top_k)", low=1
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adaptor_activation and self.adaptor_layers < 2:
            raise ConfigError(
                f"adaptor_activation puts a LeakyReLU between adaptor layers, and adaptor_layers={self.adaptor_layers} "
                "has none; set adaptor_layers to 2 or more, or leave adaptor_activation off."
            )
        if self.feature_norm == "position" and self.context_weight:
            raise ConfigError(
                "feature_norm=position whitens each location's whole feature, and the image context would make "
                "that twice as long (four times the memory); use one of context_weight and feature_norm=position."
            )

    def resolved_feature_norm(self) -> str:
        """'none', 'channel' or 'position', with 'auto' resolved from the backbone."""
        if self.feature_norm != "auto":
            return self.feature_norm
        return "none" if self.backbone in PAPER_BACKBONES else "channel"

    def resolved_noise_mode(self) -> str:
        """'absolute' or 'relative', with 'auto' resolved: absolute only for the paper backbones' raw features."""
        if self.noise_mode != "auto":
            return self.noise_mode
        return "absolute" if self.resolved_feature_norm() == "none" else "relative"


def _xavier(module: nn.Module) -> nn.Module:
    """Xavier-normal weights for every linear layer of ``module`` (the public code's ``init_weight``)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
    return module


def make_adaptor(dim: int, layers: int = 1, bias: bool = False, activation: bool = False) -> nn.Module:
    """The feature adaptor G: (N, dim) -> (N, dim).

    One linear layer by default (the paper); ``layers`` > 1 stacks them, with LeakyReLU(0.2) between them when
    ``activation`` (the public code's ``Projection``); 0 is the identity (the public code with ``pre_proj=0``).
    """
    if layers == 0:
        return nn.Identity()
    if layers == 1:  # a bare Linear, so that the saved weights keep the names of the one-layer model
        return _xavier(nn.Linear(dim, dim, bias=bias))
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Linear(dim, dim, bias=bias))
        if activation and i < layers - 1:
            modules.append(nn.LeakyReLU(0.2))
    return _xavier(nn.Sequential(*modules))


class Discriminator(nn.Sequential):
    """(Linear -> BatchNorm -> LeakyReLU(0.2)) x (layers - 1) -> Linear (no bias): (N, D) -> (N, 1), higher = more
    normal. Two layers (one block) are the paper's "linear, BN, leaky ReLU, linear"."""

    def __init__(self, in_dim: int, hidden: int, layers: int = 2) -> None:
        modules: list[nn.Module] = []
        width = in_dim
        for _ in range(layers - 1):
            modules += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2)]
            width = hidden
        super().__init__(*modules, nn.Linear(width, 1, bias=False))
        _xavier(self)


class SimpleNet(AnomalyModel):
    """SimpleNet's inference module; training lives in ``fit.py``."""

    method = "simplenet"
    config_class = SimpleNetConfig

    def __init__(self, config: SimpleNetConfig, pretrained: bool = True, weights_path: str | Path | None = None):
        super().__init__(config)
        self.backbone, self.aggregator = local_feature_extractor(
            config.backbone,
            config.strides,
            config.patch_size,
            config.embed_dim,
            config.embed_dim,
            config.context_weight,
            pretrained=pretrained,
            weights_path=weights_path,
        )
        dim = self.aggregator.out_dim  # embed_dim, or twice that with the image context appended
        self.adaptor = make_adaptor(dim, config.adaptor_layers, config.adaptor_bias, config.adaptor_activation)
        self.discriminator = Discriminator(dim, config.discriminator_hidden, config.discriminator_layers)
        self.blur = GaussianBlur2d(config.smoothing_sigma)
        # Set by fit when feature_norm resolves to "channel" or "position"; the identity keeps the paper's graph
        # otherwise.
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_scale", torch.ones(dim))
        self.whitening = PositionWhitening(dim, config.position_shrinkage)  # fitted only with feature_norm=position

    def local_features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> (B, h, w, D) frozen local features (the training cache stores these)."""
        return self.aggregator(self.backbone(images)).permute(0, 2, 3, 1)

    def standardize(self, features: Tensor) -> Tensor:
        """(B, P, D) -> (B, P, D), P = h*w grid positions: the feature_norm fitted on the training features.

        Per-channel standardisation (identity by default), then with feature_norm=position each position's
        whitening z = W_p (x - mu_p), so the training features of every position have mean 0 and covariance ~I.
        """
        return self.whitening((features - self.feature_mean) / self.feature_scale)

    def score_features(self, features: Tensor) -> Tensor:
        """(B, h, w, D) local features -> (B, h, w) anomaly scores -D(G(o))."""
        flat = self.standardize(features.flatten(1, 2)).flatten(0, 1)
        return -self.discriminator(self.adaptor(flat)).reshape(features.shape[:-1])

    def raw_scores(self, images: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.score_features(self.local_features(images))  # (B, h, w)
        grid = scores.flatten(1)  # Eq. 11 on the raw grid, before upsampling and smoothing
        k = min(self.config.image_top_k, grid.shape[1])
        image_score = grid.amax(dim=1) if k == 1 else grid.topk(k, dim=1).values.mean(dim=1)
        anomaly_map = F.interpolate(scores[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.blur(anomaly_map), image_score
