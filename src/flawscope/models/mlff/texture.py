"""MLFF's texture branch: STLNet's texture enhancement module (TEM) and pyramid texture module (PTFEM).

Both rest on quantisation and counting (QCO): the cosine similarity of every pixel feature to a mean feature is
quantised into N soft levels, and the levels are counted (1-D, TEM) or counted in pairs of neighbouring pixels (2-D
co-occurrence, PTFEM). Spec sections 2.3 and 2.4; the equations are reconstructed from STLNet (the paper's [24]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import arange_like


def conv_bn_act(in_ch: int, out_ch: int, kernel: int = 1, act: nn.Module | None = None, dims: int = 2) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> activation (ReLU unless given; ``nn.Identity()`` for none)."""
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
    return nn.Sequential(
        conv(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        norm(out_ch),
        act if act is not None else nn.ReLU(inplace=True),
    )


def quantize_count(similarity: Tensor, num_levels: int, window: str = "spacing") -> tuple[Tensor, Tensor]:
    """Soft quantisation of similarities into ``num_levels`` evenly spaced levels (STLNet's QCO).

    Level n (1-based) of a row is L_n = min + (2n - 1) / (2N) (max - min). A value M_i belongs to level n with
    weight E_{n,i} = 1 - |L_n - M_i| when |L_n - M_i| < Δ, else 0; Δ is the level spacing (``"spacing"``, the
    public re-implementation) or half of it (``"half"``, the STLNet paper's ±0.5/N on the normalised range).

    Args:
        similarity: (..., K) values to quantise, one row per map or region.
        num_levels: N.
        window: ``"spacing"`` or ``"half"``.

    Returns:
        levels: (..., N) the level centres L.
        encoding: (..., N, K) the quantisation matrix E.
    """
    low = similarity.amin(-1, keepdim=True)
    high = similarity.amax(-1, keepdim=True)
    steps = arange_like(similarity, num_levels)
    spacing = (high - low) / num_levels  # (..., 1)
    levels = low + (2 * steps + 1) / (2 * num_levels) * (high - low)  # (..., N)
    distance = (levels[..., :, None] - similarity[..., None, :]).abs()  # (..., N, K)
    delta = spacing[..., None] if window == "spacing" else spacing[..., None] / 2
    encoding = (1 - distance) * (distance < delta).to(similarity.dtype)
    return levels, encoding


def level_counts(encoding: Tensor) -> Tensor:
    """(..., N, K) quantisation matrix -> (..., N) normalised counts Σ_i E_{n,i} / Σ_{n,i} E_{n,i}."""
    counts = encoding.sum(-1)
    return counts / counts.sum(-1, keepdim=True).clamp_min(torch.finfo(counts.dtype).tiny)


def cooccurrence(encoding: Tensor) -> Tensor:
    """Normalised co-occurrence of levels between each pixel and its down-right neighbour (STLNet's 2-D QCO).

    Args:
        encoding: (..., N, h, w) quantisation weights E of every pixel of a region.

    Returns:
        (..., N, N): C_ij = Σ_p E_i(p) E_j(p + (1, 1)) / Σ_ij (same), over pixels p with a down-right neighbour;
        all zeros when no pixel has one (a region one pixel high or wide).
    """
    if min(encoding.shape[-2:]) < 2:  # static per input size; ONNX cannot reshape the empty pixel pairs
        return encoding.new_zeros((*encoding.shape[:-2], encoding.shape[-3]))
    first, second = encoding[..., :-1, :-1].flatten(-2), encoding[..., 1:, 1:].flatten(-2)  # (..., N, P)
    pairs = first @ second.transpose(-1, -2)
    return pairs / pairs.sum((-2, -1), keepdim=True).clamp_min(torch.finfo(pairs.dtype).tiny)


def _similarity(x: Tensor, mean: Tensor, dim: int) -> Tensor:
    """Cosine similarity of features to their mean, in float32 whatever the features' precision.

    QCO's levels lie (max - min) / N apart: with TEM's 128 levels over similarities near 1, finer than float16's
    step there (2^-11), so a float16 graph (``export --half``) would assign levels at random. The statistics are
    therefore computed in float32 and only their result is cast back (a no-op in a float32 model).
    """
    return F.cosine_similarity(x.float(), mean.float(), dim=dim)


class TextureEnhancement(nn.Module):
    """TEM: 1-D QCO statistics, self-attention over the levels, redistributed to the pixels (T1 = D'·E).

    (B, C_in, H, W) -> (B, C_out, H, W); spec 2.3 with C_in = C_out = 256, 128-d statistics, N = 128 levels.
    """

    def __init__(
        self, in_ch: int = 256, out_ch: int = 256, stat_ch: int = 128, num_levels: int = 128, window="spacing"
    ):
        super().__init__()
        self.num_levels, self.window = num_levels, window
        self.embed = nn.Sequential(
            conv_bn_act(in_ch, in_ch, 3, nn.LeakyReLU(inplace=True)), nn.Conv2d(in_ch, stat_ch, 1, bias=True)
        )
        self.stats_mlp = nn.Sequential(
            nn.Conv1d(2, 64, 1), nn.LeakyReLU(inplace=True), nn.Conv1d(64, stat_ch, 1), nn.ReLU(inplace=True)
        )
        self.stats_fuse = conv_bn_act(2 * stat_ch, stat_ch, dims=1)
        self.query, self.key, self.value = (nn.Conv1d(stat_ch, stat_ch, 1) for _ in range(3))
        self.out = conv_bn_act(stat_ch, out_ch, dims=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)  # (B, 128, H, W)
        b, c, h, w = x.shape
        mean = x.mean((2, 3))  # (B, 128), the global feature g
        similarity = _similarity(x.flatten(2), mean[:, :, None], dim=1)  # (B, K), float32
        levels, encoding = quantize_count(similarity, self.num_levels, self.window)  # (B, N), (B, N, K)
        stats = torch.stack([levels, level_counts(encoding)], dim=1).to(x.dtype)  # B = [L; count]: (B, 2, N)
        stats = torch.cat([self.stats_mlp(stats), mean[:, :, None].expand(-1, -1, self.num_levels)], dim=1)
        stats = self.stats_fuse(stats)  # D: (B, 128, N)
        # The products run in float32 too: the unscaled logits make the softmax sharp, and ONNX Runtime's float16
        # MatMul on a CPU moved them by several % of their range (export --half).
        q, k, v = (layer(stats).float() for layer in (self.query, self.key, self.value))
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N, N): level n attends to all levels
        updated = self.out((v @ attention.transpose(1, 2)).to(x.dtype))  # D': (B, C_out, N)
        return (updated.float() @ encoding).to(x.dtype).reshape(b, -1, h, w)  # R = D'·E: (B, C_out, H, W)


