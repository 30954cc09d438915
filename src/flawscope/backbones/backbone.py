"""Frozen feature extractors that return the stages asked for by stride, truncated after the deepest one.

Every backbone is a timm model. Named backbones are built whole, filled with their weight file (strictly: a key
that does not match is an error), then wrapped in ``_StageBlocksNet`` (timm's ``FeatureListNet``, which keeps only
the modules up to the deepest requested stage, able to return several block outputs of a stage). Other timm models
go through timm's own ``features_only`` path with ``out_indices``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import timm
import torch
from timm.models import FeatureInfo as TimmFeatureInfo
from timm.models import FeatureListNet
from torch import Tensor, nn

from ..errors import ConfigError, ModelFormatError
from ..layers.local_features import LocalFeatureAggregator
from .named import NAMED_BACKBONES, NamedBackbone, available_backbones
from .weights import WeightsSource, load_weights_file, resolve_weights

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class FeatureInfo:
    """What a backbone returns: one entry per stage, in the order of ``forward``'s list.

    Attributes:
        channels: channels of each returned map.
        strides: input pixels per feature-map pixel of each returned map, increasing, e.g. (8, 16).
    """

    channels: tuple[int, ...]
    strides: tuple[int, ...]


class _StageBlocksNet(FeatureListNet):
    """timm's ``FeatureListNet`` that can return, for a stage, the outputs of its last n blocks concatenated.

    A stage here is a ``Sequential`` of blocks (a ResNet layer, an EfficientNet stage); every block of a stage has
    the stage's output channels C, so the stage's returned map has n * C channels, the earliest block first. This
    is the CFA code's EfficientNet descriptor ("several feature maps for each scale", ``shared/specs/cfa.md`` A14).

    Args:
        model: the whole timm network, weights already loaded.
        out_indices: timm feature indices of the returned stages, increasing.
        flatten_sequential: as ``FeatureListNet`` (needed when a stage sits one Sequential deep, 'blocks.2').
        blocks: n of each returned stage, in the order of ``out_indices``; 1 = the stage's output only.
    """

    def __init__(
        self, model: nn.Module, out_indices: tuple[int, ...], flatten_sequential: bool, blocks: tuple[int, ...]
    ) -> None:
        super().__init__(model, out_indices=out_indices, flatten_sequential=flatten_sequential)
        count_of = dict(zip(out_indices, blocks, strict=True))  # timm feature index -> n
        self.block_counts = {name: count_of[int(index)] for name, index in self.return_layers.items()}

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W), normalised -> one map per returned stage, (B, n_i * C_i, H / s_i, W / s_i)."""
        out = []
        for name, module in self.items():
            count = self.block_counts.get(name, 0)
            if count <= 1:
                x = module(x)
                if count:
                    out.append(x)
                continue
            kept = []
            for index, block in enumerate(module):
                x = block(x)
                if index >= len(module) - count:
                    kept.append(x)
            out.append(torch.cat(kept, dim=1))
        return out


