"""PatchCore-style local neighbourhood features, shared by PatchCore, SimpleNet and later methods.

The recipe is the public PatchCore/SimpleNet code's (see ``shared/specs/simplenet.md`` section 2.3):

1. unfold each stage with a ``patch_size`` window (stride 1, zero padding), keeping the raw C x p x p neighbourhood;
2. resize every stage's unfolded map bilinearly to the finest grid;
3. reduce each stage's flattened neighbourhood (length C * p * p, order (c, ky, kx)) to ``pretrain_dim`` with
   1-D adaptive average pooling;
4. stack the stages and pool the concatenation once more to ``target_dim``.

Optionally (``context_weight`` > 0, not in PatchCore or SimpleNet), each location's feature is followed by the image's
mean feature times ``context_weight``: then a feature says both what a location looks like and what the image it
sits in looks like, so a region that is normal somewhere but not in this image (a band of a tile ground
differently) can be told apart. The output has ``2 * target_dim`` channels then.

Steps 3 and 4 are fixed averages, so they run as one precomputed matrix per stage, applied before the resizing of
step 2 (both are linear, so the order does not change the result): one matrix product instead of two adaptive
poolings over C * p * p values at every location of the finest grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _pooling_matrix(in_length: int, out_length: int) -> Tensor:
    """(in_length, out_length) float64 matrix M with x @ M == F.adaptive_avg_pool1d(x, out_length)."""
    # Output i averages inputs floor(i * L / O) .. ceil((i + 1) * L / O) - 1, as torch's adaptive pooling does.
    out = torch.arange(out_length)
    start, end = out * in_length // out_length, ((out + 1) * in_length + out_length - 1) // out_length
    rows = torch.arange(in_length)[:, None]
    return ((rows >= start) & (rows < end)).double() / (end - start).double()


class LocalFeatureAggregator(nn.Module):
    """Turns backbone stages into one feature vector per location of the finest stage.

    Args:
        channels: channels of each stage, the finest first (the backbone's ``feature_info.channels``).
        patch_size: side of the neighbourhood aggregated at each location (3 in PatchCore and SimpleNet).
        pretrain_dim: length each stage's neighbourhood is pooled to.
        target_dim: length of the final feature.
        context_weight: weight of the image's mean feature appended to every location's; 0 = none (the papers).
    """

    def __init__(
        self,
        channels: Sequence[int],
        patch_size: int = 3,
        pretrain_dim: int = 1024,
        target_dim: int = 1024,
        context_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if context_weight < 0:
            raise ValueError(f"context_weight must be >= 0; got {context_weight}.")
        self.context_weight = float(context_weight)
        self.out_dim = target_dim * (2 if context_weight else 1)
        self.channels = tuple(channels)
        self.patch_size = patch_size
        self.pretrain_dim = pretrain_dim
        self.target_dim = target_dim
        # Steps 3 and 4 are fixed averages, so their composition is one (C_i * p * p, target_dim) matrix per stage.
        # Buffers, not parameters: never trained, not saved (rebuilt from the configuration), constants in exports.
        final = _pooling_matrix(len(self.channels) * pretrain_dim, target_dim)  # (L * pretrain_dim, target_dim)
        for index, (c, stage) in enumerate(zip(self.channels, final.split(pretrain_dim), strict=True)):
            projection = (_pooling_matrix(c * patch_size * patch_size, pretrain_dim) @ stage).float()
            self.register_buffer(f"projection{index}", projection, persistent=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Aggregates stages into local features.

        Args:
            features: stage maps, the finest first, each (B, C_i, H_i, W_i) with C_i = ``channels[i]``.

        Returns:
            (B, out_dim, H_0, W_0) local features on the finest grid; ``out_dim`` is ``target_dim``, or twice
            that with the image context appended (channels ``target_dim:``, the same at every location).
        """
        channels = tuple(f.shape[1] for f in features)
        if channels != self.channels:
            raise ValueError(f"LocalFeatureAggregator was built for stage channels {self.channels}; got {channels}.")
        height, width = features[0].shape[2:]
        out = 0
        for index, feature in enumerate(features):
            projection = getattr(self, f"projection{index}")
            patches = F.unfold(feature, self.patch_size, padding=self.patch_size // 2)  # (B, C*p*p, h*w)
            reduced = (patches.transpose(1, 2) @ projection.to(feature.dtype)).transpose(1, 2)  # (B, target, h*w)
            reduced = reduced.unflatten(2, feature.shape[2:])
            if reduced.shape[2:] != (height, width):
                # Bilinear resizing and the channel pooling are both linear, so resizing after the pooling equals
                # the public code's resizing of the raw neighbourhoods first, on target_dim channels, not C*p*p.
                reduced = F.interpolate(reduced, size=(height, width), mode="bilinear", align_corners=False)
            out = out + reduced
        if self.context_weight:
            context = out.mean(dim=(2, 3), keepdim=True) * self.context_weight  # (B, target_dim, 1, 1)
            out = torch.cat([out, context.expand_as(out)], dim=1)
        return out

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, patch_size={self.patch_size}, pretrain_dim={self.pretrain_dim}, "
            f"target_dim={self.target_dim}, context_weight={self.context_weight:g}"
        )
