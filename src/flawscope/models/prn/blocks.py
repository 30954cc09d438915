"""PRN's trainable blocks: multi-scale fusion (MF), multi-size self-attention (MSA) and the U-Net decoder."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiScaleFusion(nn.Module):
    """Eq. 2: out_j = sum_r f_rj(x_r); identity for r = j, a strided conv down, bilinear up + 1x1 conv up.

    Down (r < j): stride s = 2^(j-r), kernel s + 1, padding s / 2. ``separable`` (paper: "depth-wise separable")
    is a depthwise conv followed by a pointwise c_r -> c_j conv; ``grouped`` (xcyao00) one conv c_r -> c_j with
    groups = gcd(c_r, c_j). No normalisation or activation (none in the paper).

    Args:
        channels: c_j of each scale, finest first; scale j has twice the stride of scale j - 1.
        downsample: "separable" or "grouped".
        align_corners: of the bilinear upsampling (xcyao00: True).
    """

    def __init__(self, channels: Sequence[int], downsample: str = "separable", align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.paths = nn.ModuleDict()
        for r, c_r in enumerate(channels):
            for j, c_j in enumerate(channels):
                if r < j:
                    s = 2 ** (j - r)
                    if downsample == "separable":
                        path = nn.Sequential(nn.Conv2d(c_r, c_r, s + 1, s, s // 2, groups=c_r), nn.Conv2d(c_r, c_j, 1))
                    else:
                        path = nn.Conv2d(c_r, c_j, s + 1, s, s // 2, groups=math.gcd(c_r, c_j))
                    self.paths[f"{r}to{j}"] = path
                elif r > j:
                    self.paths[f"{r}to{j}"] = nn.Conv2d(c_r, c_j, 1)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        """[(B, c_j, h_j, w_j)] -> [(B, c_j, h_j, w_j)]."""
        out = []
        for j, target in enumerate(maps):
            total = target
            for r, source in enumerate(maps):
                if r < j:
                    total = total + self.paths[f"{r}to{j}"](source)
                elif r > j:
                    up = F.interpolate(
                        source, size=target.shape[-2:], mode="bilinear", align_corners=self.align_corners
                    )
                    total = total + self.paths[f"{r}to{j}"](up)
            out.append(total)
        return out


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a 1x1 shortcut, then ReLU (spec P11, xcyao00 ``ResidualBlock``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.main(x) + self.shortcut(x))


def patchify(x: Tensor, patch: int) -> Tensor:
    """(B, C, h, w) with h, w multiples of ``patch`` -> (B, N, C * patch^2), N = (h / patch)(w / patch)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: Tensor, channels: int, size: int, patch: int) -> Tensor:
    """Inverse of :func:`patchify` for a square (size x size) map."""
    b, n = tokens.shape[:2]
    g = size // patch
    x = tokens.reshape(b, g, g, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, size, size)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(Q K^T x scale) V over tokens: (B, N, d) each -> (B, N, d)."""
    return torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1) @ v


class MultiSizeAttention(nn.Module):
    """One MSA block (Eq. 3): 4 heads, head s attends among p_s x p_s patches; concat; residual block.

    Patch size p = ceil(h / d) for each divisor d (the paper's h / 2^(s-1) when h is a multiple of 8); the map is
    zero-padded on the bottom/right to a multiple of p and cropped back after attention.

    Q/K/V projections (spec P9): ``conv1x1`` applies a 1x1 convolution C -> C per head and per Q/K/V before
    patchifying, i.e. a linear map on each patch vector whose weights are shared over its p^2 positions;
    ``diag`` multiplies each element of the patch vector by its own weight and adds a bias (xcyao00's grouped
    Conv1d). Scale ``1/d`` divides the logits by the token length d = C p^2 (paper), ``1/sqrt(d)`` by its root.

    Args:
        channels: C = 2 c_j of the input map.
        size: side h of the (square) input map.
        divisors: one head per divisor.
        qkv: "conv1x1" or "diag".
        attn_scale: "1/d" or "1/sqrt(d)".
    """

    def __init__(
        self, channels: int, size: int, divisors: Sequence[int], qkv: str = "conv1x1", attn_scale: str = "1/d"
    ) -> None:
        super().__init__()
        self.channels, self.size, self.qkv = channels, size, qkv
        self.patches = [math.ceil(size / d) for d in divisors]
        heads = len(self.patches)
        if qkv == "conv1x1":
            self.projection = nn.Conv2d(channels, 3 * heads * channels, 1)
        else:
            self.weight = nn.ParameterList(nn.Parameter(torch.ones(3, channels, p, p)) for p in self.patches)
            self.bias = nn.ParameterList(nn.Parameter(torch.zeros(3, channels, p, p)) for p in self.patches)
        dims = [channels * p * p for p in self.patches]
        self.scales = [1.0 / d if attn_scale == "1/d" else 1.0 / math.sqrt(d) for d in dims]
        self.block = ResidualBlock(heads * channels, channels)

    def _head(self, q: Tensor, k: Tensor, v: Tensor, patch: int, scale: float) -> Tensor:
        """(B, C, h, w) each -> (B, C, h, w), attention among the p x p patches of the padded map."""
        padded = math.ceil(self.size / patch) * patch
        pad = (0, padded - self.size, 0, padded - self.size)
        q, k, v = (patchify(F.pad(t, pad), patch) for t in (q, k, v))
        out = unpatchify(attention(q, k, v, scale), self.channels, padded, patch)
        return out[..., : self.size, : self.size]

    def _diagonal(self, x: Tensor, weight: Tensor, bias: Tensor) -> list[Tensor]:
        """Per-element Q/K/V: each patch vector times its own (C, p, p) weights plus bias, tiled over the grid."""
        grid = math.ceil(self.size / weight.shape[-1])
        weight = weight.repeat(1, 1, grid, grid)[..., : self.size, : self.size]
        bias = bias.repeat(1, 1, grid, grid)[..., : self.size, : self.size]
        return [x * weight[i] + bias[i] for i in range(3)]

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        if self.qkv == "conv1x1":
            projected = self.projection(x).chunk(3 * len(self.patches), dim=1)
            qkv = [projected[3 * s : 3 * s + 3] for s in range(len(self.patches))]
        else:
            qkv = [self._diagonal(x, weight, bias) for weight, bias in zip(self.weight, self.bias, strict=True)]
        heads = [
            self._head(q, k, v, patch, scale)
            for (q, k, v), patch, scale in zip(qkv, self.patches, self.scales, strict=True)
        ]
        return self.block(torch.cat(heads, dim=1))


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNetDecoder(nn.Module):
    """Spec §2.6 (xcyao00 ``PRNet``): from the deepest map, up x2 + conv, concat a skip, two convs; three times;
    then up to the input size + conv, and a 3x3 conv to one logit channel.

    Args:
        deep_channels: channels of the decoder's start (layer4).
        skip_channels: channels of the skips, coarsest first (2 c_3, 2 c_2, 2 c_1).
        widths: decoder widths after each skip and at full resolution, e.g. (256, 128, 64, 64).
    """

    def __init__(self, deep_channels: int, skip_channels: Sequence[int], widths: Sequence[int]) -> None:
        super().__init__()
        if len(widths) != len(skip_channels) + 1:
            raise ValueError(f"decoder_channels needs {len(skip_channels) + 1} widths; got {tuple(widths)}.")
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        previous = deep_channels
        for skip, width in zip(skip_channels, widths, strict=False):
            self.up.append(_conv_bn_relu(previous, width))
            self.blocks.append(nn.Sequential(_conv_bn_relu(width + skip, width), _conv_bn_relu(width, width)))
            previous = width
        self.final_up = _conv_bn_relu(previous, widths[-1])
        self.head = nn.Conv2d(widths[-1], 1, 3, padding=1)

    def forward(self, deep: Tensor, skips: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """deep (B, C4, h4, w4), skips coarsest first -> logits (B, 1, *size)."""
        x = deep
        for up, block, skip in zip(self.up, self.blocks, skips, strict=True):
            x = up(F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True))
            x = block(torch.cat([x, skip], dim=1))
        x = self.final_up(F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True))
        return self.head(x)
