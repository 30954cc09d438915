"""SimpleNet training: Gaussian-noise fake features and a truncated L1 loss, on cached frozen features.

The backbone is frozen and there is no augmentation, so every image's local features are extracted once and the
160 epochs run on the cache (float16; a memory-mapped file when it would not fit in ``max_cache_bytes``).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ...data import Sample
from ...fitting import FitContext
from .model import SimpleNet, SimpleNetConfig

MAX_CACHE_BYTES = 4 << 30


def truncated_l1_loss(real_scores: Tensor, fake_scores: Tensor, margin: float = 0.5) -> Tensor:
    """Eq. 7-8: max(0, th+ - D(q)) + max(0, -th- + D(q-)), averaged over locations, with th+ = -th- = margin.

    Args:
        real_scores: (N,) discriminator outputs on adapted normal features.
        fake_scores: (N,) outputs on the noisy features.
    """
    return (margin - real_scores).clamp_min(0).mean() + (fake_scores + margin).clamp_min(0).mean()


def make_fake_features(features: Tensor, noise_std: float, generator: torch.Generator | None = None) -> Tensor:
    """q- = q + eps, eps ~ N(0, noise_std^2) i.i.d. per entry; not detached, so the adaptor gets both gradients."""
    noise = torch.randn(features.shape, generator=generator, device=features.device, dtype=features.dtype)
    return features + noise_std * noise


def build_feature_cache(
    model: SimpleNet, samples: Sequence[Sample], ctx: FitContext, max_bytes: int = MAX_CACHE_BYTES
) -> np.ndarray:
    """Frozen local features of every training image: (N_images, h*w, D) float16, in RAM or memory-mapped."""
    cfg = model.config
    loader = ctx.loader(samples, cfg, batch_size=8)
    cache = None
    with torch.no_grad():
        for batch in ctx.progress(loader, "features", len(loader)):
            features = model.local_features(batch["image"].to(ctx.device)).flatten(1, 2)  # (B, h*w, D)
            if cache is None:
                shape = (len(samples), *features.shape[1:])
                if math.prod(shape) * 2 <= max_bytes:
                    cache = np.empty(shape, np.float16)
                else:
                    # An unnamed temporary file: the mapping keeps it alive, the OS frees it when the cache goes.
                    if not ctx.quiet:
                        tqdm.write(
                            f"features: {math.prod(shape) * 2 / 2**30:.1f} GiB, above {max_bytes / 2**30:.0f} GiB: "
                            f"memory-mapped to a temporary file in {tempfile.gettempdir()} (set TMPDIR to move it)",
                            file=sys.stderr,
                        )
                    with tempfile.TemporaryFile(prefix="flawscope-cache-") as handle:
                        cache = np.memmap(handle, np.float16, "w+", shape=shape)
            cache[batch["index"].numpy()] = features.cpu().half().numpy()
    return cache


def fit_standardization(model: SimpleNet, cache: np.ndarray) -> None:
    """With feature_norm 'channel' or 'position', sets the per-channel mean and std of the cached training features.

    With 'position' it then fits each grid position's Gaussian (``fit_position_whitening``).

    With ``context_weight`` w, the appended image means are standardised with their local channels' statistics
    (mean w·mu, scale sigma): they become w x the image mean of the standardised local features, so w keeps its
    meaning instead of being divided out by statistics of their own.
    """
    cfg = model.config
    if cfg.resolved_feature_norm() == "none":
        return
    sample = torch.from_numpy(cache[:: max(1, len(cache) // 64)].astype(np.float32)).flatten(0, 1)  # (N, D)
    local = sample[:, : cfg.embed_dim]
    mean, scale = local.mean(0), local.std(0, correction=0).clamp_min(1e-6)
    if cfg.context_weight:
        mean, scale = torch.cat([mean, cfg.context_weight * mean]), torch.cat([scale, scale])
    model.feature_mean.copy_(mean)
    model.feature_scale.copy_(scale)
    if cfg.resolved_feature_norm() == "position":
        fit_position_whitening(model, cache)


def fit_position_whitening(model: SimpleNet, cache: np.ndarray, chunk: int = 16) -> None:
    """Fits each grid position's Gaussian to the channel-standardised cached features, ``chunk`` images at a time."""
    device = model.feature_mean.device
    raw = (
        torch.from_numpy(np.asarray(cache[i : i + chunk], np.float32)).to(device) for i in range(0, len(cache), chunk)
    )
    model.whitening.fit((c - model.feature_mean) / model.feature_scale for c in raw)


