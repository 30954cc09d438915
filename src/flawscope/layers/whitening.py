"""Per-position whitening: PaDiM's per-position Gaussian as a feature normalisation, for aligned parts.

When every image shows the part in the same place (tiles, boards, labels), the normal feature at grid position p
follows its own Gaussian N(mu_p, Sigma_p) (Defard et al., PaDiM, 2020). Whitening each position with it,
z = W_p (x - mu_p) with Sigma_p + eps I = L_p L_p^T and W_p = L_p^-1, makes the training features of every position
zero-mean with about unit covariance, so what is normal no longer depends on where it is; the length of z is PaDiM's
Mahalanobis distance. A model that sits on top (SimpleNet's adaptor and discriminator) then only has to learn one
boundary for all positions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..errors import ConfigError

# Values (positions x D x D) of the covariances finished at once: 2**24 float64 values = 128 MiB a temporary.
VALUES_PER_STEP = 2**24


class PositionWhitening(nn.Module):
    """Whitens each of P grid positions with its training Gaussian; the identity until fitted.

    Buffers:
        mean: (P, D) per-position mean of the training features; (0, D) when not fitted.
        matrix: (P, D, D) per-position whitening W_p = L_p^-1 (lower triangular); (0, D, D) when not fitted.

    Args:
        dim: feature length D.
        shrinkage: eps of Sigma_p + eps I (PaDiM: 0.01), which keeps W_p finite when there are fewer training
            images than feature channels.
    """

    def __init__(self, dim: int, shrinkage: float = 0.01) -> None:
        super().__init__()
        self.shrinkage = float(shrinkage)
        self.register_buffer("mean", torch.zeros(0, dim))
        self.register_buffer("matrix", torch.zeros(0, dim, dim))

    @property
    def fitted(self) -> bool:
        return len(self.mean) > 0

    @torch.no_grad()
    def fit(self, chunks: Iterable[Tensor]) -> None:
        """Sets mean and matrix from the training features in one pass (sums and outer products, float64).

        Memory: the float64 sums of outer products (P, D, D), accumulated in place, and the float32 result; the
        covariances are finished a few positions at a time (about ``VALUES_PER_STEP`` values), never all
        together.

        Args:
            chunks: the training features as (b, P, D) tensors, a few images at a time, so the features never have
                to be in memory together.

        Raises:
            ConfigError: fewer than 2 images, a chunk of another shape, or a singular covariance.
        """
        count, total, outer = 0, None, None
        dim = self.mean.shape[1]
        for chunk in chunks:
            if chunk.ndim != 3 or chunk.shape[2] != dim or (total is not None and chunk.shape[1] != len(total)):
                raise ConfigError(
                    f"Per-position whitening takes (images, positions, {dim}) feature chunks, all with the same "
                    f"positions; got {tuple(chunk.shape)}. Pass features of the layer's dim at one input size."
                )
            chunk = chunk.double().transpose(0, 1)  # (P, b, D)
            if outer is None:
                total = chunk.new_zeros(chunk.shape[0], chunk.shape[2])
                outer = chunk.new_zeros(chunk.shape[0], chunk.shape[2], chunk.shape[2])
            count += chunk.shape[1]
            total += chunk.sum(1)
            outer.baddbmm_(chunk.transpose(1, 2), chunk)  # += sum over images of x x^T, per position
        if count < 2:
            raise ConfigError(f"Per-position whitening needs at least 2 training images; got {count}.")
        mean = total / count  # (P, D)
        eye = torch.eye(dim, dtype=mean.dtype, device=mean.device)
        matrix = torch.empty(outer.shape, dtype=self.matrix.dtype, device=mean.device)
        step = max(1, VALUES_PER_STEP // (dim * dim))
        for start in range(0, len(mean), step):
            part = slice(start, start + step)
            centred = outer[part] - count * mean[part, :, None] * mean[part, None, :]
            cov = centred / (count - 1) + self.shrinkage * eye
            factor, info = torch.linalg.cholesky_ex(cov)
            if bool((info != 0).any()):
                raise ConfigError(
                    f"A per-position covariance is singular ({count} training images for {dim} feature "
                    f"channels, shrinkage {self.shrinkage}). Set position_shrinkage > 0 (PaDiM uses 0.01) or add "
                    "images."
                )
            matrix[part] = torch.linalg.solve_triangular(factor, eye.expand_as(cov), upper=False)
        # On the buffers' device, wherever the chunks were accumulated (PRN gathers them on the CPU).
        self.mean, self.matrix = mean.to(self.mean), matrix.to(self.matrix.device)

    def fit_maps(self, maps: Iterable[Tensor]) -> None:
        """``fit`` on feature maps: (b, D, h, w) chunks, each grid cell a position."""
        self.fit(m.flatten(2).transpose(1, 2) for m in maps)

    def whiten_map(self, feature_map: Tensor) -> Tensor:
        """(B, D, h, w) -> (B, D, h, w), each grid cell whitened with its position's Gaussian; unchanged when not
        fitted."""
        if not self.fitted:
            return feature_map
        return self(feature_map.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(feature_map.shape)

    def forward(self, features: Tensor) -> Tensor:
        """(B, P, D) -> (B, P, D) whitened features; unchanged when not fitted.

        Raises:
            ConfigError: the features have another number of grid positions than the training features had.
        """
        if not self.fitted:
            return features
        if features.shape[1] != len(self.mean):
            raise ConfigError(
                f"This model whitens {len(self.mean)} grid positions, fitted at its training input size; got "
                f"features with {features.shape[1]}. Feed images of the model's image_size."
            )
        return torch.einsum("bpd,ped->bpe", features - self.mean, self.matrix)