class Backbone(nn.Module):
    """A frozen feature extractor: normalises its input, returns one feature map per requested stride.

    Parameters never require grad and the module stays in eval mode even when a parent calls ``.train()``,
    so batch-norm statistics are never updated by accident.

    Attributes:
        name: the name it was created with (pass it back to ``create_backbone`` to rebuild it).
        feature_info: channels and strides of the returned maps.
        weights_file: the weight file loaded at creation, or None for random initialisation.
        mean, std: buffers (1, 3, 1, 1), the input normalisation the weights expect.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        feature_info: FeatureInfo,
        mean: Sequence[float],
        std: Sequence[float],
        weights_file: str | None = None,
    ):
        super().__init__()
        self.name = name
        self.feature_info = feature_info
        self.weights_file = weights_file
        self.body = body
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Ignores ``mode``: a frozen backbone always runs in eval mode."""
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Feature maps of a batch.

        Args:
            images: (B, 3, H, W) float in [0, 1]; H and W divisible by the largest stride of the network.

        Returns:
            One map per requested stride s_i: (B, C_i, H / s_i, W / s_i), with C_i = ``feature_info.channels[i]``.
        """
        return self.body((images - self.mean) / self.std)


def create_backbone(
    name: str,
    strides: Sequence[int] = (8, 16),
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    blocks: int | Sequence[int] = 1,
) -> Backbone:
    """Builds a frozen backbone that computes nothing deeper than its deepest requested stride.

    Args:
        name: one of ``available_backbones()``, or any timm model as ``timm:<name>`` (or its plain name).
        strides: the stages to return, by stride, increasing, e.g. (8, 16) for ResNet layer2 and layer3.
        pretrained: load ImageNet weights (found offline first, see ``flawscope.backbones.weights``).
            False gives random weights, as used before ``load_state_dict`` of a saved model.
        weights_path: an explicit weight file (.safetensors or a torch state dict); used when ``pretrained``.
        blocks: how many of the last blocks of each returned stage to concatenate: one count for every stride, or
            one per stride. 1 = each stage's output (the usual); more only for named backbones. The CFA code's
            EfficientNet-B5 descriptor is (5, 3, 1) at strides (4, 8, 16).

    Raises:
        ConfigError: unknown name, a stride the network does not have, or a block count a stage does not have.
        WeightsNotFoundError: ``pretrained`` and the weight file is not available.
        ModelFormatError: the weight file does not fit the architecture.
    """
    strides = _checked_strides(strides)
    counts = _checked_blocks(blocks, strides)
    if name in NAMED_BACKBONES:
        return _create_named(name, NAMED_BACKBONES[name], strides, pretrained, weights_path, counts)
    if any(count > 1 for count in counts):
        raise ConfigError(
            f"Several blocks per stage ('blocks' = {counts}) work with the named backbones only "
            f"({', '.join(available_backbones())}), not with {name!r}. Set 'blocks' (a model's 'backbone_blocks') to "
            "1, or use a named backbone."
        )
    return _create_timm(name, _timm_arch(name), strides, pretrained, weights_path)


def build_named_model(name: str, pretrained: bool = True, weights_path: str | Path | None = None) -> nn.Module:
    """The whole network of a named backbone, classifier included, in eval mode.

    Used to check that a weight file is mapped correctly, by classifying images.

    Raises:
        ConfigError: ``name`` is not one of ``available_backbones()``.
    """
    if name not in NAMED_BACKBONES:
        raise ConfigError(f"Unknown named backbone {name!r}. Available: {', '.join(available_backbones())}.")
    spec = NAMED_BACKBONES[name]
    model = timm.create_model(spec.timm_arch, pretrained=False)
    if pretrained:
        _load_named_weights(model, name, spec, weights_path)
    return model.eval()


def _checked_strides(strides: Sequence[int]) -> tuple[int, ...]:
    strides = tuple(strides)
    increasing = all(a < b for a, b in pairwise(strides))
    if not strides or not all(isinstance(s, int) and s > 0 for s in strides) or not increasing:
        raise ConfigError(
            f"The 'strides' of a backbone must be increasing positive integers, e.g. (8, 16); got {strides!r}."
        )
    return strides


def _checked_blocks(blocks: int | Sequence[int], strides: tuple[int, ...]) -> tuple[int, ...]:
    counts = (blocks,) if isinstance(blocks, int) else tuple(blocks)
    if len(counts) == 1:
        counts = counts * len(strides)
    if len(counts) != len(strides) or not all(isinstance(n, int) and n >= 1 for n in counts):
        raise ConfigError(
            f"The 'blocks' of a backbone must be one positive count for every stride or one per stride "
            f"({len(strides)} strides: {strides}); got {blocks!r}."
        )
    return counts


def _timm_arch(name: str) -> str:
    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        raise ConfigError(
            f"Unknown backbone {name!r}. Available: {', '.join(available_backbones())}; or any timm model as "
            f"'{TIMM_PREFIX}<name>' (see timm.list_models())."
        )
    return arch


def _load_named_weights(model: nn.Module, name: str, spec: NamedBackbone, weights_path: str | Path | None) -> str:
    """Fills ``model`` (the whole network) strictly from its weight file; returns the file's path."""
    path = resolve_weights(name, spec.weights, weights_path)
    state = load_weights_file(path)
    try:
        if spec.convert is not None:
            state = spec.convert(state, model)
        model.load_state_dict(state, strict=True)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise ModelFormatError(
            f"{path} does not fit backbone {name!r} ({spec.weights.description} for timm's {spec.timm_arch}): "
            f"{str(e)[:400]}"
        ) from e
    return str(path)


