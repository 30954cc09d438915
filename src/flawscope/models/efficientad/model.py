"""EfficientAD (Batzner et al., WACV 2024): a PDN student-teacher pair plus an autoencoder, in one graph.

Inference graph (spec ``shared/specs/efficientad.md`` 2.10): ImageNet normalisation -> teacher T (frozen PDN,
384 channels, normalised per channel with the training images' mean/std), student S (same PDN, 768 channels) and
autoencoder A -> local map mean_c (T^ - S[:384])^2 and global map mean_c (A - S[384:])^2 -> each mapped linearly
so that its validation 0.9-quantile goes to 0 and its 0.995-quantile to 0.1 -> average -> (public-code variant:
zero-pad by 4) -> bilinear resize to the input -> image score = maximum of the map. No smoothing.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ...backbones.named import IMAGENET_MEAN, IMAGENET_STD
from ...backbones.weights import load_weights_file
from ...config import ModelConfig, option, train_precision_option
from ...errors import ConfigError, ModelFormatError, WeightsNotFoundError
from ..base import AnomalyModel

TEACHER_METADATA_KEY = "flawscope_teacher"
CHECKPOINT_KEY = "flawscope_distill"  # metadata key of `flawscope distill`'s resume file
# Border the unpadded PDN loses on each side (its 56x56 grid is the interior of the padded 64x64 grid).
UNPADDED_BORDER = 4


@dataclass(frozen=True)
class EfficientADConfig(ModelConfig):
    """EfficientAD hyperparameters. Defaults follow the paper; the public code's variants are options."""

    backbone: str = option(
        "pdn",
        "unused: the teacher is a PDN; the network it was distilled from is read from the teacher file and "
        "recorded in model.json (training.teacher)",
    )
    image_size: int = option(256, "side of the square model input (a multiple of 32)", low=64, high=4096)
    resize_size: int = option(0, "0 = resize the whole image to image_size, no crop (paper)", low=0, high=8192)
    size: str = option(
        "small", "small = PDN-S (EfficientAD-S), medium = PDN-M (EfficientAD-M)", choices=("small", "medium")
    )
    teacher_path: str = option(
        "", "distilled teacher (.safetensors from `flawscope distill`); needed to fit with pretrained weights"
    )
    out_channels: int = option(384, "teacher output channels C; the student has 2C", low=1, high=4096)
    padding: str = option(
        "paper",
        "paper: padded PDN (64x64 maps at 256 px), quantiles on maps resized to the input; code: the public "
        "code's unpadded PDN (56x56 maps), quantiles on the raw maps, combined map zero-padded by 4",
        choices=("paper", "code"),
    )
    map_weight_st: float = option(
        0.5, "weight of the local (student-teacher) map in the combined map; the global map gets 1 - it", low=0, high=1
    )
    num_steps: int = option(70_000, "training iterations", low=1)
    batch_size: int = option(1, "training images per iteration", low=1)
    lr: float = option(1e-4, "Adam learning rate (student and autoencoder)", low=0, low_open=True)
    weight_decay: float = option(1e-5, "Adam weight decay", low=0)
    train_precision: str = train_precision_option()
    lr_drop_ratio: float = option(
        0.95, "the learning rate is multiplied by 0.1 after this share of the steps", low=0, high=1, low_open=True
    )
    hard_quantile: float = option(
        0.999, "p_hard of the hard-feature loss; 0 = plain student-teacher loss", low=0, high=1, high_open=True
    )
    penalty_images: str = option(
        "", "folder of natural images (ImageNet or Imagenette train) for the penalty loss; '' = penalty off"
    )
    penalty_gray_prob: float = option(0.3, "probability a penalty image is converted to grayscale", low=0, high=1)
    ae_aug_strength: float = option(
        0.2, "autoencoder branch: brightness, contrast or saturation factor ~ U(1 - s, 1 + s)", low=0, high=1
    )
    map_normalization: str = option(
        "quantile",
        "quantile: the validation maps' quantile_a -> 0 and quantile_b -> 0.1 (the paper); gaussian: their mean -> 0 "
        "and standard deviation -> 1 (the ablation baseline of the paper's Table 4)",
        choices=("quantile", "gaussian"),
    )
    quantile_a: float = option(0.9, "validation quantile mapped to 0", low=0, high=1, low_open=True, high_open=True)
    quantile_b: float = option(0.995, "validation quantile mapped to 0.1", low=0, high=1, low_open=True, high_open=True)
    quantile_images: str = option(
        "",
        "folder whose images (all of them, searched recursively, taken as good) set the map quantiles (MVTec LOCO's "
        "validation/, as the public code); the model then trains on every training image; '' = hold out "
        "validation_ratio of them",
    )
    validation_ratio: float = option(
        0.1,
        "share of the training images fit holds out for the map quantiles (without quantile_images)",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % 32:
            raise ConfigError(
                f"EfficientAD needs an image_size divisible by 32 (the autoencoder halves it five times); got "
                f"{self.image_size}. Use 256 (paper), 224, 288, ..."
            )
        if not self.quantile_a < self.quantile_b:
            raise ConfigError(f"quantile_a ({self.quantile_a}) must be smaller than quantile_b ({self.quantile_b}).")

    @property
    def padded(self) -> bool:
        return self.padding == "paper"

    def map_size(self) -> int:
        """Side of the PDN output grid: image_size / 4 (padded) or image_size / 4 - 8 (unpadded)."""
        return self.image_size // 4 - (0 if self.padded else 2 * UNPADDED_BORDER)


class PDN(nn.Sequential):
    """Patch description network (spec 2.3 / 2.4): 33x33 receptive field, output stride 4.

    Layer names (``conv1`` ...) are those of anomalib's PDN, so its state dicts load unchanged.

    Args:
        size: "small" (PDN-S, 4 convs) or "medium" (PDN-M, 6 convs, doubled hidden widths, two 1x1 convs).
        out_channels: 384 for a teacher, 768 for a student.
        padded: the paper's padding (3, 1, 3, 1, 1, 0); False gives the public code's unpadded network.
    """

    def __init__(self, size: str, out_channels: int, padded: bool = True) -> None:
        p = 1 if padded else 0
        if size == "small":
            layers = [
                ("conv1", nn.Conv2d(3, 128, 4, padding=3 * p)), ("relu1", nn.ReLU()),
                ("avgpool1", nn.AvgPool2d(2, 2, padding=p)),
                ("conv2", nn.Conv2d(128, 256, 4, padding=3 * p)), ("relu2", nn.ReLU()),
                ("avgpool2", nn.AvgPool2d(2, 2, padding=p)),
                ("conv3", nn.Conv2d(256, 256, 3, padding=p)), ("relu3", nn.ReLU()),
                ("conv4", nn.Conv2d(256, out_channels, 4)),
            ]  # fmt: skip
        elif size == "medium":
            layers = [
                ("conv1", nn.Conv2d(3, 256, 4, padding=3 * p)), ("relu1", nn.ReLU()),
                ("avgpool1", nn.AvgPool2d(2, 2, padding=p)),
                ("conv2", nn.Conv2d(256, 512, 4, padding=3 * p)), ("relu2", nn.ReLU()),
                ("avgpool2", nn.AvgPool2d(2, 2, padding=p)),
                ("conv3", nn.Conv2d(512, 512, 1)), ("relu3", nn.ReLU()),
                ("conv4", nn.Conv2d(512, 512, 3, padding=p)), ("relu4", nn.ReLU()),
                ("conv5", nn.Conv2d(512, out_channels, 4)), ("relu5", nn.ReLU()),
                ("conv6", nn.Conv2d(out_channels, out_channels, 1)),
            ]  # fmt: skip
        else:
            raise ConfigError(f"Unknown PDN size {size!r}; use 'small' or 'medium'.")
        super().__init__(OrderedDict(layers))


class AutoEncoder(nn.Module):
    """The autoencoder of spec 2.6: strided convs to a 64x1x1 code, bilinear upsampling back to the PDN grid.

    At 256 px the layers are exactly the spec's table. Other sizes (multiples of 32) scale the upsampling targets
    as anomalib does (s/64 - 1, s/32, s/16 - 1, s/8, s/4 - 1, s/2 - 1, then the map size), and the last encoder
    kernel equals the encoder's final grid (s/32; 8 at 256) so the bottleneck stays 64x1x1.

    Args:
        out_channels: C (384).
        image_size: input side s.
        map_size: output side, the PDN grid (s/4 padded, s/4 - 8 unpadded).
    """

    def __init__(self, out_channels: int, image_size: int, map_size: int) -> None:
        super().__init__()
        enc = [("enconv1", nn.Conv2d(3, 32, 4, stride=2, padding=1))]
        for i, (c_in, c_out) in enumerate([(32, 32), (32, 64), (64, 64), (64, 64)], start=2):
            enc += [(f"relu{i - 1}", nn.ReLU()), (f"enconv{i}", nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))]
        enc += [("relu5", nn.ReLU()), ("enconv6", nn.Conv2d(64, 64, image_size // 32))]
        self.encoder = nn.Sequential(OrderedDict(enc))

        s = image_size
        sizes = [max(1, s // 64 - 1), s // 32, s // 16 - 1, s // 8, s // 4 - 1, s // 2 - 1]
        dec: list[tuple[str, nn.Module]] = []
        for i, side in enumerate(sizes, start=1):
            dec += [
                (f"upsample{i}", nn.Upsample(size=side, mode="bilinear", align_corners=False)),
                (f"deconv{i}", nn.Conv2d(64, 64, 4, padding=2)),
                (f"relu{i}", nn.ReLU()),
                (f"dropout{i}", nn.Dropout(0.2)),
            ]
        dec += [
            ("upsample7", nn.Upsample(size=map_size, mode="bilinear", align_corners=False)),
            ("deconv7", nn.Conv2d(64, 64, 3, padding=1)),
            ("relu7", nn.ReLU()),
            ("deconv8", nn.Conv2d(64, out_channels, 3, padding=1)),
        ]
        self.decoder = nn.Sequential(OrderedDict(dec))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, s, s) ImageNet-normalised -> (B, C, m, m)."""
        return self.decoder(self.encoder(x))


def quantile_normalize(anomaly_map: Tensor, q_a: Tensor, q_b: Tensor) -> Tensor:
    """Spec 2.9: M^ = 0.1 (M - q_a) / (q_b - q_a), so q_a -> 0 and q_b -> 0.1."""
    return 0.1 * (anomaly_map - q_a) / (q_b - q_a).clamp_min(1e-12)


class EfficientAD(AnomalyModel):
    """EfficientAD's inference module; training lives in ``fit.py``, teacher distillation in ``distill.py``.

    Buffers:
        teacher_mean, teacher_std: (1, C, 1, 1) per-channel statistics of the teacher on the training images.
        qa_st, qb_st, qa_ae, qb_ae: () validation quantiles of the local (ST) and global (AE) maps.

    Args:
        config: the hyperparameters.
        pretrained: load the distilled teacher from ``config.teacher_path`` (or ``weights_path``); False leaves
            it random (tests, or before ``load_state_dict`` of a saved model, whose state holds the teacher).
        weights_path: a teacher file; overrides ``config.teacher_path`` (the CLI's ``--weights``).

    Raises:
        ConfigError: ``pretrained`` and no teacher file was given, or it is of another PDN size.
        WeightsNotFoundError: the teacher file does not exist.
    """

    method = "efficientad"
    config_class = EfficientADConfig

    def __init__(self, config: EfficientADConfig, pretrained: bool = True, weights_path: str | Path | None = None):
        if weights_path is not None:
            config = config.replace(teacher_path=str(weights_path))
        super().__init__(config)
        channels = config.out_channels
        self.teacher = PDN(config.size, channels, config.padded)
        self.student = PDN(config.size, 2 * channels, config.padded)
        self.autoencoder = AutoEncoder(channels, config.image_size, config.map_size())
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("teacher_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, channels, 1, 1))
        for name in ("qa_st", "qb_st", "qa_ae", "qb_ae"):
            self.register_buffer(name, torch.tensor(0.0 if name.startswith("qa") else 1.0))
        self.teacher_info: dict[str, Any] = {"source": "random (pretrained=False)"}
        if pretrained:
            state, self.teacher_info = load_teacher(config.teacher_path, config.size, self.teacher.state_dict())
            distilled_from = self.teacher_info.get("backbone")
            if config.backbone not in ("pdn", distilled_from):  # e.g. one --backbone for every model of a benchmark
                warnings.warn(
                    f"efficientad does not use backbone={config.backbone}: its features come from the distilled "
                    f"teacher {config.teacher_path} (distilled from {distilled_from or 'an unrecorded network'}), "
                    "which is used as given. To use that network, distil a teacher from it: flawscope distill "
                    f"--backbone {config.backbone} --size {config.size} --image-size {config.image_size} "
                    "--images DIR --out TEACHER.",
                    stacklevel=2,
                )
            self.teacher.load_state_dict(state)
            distilled_at = self.teacher_info.get("image_size")
            if isinstance(distilled_at, int) and distilled_at != config.image_size:
                warnings.warn(
                    f"The teacher {config.teacher_path} was distilled at {distilled_at} px and this model's input is "
                    f"{config.image_size} px: the teacher then sees its features at another scale than it learnt "
                    f"them, which costs accuracy. Use --image-size {distilled_at}, or distil a teacher at "
                    f"{config.image_size} (flawscope distill --image-size {config.image_size}).",
                    stacklevel=2,
                )
        self.teacher.requires_grad_(False)

    def normalize_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> ImageNet-normalised, the input of all three networks."""
        return (images - self.image_mean) / self.image_std

    def teacher_features(self, x: Tensor) -> Tensor:
        """x (B, 3, s, s) normalised -> T^ = (T(x) - mu) / sigma, (B, C, m, m)."""
        return (self.teacher(x) - self.teacher_mean) / self.teacher_std

    def raw_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, s, s) in [0, 1] -> local and global maps (B, 1, m, m), before normalisation."""
        x = self.normalize_images(images)
        channels = self.config.out_channels
        teacher = self.teacher_features(x)
        student = self.student(x)
        autoencoder = self.autoencoder(x)
        map_st = (teacher - student[:, :channels]).pow(2).mean(1, keepdim=True)
        map_ae = (autoencoder - student[:, channels:]).pow(2).mean(1, keepdim=True)
        return map_st, map_ae

    def raw_scores(self, images: Tensor) -> tuple[Tensor, Tensor]:
        map_st, map_ae = self.raw_maps(images)
        weight = self.config.map_weight_st
        combined = weight * quantile_normalize(map_st, self.qa_st, self.qb_st) + (1 - weight) * quantile_normalize(
            map_ae, self.qa_ae, self.qb_ae
        )
        if not self.config.padded:
            # The public code: the unpadded grid is the interior of the padded one; 0 is the q_a level.
            combined = F.pad(combined, (UNPADDED_BORDER,) * 4)
        anomaly_map = F.interpolate(combined, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return anomaly_map, anomaly_map.flatten(1).amax(dim=1)


def _distill_recipe(size: str) -> str:
    return (
        "Distil one once with `flawscope distill --backbone wide_resnet101_2 --images IMAGENET_TRAIN_DIR "
        f"--size {size} --out teacher.safetensors` (offline: --backbone efficientnet_lite0 and any folder of natural "
        "photos), then fit with `--set teacher_path=teacher.safetensors`."
    )


def _teacher_missing_message(size: str) -> str:
    return (
        "EfficientAD needs a distilled teacher (a PDN trained to imitate a pretrained backbone) and none was given: "
        "teacher_path is empty. " + _distill_recipe(size)
    )


def load_teacher(path: str | Path, size: str, expected: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Reads a teacher PDN's weights and what is known about how it was made.

    Accepts the ``.safetensors`` files of ``flawscope distill`` and plain state dicts (``.pth``, read with
    ``weights_only=True``) whose tensors are a PDN's in order, e.g. anomalib's ``conv1.weight`` naming.

    Args:
        path: the file.
        size: the model's PDN size, checked against the file's metadata.
        expected: the teacher PDN's own state dict (names and shapes to fill).

    Returns:
        (state dict for the teacher PDN, metadata dict).
    """
    if not str(path):
        raise ConfigError(_teacher_missing_message(size))
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"Teacher file {path} does not exist; check the path. " + _distill_recipe(size))
    info: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            info = json.loads(metadata.get(TEACHER_METADATA_KEY, "{}"))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ModelFormatError(f"Cannot read teacher file {path}: {str(e)[:300]}") from e
        if CHECKPOINT_KEY in metadata:
            teacher = path.name.removesuffix(".ckpt.safetensors")
            raise ModelFormatError(
                f"{path} is the resume checkpoint of `flawscope distill`, not a teacher. Use the teacher file it "
                f"wrote next to it ({teacher}), or finish the distillation by running the same command again."
            )
    try:
        state = load_weights_file(path)  # never unpickles objects; a damaged file is a ModelFormatError
    except ModelFormatError as e:
        raise ModelFormatError(
            f"Teacher file {path} is neither a safetensors file nor a torch state dict of a PDN: {e} Give the "
            ".safetensors file that `flawscope distill` wrote."
        ) from e
    if info.get("size", size) != size:
        raise ConfigError(
            f"Teacher {path} is a PDN-{info['size']} teacher but the model has size={size!r}. Set "
            f"size={info['size']} or distil a {size} teacher."
        )
    state = _match_pdn_state(state, expected, path)
    broken = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if broken:  # else fit fails later, blaming its own options
        raise ModelFormatError(
            f"Teacher file {path} holds NaN or infinite weights ({broken[0]}{' and others' if len(broken) > 1 else ''})"
            ": its distillation diverged. Distil it again with a smaller --lr."
        )
    return state, {"source": str(path), **info}


def _match_pdn_state(state: Any, expected: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Maps a state dict onto the PDN's keys: by name, else by order (natural sort), checking every shape."""
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelFormatError(f"Teacher file {path} does not hold a plain state dict of tensors.")
    if set(state) != set(expected):

        def natural(key: str) -> list[tuple[int, int, str]]:
            # Layer numbers compare as numbers (conv10 after conv9) and a layer's weight comes before its bias.
            key = ".".join({"weight": "0", "bias": "1"}.get(part, part) for part in key.split("."))
            return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key)]

        values = [state[k] for k in sorted(state, key=natural)]
        if len(values) != len(expected):
            raise ModelFormatError(
                f"Teacher file {path} has {len(values)} tensors; a PDN of this size has {len(expected)}: it is not "
                "a PDN teacher of this size (a backbone's weights, or a teacher of the other size?)."
            )
        state = dict(zip(expected, values, strict=True))
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ModelFormatError(
                f"Teacher file {path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)} "
                "(wrong size or out_channels?)."
            )
    return state