def noise_sigma(cfg: SimpleNetConfig, cache: np.ndarray, model: SimpleNet | None = None) -> tuple[float, float]:
    """The absolute noise sigma used in training, and the std of the (standardised) features it may be relative to."""
    sample = torch.from_numpy(cache[:: max(1, len(cache) // 64)].astype(np.float32))  # (n, P, D)
    if model is not None:
        sample = model.standardize(sample.to(model.feature_mean.device))
    feature_std = float(sample[..., : cfg.embed_dim].std(correction=0))  # the local features, not the image context
    if cfg.resolved_noise_mode() == "absolute":
        return cfg.noise_std, feature_std
    return cfg.noise_std_relative * feature_std, feature_std


def _optimizers(model: SimpleNet) -> list[torch.optim.Optimizer]:
    """Adam for the discriminator, and for the adaptor unless it has no weights (``adaptor_layers=0``)."""
    cfg = model.config
    discriminator = torch.optim.Adam(
        model.discriminator.parameters(), lr=cfg.lr_discriminator, weight_decay=cfg.weight_decay
    )
    weights = list(model.adaptor.parameters())
    if not weights:
        return [discriminator]
    if cfg.adaptor_optimizer == "adamw":  # public code: AdamW with PyTorch's default decoupled weight decay
        adaptor = torch.optim.AdamW(weights, lr=cfg.lr_adaptor)
    else:
        adaptor = torch.optim.Adam(weights, lr=cfg.lr_adaptor, weight_decay=cfg.weight_decay)
    return [adaptor, discriminator]


def train_step(
    model: SimpleNet,
    features: Tensor,
    sigma: float,
    optimizers: list[torch.optim.Optimizer],
    generator: torch.Generator | None = None,
) -> tuple[float, float, float]:
    """One update on a batch of cached features (B, P, D). Returns (loss, mean real score, mean fake score)."""
    adapted = model.adaptor(model.standardize(features).flatten(0, 1))
    fake = make_fake_features(adapted, sigma, generator)
    # BatchNorm sees real and fake features together, as in the public code.
    scores = model.discriminator(torch.cat([adapted, fake]))[:, 0]
    real_scores, fake_scores = scores[: len(adapted)], scores[len(adapted) :]
    loss = truncated_l1_loss(real_scores, fake_scores, model.config.margin)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    return float(loss.detach()), float(real_scores.detach().mean()), float(fake_scores.detach().mean())


def train_on_cache(model: SimpleNet, cache: np.ndarray, sigma: float, ctx: FitContext) -> None:
    """Runs ``num_epochs`` over cached features (N_images, h*w, D), logging the mean loss of each epoch."""
    cfg = model.config
    optimizers = _optimizers(model)
    generator = ctx.generator(3)
    noise_generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 4)
    model.adaptor.train()
    model.discriminator.train()
    steps_per_epoch = math.ceil(len(cache) / cfg.batch_size)
    bar = ctx.progress(range(cfg.num_epochs * steps_per_epoch), "training", cfg.num_epochs * steps_per_epoch)
    for epoch in range(cfg.num_epochs):
        order = torch.randperm(len(cache), generator=generator).numpy()
        totals = np.zeros(3)
        for first in range(0, len(order), cfg.batch_size):
            index = np.sort(order[first : first + cfg.batch_size])
            batch = torch.from_numpy(np.asarray(cache[index], np.float32)).to(ctx.device)
            totals += train_step(model, batch, sigma, optimizers, noise_generator)
            bar.update()  # by step: one epoch over thousands of images takes minutes
        loss, real, fake = totals / steps_per_epoch
        ctx.log.append({"epoch": epoch + 1, "loss": loss, "real_score": real, "fake_score": fake})
        bar.set_postfix(epoch=f"{epoch + 1}/{cfg.num_epochs}", loss=f"{loss:.4f}")
    bar.close()
    model.eval()


def fit(model: SimpleNet, samples: Sequence[Sample], ctx: FitContext) -> dict[str, Any]:
    """Trains the adaptor and discriminator for ``num_epochs`` on ``samples`` (good images).

    The final model is kept: no checkpoint is selected (the public code's selection on the test set is not
    reproduced).
    """
    cfg = model.config
    model.to(ctx.device)
    start = time.perf_counter()
    cache = build_feature_cache(model, samples, ctx)
    fit_standardization(model, cache)
    sigma, feature_std = noise_sigma(cfg, cache, model)
    extracted = time.perf_counter()
    train_on_cache(model, cache, sigma, ctx)
    model.fitted.fill_(True)
    return {
        "num_images": len(samples),
        "feature_grid": list(cache.shape[1:]),
        "feature_std": feature_std,
        "noise_sigma": sigma,
        "noise_mode": cfg.resolved_noise_mode(),
        "feature_norm": cfg.resolved_feature_norm(),
        "final_loss": ctx.log[-1]["loss"] if ctx.log else None,
        "feature_seconds": round(extracted - start, 2),
        "train_seconds": round(time.perf_counter() - extracted, 2),
    }
