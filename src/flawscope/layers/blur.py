"""Separable Gaussian smoothing that matches ``scipy.ndimage.gaussian_filter`` (mode 'reflect', truncate 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """The normalised 1-D Gaussian scipy uses: radius ``int(truncate * sigma + 0.5)``.

    Returns:
        Tensor of shape (2 * radius + 1,), summing to 1.
    """
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def _reflect_pad(x: Tensor, radius: int, dim: int) -> Tensor:
    # scipy's 'reflect' repeats the edge sample (d c b a | a b c d); torch's 'reflect' pad does not, so pad by hand.
    # Padding is applied repeatedly when the radius exceeds the side, as scipy does for large sigmas.
    while radius > 0:
        step = min(radius, x.shape[dim])
        head = x.narrow(dim, 0, step).flip(dim)
        tail = x.narrow(dim, x.shape[dim] - step, step).flip(dim)
        x = torch.cat([head, x, tail], dim=dim)
        radius -= step
    return x


class GaussianBlur2d(nn.Module):
    """Smooths a map with a Gaussian of ``sigma`` pixels per channel.

    Args:
        sigma: standard deviation in pixels; 0 disables smoothing.
        truncate: the kernel stops at ``truncate * sigma`` (scipy's default 4).
    """

    def __init__(self, sigma: float, truncate: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.radius = int(truncate * sigma + 0.5) if sigma > 0 else 0
        kernel = gaussian_kernel1d(sigma, truncate) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        if self.radius == 0:
            return x
        channels = x.shape[1]
        size = self.kernel.numel()
        weight_h = self.kernel.to(x.dtype).view(1, 1, size, 1).expand(channels, 1, size, 1)
        weight_w = self.kernel.to(x.dtype).view(1, 1, 1, size).expand(channels, 1, 1, size)
        x = F.conv2d(_reflect_pad(x, self.radius, 2), weight_h, groups=channels)
        return F.conv2d(_reflect_pad(x, self.radius, 3), weight_w, groups=channels)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, radius={self.radius}"