def _create_named(
    name: str,
    spec: NamedBackbone,
    strides: tuple[int, ...],
    pretrained: bool,
    weights_path: str | Path | None,
    blocks: tuple[int, ...],
) -> Backbone:
    model = timm.create_model(spec.timm_arch, pretrained=False)
    stages = TimmFeatureInfo(model.feature_info, tuple(range(len(model.feature_info))))
    indices, channels = _select_stages(name, stages, strides)  # before looking for weights: fail fast
    for index, stride, count in zip(indices, strides, blocks, strict=True):
        stage = model.get_submodule(model.feature_info[index]["module"])
        available = len(stage) if isinstance(stage, nn.Sequential) else 1
        if count > available:
            raise ConfigError(
                f"Backbone {name!r} has {available} block(s) in its stage at stride {stride}; 'blocks' (a model's "
                f"'backbone_blocks') asks for the last {count}. Use at most {available} there."
            )
    weights_file = _load_named_weights(model, name, spec, weights_path) if pretrained else None
    # Stages one Sequential deep ('blocks.2') are only reachable once the first level of Sequentials is flattened.
    flatten = any("." in model.feature_info[i]["module"] for i in indices)
    body = _StageBlocksNet(model, indices, flatten, blocks)
    channels = tuple(count * c for count, c in zip(blocks, channels, strict=True))
    return Backbone(name, body, FeatureInfo(channels, strides), spec.mean, spec.std, weights_file)


def _create_timm(
    name: str, arch: str, strides: tuple[int, ...], pretrained: bool, weights_path: str | Path | None
) -> Backbone:
    # Built once with random weights only to read which strides exist; the real one is truncated by out_indices.
    probe = timm.create_model(arch, pretrained=False, features_only=True)
    indices, channels = _select_stages(name, probe.feature_info, strides)
    cfg = probe.pretrained_cfg
    weights_file, overlay = None, None
    if pretrained:
        path = resolve_weights(name, _timm_weights_source(name, cfg), weights_path)
        weights_file, overlay = str(path), {"state_dict": load_weights_file(path)}
    body = timm.create_model(
        arch, pretrained=pretrained, pretrained_cfg_overlay=overlay, features_only=True, out_indices=indices
    )
    return Backbone(name, body, FeatureInfo(channels, strides), cfg["mean"], cfg["std"], weights_file)


def _timm_weights_source(name: str, cfg: dict) -> WeightsSource:
    hf_hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if hf_hub_id:
        hf_filename = cfg.get("hf_hub_filename") or "model.safetensors"
        filename = hf_hub_id.split("/")[-1] + Path(hf_filename).suffix
        return WeightsSource(filename, f"timm, hf.co/{hf_hub_id}", hf_hub_id=hf_hub_id, hf_filename=hf_filename)
    if url:
        return WeightsSource(Path(url).name, f"timm, {url}", url=url)
    raise ConfigError(f"timm has no pretrained weights for {name!r}; use pretrained=False or pass weights_path=...")


def _select_stages(
    name: str, stages: TimmFeatureInfo, strides: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """timm stage indices and channels for ``strides``; of several stages at one stride, the deepest."""
    by_stride = {}
    for index, stride, channels in zip(stages.out_indices, stages.reduction(), stages.channels(), strict=True):
        by_stride[stride] = (index, channels)
    missing = [s for s in strides if s not in by_stride]
    if missing:
        raise ConfigError(
            f"Backbone {name!r} has no stage at stride {', '.join(map(str, missing))}; "
            f"available strides: {', '.join(map(str, sorted(by_stride)))}. Set 'strides' to some of these."
        )
    indices, channels = zip(*(by_stride[s] for s in strides), strict=True)
    return tuple(indices), tuple(channels)


def local_feature_extractor(
    backbone: str,
    strides: Sequence[int],
    patch_size: int = 3,
    pretrain_dim: int = 1024,
    target_dim: int = 1024,
    context_weight: float = 0.0,
    *,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
) -> tuple[Backbone, LocalFeatureAggregator]:
    """A frozen backbone at ``strides`` and the aggregator of its stages (PatchCore, SimpleNet, EfficientAD's Psi).

    Returns:
        ``(backbone, aggregator)``: images (B, 3, H, W) -> stage maps -> (B, out_dim, H / strides[0], W /
        strides[0]) local features; the two stay separate modules, so their ``state_dict`` keys do not move.
    """
    extractor = create_backbone(backbone, strides, pretrained=pretrained, weights_path=weights_path)
    channels = extractor.feature_info.channels
    return extractor, LocalFeatureAggregator(channels, patch_size, pretrain_dim, target_dim, context_weight)
