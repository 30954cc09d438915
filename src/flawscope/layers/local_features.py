"""PatchCore-style local neighbourhood features, shared by PatchCore, SimpleNet and later methods.

The recipe is the public PatchCore/SimpleNet code's (see ``shared/specs/simplenet.md`` section 2.3):

1. unfold each stage with a ``patch_size`` window (stride 1, zero padding), keeping the raw C x p x p neighbourhood;
2. resize every stage's unfolded map bilinearly to the finest grid;
3. reduce each stage's flattened neighbourhood (length C * p * p, order (c, ky, kx)) to ``pretrain_dim`` with
   1-D adaptive average pooling;
4. stack the stages and pool the concatenation once more to ``target_dim``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

    def forward(self, features: list[Tensor]) -> Tensor:
        """Aggregates stages into local features.

        Args:
            features: stage maps, the finest first, each (B, C_i, H_i, W_i).

        Returns:
            (B, target_dim, H_0, W_0) local features on the finest grid.
        """
        batch, _, height, width = features[0].shape
        pooled = []
        for feature in features:
            patches = F.unfold(feature, self.patch_size, padding=self.patch_size // 2)  # (B, C*p*p, h*w)
            patches = patches.unflatten(2, feature.shape[2:])  # (B, C*p*p, h, w)
            if patches.shape[2:] != (height, width):
                patches = F.interpolate(patches, size=(height, width), mode="bilinear", align_corners=False)
            rows = patches.flatten(2).transpose(1, 2).reshape(batch * height * width, 1, -1)  # (N, 1, C*p*p)
            pooled.append(F.adaptive_avg_pool1d(rows, self.pretrain_dim))  # (N, 1, pretrain_dim)
        stacked = torch.cat(pooled, dim=-1)  # (N, 1, L * pretrain_dim), stage order as in the public code
        out = F.adaptive_avg_pool1d(stacked, self.target_dim).squeeze(1)  # (N, target_dim)
        return out.reshape(batch, height, width, self.target_dim).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, pretrain_dim={self.pretrain_dim}, target_dim={self.target_dim}"