class CooccurrenceTexture(nn.Module):
    """2-D QCO at one pyramid scale: per region, co-occurrence of quantised levels of diagonal neighbours.

    (B, C, H, W) -> (B, out_ch, s, s). The map is split into s x s regions (bilinearly resized first when H or W
    is not a multiple of s); each pixel is paired with its down-right neighbour.
    """

    def __init__(self, scale: int, in_ch: int = 256, out_ch: int = 128, num_levels: int = 8, window="spacing"):
        super().__init__()
        self.scale, self.num_levels, self.window = scale, num_levels, window
        self.stats_mlp = nn.Sequential(nn.Conv2d(3, 64, 1), nn.LeakyReLU(inplace=True), nn.Conv2d(64, out_ch, 1))
        self.out = nn.Sequential(conv_bn_act(in_ch + out_ch, out_ch), conv_bn_act(out_ch, out_ch, act=nn.Identity()))

    def forward(self, x: Tensor) -> Tensor:
        s, n = self.scale, self.num_levels
        b, c, h, w = x.shape
        rh, rw = -(-h // s), -(-w // s)  # region size, rounded up
        if (rh * s, rw * s) != (h, w):  # static per input size, so exports stay one graph
            x = F.interpolate(x, size=(rh * s, rw * s), mode="bilinear", align_corners=False)
        regions = x.reshape(b, c, s, rh, s, rw).permute(0, 2, 4, 1, 3, 5).reshape(b, s * s, c, rh, rw)
        mean = regions.mean((3, 4))  # (B, s², C)
        similarity = _similarity(regions, mean[..., None, None], dim=2)  # (B, s², rh, rw), float32
        levels, encoding = quantize_count(similarity.flatten(2), n, self.window)  # (B, s², N), (B, s², N, rh*rw)
        pairs = cooccurrence(encoding.reshape(b, s * s, n, rh, rw))  # (B, s², N, N)
        level_i = levels[..., :, None].expand(-1, -1, n, n)
        level_j = levels[..., None, :].expand(-1, -1, n, n)
        stats = torch.stack([level_i, level_j, pairs], dim=1).flatten(3).to(x.dtype)  # (B, 3, s², N²)
        stats = torch.cat([self.stats_mlp(stats), mean.transpose(1, 2)[..., None].expand(-1, -1, -1, n * n)], 1)
        texture = self.out(stats).mean(-1)  # (B, out_ch, s²): mean over the N² level pairs
        return texture.reshape(b, -1, s, s)


class PyramidTexture(nn.Module):
    """PTFEM: 2-D QCO at several scales, each upsampled to the input grid, concatenated and fused.

    (B, in_ch, H, W) -> (B, out_ch, H, W); spec 2.4: 512 -> 256 channels, scales (1, 2, 4, 8), 8 levels.
    """

    def __init__(
        self,
        in_ch: int = 512,
        out_ch: int = 256,
        scales: tuple[int, ...] = (1, 2, 4, 8),
        num_levels: int = 8,
        branch_ch: int = 128,
        window: str = "spacing",
    ):
        super().__init__()
        self.reduce = nn.Conv2d(in_ch, out_ch, 1)
        self.branches = nn.ModuleList(CooccurrenceTexture(s, out_ch, branch_ch, num_levels, window) for s in scales)
        self.out = conv_bn_act(branch_ch * len(scales), out_ch)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce(x)
        size = x.shape[-2:]
        maps = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False) for branch in self.branches]
        return self.out(torch.cat(maps, dim=1))
