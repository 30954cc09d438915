"""PatchCore-style local neighbourhood features, shared by PatchCore, SimpleNet and later methods.

The recipe is the public PatchCore/SimpleNet code's (see ``shared/specs/simplenet.md`` section 2.3):

1. unfold each stage with a ``patch_size`` window (stride 1, zero padding), keeping the raw C x p x p neighbourhood;
2. resize every stage's unfolded map bilinearly to the finest grid;
3. reduce each stage's flattened neighbourhood (length C * p * p, order (c, ky, kx)) to ``pretrain_dim`` with
   1-D adaptive average pooling;
4. stack the stages and pool the concatenation once more to ``target_dim``.

Steps 3 and 4 are fixed averages, so they run as one precomputed matrix per stage, applied before the resizing of
step 2 (both are linear, so the order does not change the result): one matrix product instead of two adaptive
poolings over C * p * p values at every location of the finest grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _pooling_matrix(in_length: int, out_length: int) -> Tensor:
    """(in_length, out_length) float64 matrix M with x @ M == F.adaptive_avg_pool1d(x, out_length)."""
    eye = torch.eye(in_length, dtype=torch.float64)[:, None, :]
    return F.adaptive_avg_pool1d(eye, out_length)[:, 0, :]


class LocalFeatureAggregator(nn.Module):
    """Turns backbone stages into one feature vector per location of the finest stage.

    Args:
        patch_size: side of the neighbourhood aggregated at each location (3 in PatchCore and SimpleNet).
        pretrain_dim: length each stage's neighbourhood is pooled to.
        target_dim: length of the final feature.
    """

    def __init__(self, patch_size: int = 3, pretrain_dim: int = 1024, target_dim: int = 1024) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.pretrain_dim = pretrain_dim
        self.target_dim = target_dim
        self._projections: dict[tuple, list[Tensor]] = {}

    def forward(self, features: list[Tensor]) -> Tensor:
        """Aggregates stages into local features.

        Args:
            features: stage maps, the finest first, each (B, C_i, H_i, W_i).

        Returns:
            (B, target_dim, H_0, W_0) local features on the finest grid.
        """
        height, width = features[0].shape[2:]
        projections = self.projections([f.shape[1] for f in features], features[0].dtype, features[0].device)
        out = 0
        for feature, projection in zip(features, projections, strict=True):
            patches = F.unfold(feature, self.patch_size, padding=self.patch_size // 2)  # (B, C*p*p, h*w)
            reduced = (patches.transpose(1, 2) @ projection).transpose(1, 2)  # (B, target_dim, h*w)
            reduced = reduced.unflatten(2, feature.shape[2:])
            if reduced.shape[2:] != (height, width):
                # Bilinear resizing and the channel pooling are both linear, so resizing after the pooling equals
                # the public code's resizing of the raw neighbourhoods first, on target_dim channels, not C*p*p.
                reduced = F.interpolate(reduced, size=(height, width), mode="bilinear", align_corners=False)
            out = out + reduced
        return out

    def projections(self, channels: list[int], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """The two adaptive average poolings of each stage as one matrix: (C_i * p * p, target_dim) per stage.

        Step 3 pools each stage's neighbourhood to ``pretrain_dim`` and step 4 pools the concatenation of the
        stages to ``target_dim``; both are fixed averages, so their composition is one matrix per stage and the
        aggregation is one matrix product (the same values as the two poolings, up to float rounding).
        """
        key = (tuple(channels), dtype, device)
        if key not in self._projections:
            area = self.patch_size * self.patch_size
            final = _pooling_matrix(len(channels) * self.pretrain_dim, self.target_dim)  # (L * pretrain, target)
            stages = final.split(self.pretrain_dim)
            self._projections[key] = [
                (_pooling_matrix(c * area, self.pretrain_dim) @ stage).to(dtype=dtype, device=device)
                for c, stage in zip(channels, stages, strict=True)
            ]
        return self._projections[key]

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, pretrain_dim={self.pretrain_dim}, target_dim={self.target_dim}"
