"""The named backbones: which timm architecture each one builds, and where its weights come from.

ResNets are built with timm, whose ``resnet18/50`` and ``wide_resnet50_2/101_2`` are torchvision's architectures
with torchvision's parameter names, so torchvision's ImageNet files load into them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from .efficientnet_lite import LITE_MEAN, LITE_STD, convert_lite_state_dict, lite_weights_source
from .weights import WeightsSource, find_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

StateDictConverter = Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]


@dataclass(frozen=True)
class NamedBackbone:
    """One entry of the registry.

    Attributes:
        timm_arch: the timm model built (without its pretrained weights).
        weights: where its weight file lives.
        mean: per-channel input mean the weights expect, for images in [0, 1].
        std: per-channel input std the weights expect.
        convert: maps the weight file's keys onto ``timm_arch``; None when they already match.
    """

    timm_arch: str
    weights: WeightsSource
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    convert: StateDictConverter | None = None


def _torchvision(arch: str, file_hash: str) -> NamedBackbone:
    filename = f"{arch}-{file_hash}.pth"
    source = WeightsSource(
        filename=filename,
        description="torchvision IMAGENET1K_V1",
        url=f"https://download.pytorch.org/models/{filename}",
        hf_hub_id=f"timm/{arch}.tv_in1k",  # timm's mirror of the same torchvision weights
    )
    return NamedBackbone(timm_arch=arch, weights=source)


def _lite(variant: int) -> NamedBackbone:
    return NamedBackbone(
        timm_arch=f"tf_efficientnet_lite{variant}",
        weights=lite_weights_source(variant),
        mean=LITE_MEAN,
        std=LITE_STD,
        convert=convert_lite_state_dict,
    )


NAMED_BACKBONES: dict[str, NamedBackbone] = {
    "resnet18": _torchvision("resnet18", "f37072fd"),
    "resnet50": _torchvision("resnet50", "0676ba61"),
    "resnet101": _torchvision("resnet101", "63fe2227"),
    "wide_resnet50_2": _torchvision("wide_resnet50_2", "95faca4d"),
    "wide_resnet101_2": _torchvision("wide_resnet101_2", "32ee1156"),
    "efficientnet_lite0": _lite(0),
    "efficientnet_lite1": _lite(1),
    "efficientnet_lite2": _lite(2),
}


def available_backbones() -> list[str]:
    """The named backbones, sorted. Any timm model also works as ``timm:<name>``."""
    return sorted(NAMED_BACKBONES)


def weights_status() -> dict[str, str]:
    """Where each named backbone's weights were found offline, or ``"missing (need FILE)"``. Never downloads."""
    status = {}
    for name in available_backbones():
        source = NAMED_BACKBONES[name].weights
        found = find_weights(source)
        status[name] = str(found) if found is not None else f"missing (need {source.filename})"
    return status
