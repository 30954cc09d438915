"""CFA training: a memory bank of the untrained descriptor's features, then the coupled-hypersphere loss.

1. Memory bank (built once with the untrained descriptor phi_0, then frozen). Its size M = h*w // gamma_c is fixed
   by the configuration, never by the number of training images, and building it holds one image's features
   (plus the bank) at a time:
   - ``kmeans_ema`` (paper, Algorithm 1): K-means of the first image's h*w features into M centres; every further
     image is matched to the bank (memory item j, in order, takes its nearest patch feature not yet taken) and
     the bank moves towards the matched features by an EMA.
   - ``positional_mean`` (public code): the mean over all images of phi_0 at each of the h*w locations; K-means
     compresses those h*w vectors to M only when gamma_c > 1.
2. Training: AdamW (amsgrad) on the descriptor (and r when learned), Eqs. 1-3 on every location of every image.
   The backbone is frozen and there is no augmentation, so the bank's pass also keeps every image's pooled patch
   features p (float16, when they fit in ``MAX_CACHE_BYTES``) and the epochs train on them without the backbone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ...data import Sample
from ...errors import DataError
from ...fitting import FitContext
from ...layers import kmeans, pairwise_squared_distances
from .model import CFA, CFAConfig

# Candidates looked up per memory item before the greedy matching falls back to a full row.
MATCH_CANDIDATES = 32
MAX_CACHE_BYTES = 4 << 30


class HypersphereLoss(NamedTuple):
    """The terms of Eq. 3 for one batch (unscaled)."""

    total: Tensor  # L_att + L_rep
    attraction: Tensor  # Eq. 1
    repulsion: Tensor  # Eq. 2
    repulsion_active: Tensor  # share of the hard-negative hinge terms that are non-zero


def coupled_hypersphere_loss(
    features: Tensor,
    bank: Tensor,
    radius: Tensor,
    alpha: float,
    num_neighbors: int = 3,
    num_hard_negatives: int = 3,
    distance: str = "squared",
) -> HypersphereLoss:
    """Eqs. 1-3: pull each feature into the radius-r spheres of its K nearest memory items, push it out of the
    spheres of the next J (ranks K+1..K+J) by the margin alpha.

    L_att = mean_{t,k<=K} max(0, D(phi(p_t), c^k) - r^2)
    L_rep = mean_{t,j<=J} max(0, r^2 - D(phi(p_t), c^{K+j}) - alpha)
    Means run over every location of every image and every neighbour (the public code's normalisation).

    Args:
        features: (N, D') descriptor outputs phi(p_t).
        bank: (M, D') memory items, M >= K + J.
        radius: r, a scalar tensor (a parameter when r is learned).
        alpha: repulsion margin.
        num_neighbors: K.
        num_hard_negatives: J (0 turns repulsion off).
        distance: "squared" (squared Euclidean, as the public code) or "euclidean".
    """
    count = num_neighbors + num_hard_negatives
    dist = pairwise_squared_distances(features, bank).topk(count, dim=-1, largest=False).values  # (N, K+J), ascending
    if distance == "euclidean":
        dist = dist.clamp_min(1e-12).sqrt()
    r2 = radius.pow(2)
    attraction = (dist[:, :num_neighbors] - r2).clamp_min(0).mean()
    hinge = (r2 - dist[:, num_neighbors:count] - alpha).clamp_min(0)  # (N, J); the paper's ranks K+1..K+J
    repulsion = hinge.mean() if num_hard_negatives else dist.new_zeros(())
    active = (hinge > 0).float().mean() if num_hard_negatives else dist.new_zeros(())
    return HypersphereLoss(attraction + repulsion, attraction, repulsion, active.detach())


def greedy_unique_matching(distances: Tensor) -> Tensor:
    """Algorithm 1's inner loop: memory item j = 0, 1, ... in turn takes its nearest patch not taken before.

    Args:
        distances: (M, T) distances (any monotone form) from the M memory items to an image's T patches, M <= T.

    Returns:
        (M,) int64 patch index per memory item, all distinct.
    """
    num_items, num_patches = distances.shape
    if num_items > num_patches:
        raise ValueError(f"Cannot match {num_items} memory items to {num_patches} distinct patches.")
    candidates = distances.topk(min(MATCH_CANDIDATES, num_patches), dim=1, largest=False).indices.cpu().numpy()
    full = distances.detach().float().cpu().numpy()
    taken = np.zeros(num_patches, dtype=bool)
    match = np.empty(num_items, dtype=np.int64)
    for item in range(num_items):
        free = candidates[item][~taken[candidates[item]]]
        # When every near candidate is taken (late items of a near-complete matching), search the whole row.
        patch = free[0] if len(free) else int(np.argmin(np.where(taken, np.inf, full[item])))
        taken[patch] = True
        match[item] = patch
    return torch.from_numpy(match).to(distances.device)


class KMeansEMABank:
    """Algorithm 1 (memory bank modelling), fed one image at a time.

    Args:
        num_items: M, the number of K-means centres (h*w // gamma_c).
        beta: EMA weight; 0 uses beta_i = 1/(i+1), i.e. the bank is the running mean of the matched features.
        kmeans_max_iter: Lloyd iterations of the initial K-means.
        generator: seeds the K-means.
    """

    def __init__(self, num_items: int, beta: float, kmeans_max_iter: int, generator: torch.Generator) -> None:
        self.num_items, self.beta, self.kmeans_max_iter, self.generator = num_items, beta, kmeans_max_iter, generator
        self.bank: Tensor | None = None
        self.num_images = 0

    def update(self, features: Tensor) -> None:
        """features (T, D') of the next image."""
        if self.bank is None:
            self.bank = kmeans(features, self.num_items, self.kmeans_max_iter, generator=self.generator).centers
        else:
            match = greedy_unique_matching(pairwise_squared_distances(self.bank, features))  # (M,)
            beta = self.beta if self.beta > 0 else 1.0 / (self.num_images + 1)
            self.bank = (1 - beta) * self.bank + beta * features[match]
        self.num_images += 1

    def finish(self) -> Tensor:
        """The final bank C (M, D')."""
        assert self.bank is not None, "no image was given"
        return self.bank


class PositionalMeanBank:
    """The public code's bank: per-location mean of phi_0 over all images, K-means-compressed if gamma_c > 1."""

    def __init__(self, num_items: int, kmeans_max_iter: int, generator: torch.Generator) -> None:
        self.num_items, self.kmeans_max_iter, self.generator = num_items, kmeans_max_iter, generator
        self.total: Tensor | None = None
        self.num_images = 0

    def update(self, features: Tensor) -> None:
        """features (T, D') of the next image."""
        self.total = features.double() if self.total is None else self.total + features.double()
        self.num_images += 1

    def finish(self) -> Tensor:
        """The final bank C (M, D')."""
        assert self.total is not None, "no image was given"
        mean = (self.total / self.num_images).float()  # (T, D')
        if self.num_items == mean.shape[0]:
            return mean
        return kmeans(mean, self.num_items, self.kmeans_max_iter, generator=self.generator).centers


def build_memory_bank(
    model: CFA, samples: Sequence[Sample], ctx: FitContext, max_cache_bytes: int = 0
) -> tuple[Tensor, Tensor | None]:
    """Runs the untrained descriptor over ``samples`` in their given order.

    Returns:
        The bank (M, D'), and the patch features p of every image (N, D, h, w) float16 when they fit in
        ``max_cache_bytes`` (else None).
    """
    cfg = model.config
    builder: KMeansEMABank | PositionalMeanBank | None = None
    cache: Tensor | None = None
    loader = ctx.loader(samples, cfg, batch_size=cfg.batch_size)
    with torch.no_grad():
        for batch in ctx.progress(loader, "memory bank", len(loader)):
            patches = model.patch_features(batch["image"].to(ctx.device))  # (B, D, h, w)
            features = model.descriptor.project(patches)  # (B, D', h, w)
            if builder is None:
                num_items = features.shape[2] * features.shape[3] // cfg.gamma_c
                if cfg.memory_init == "kmeans_ema":
                    builder = KMeansEMABank(num_items, cfg.ema_beta, cfg.kmeans_max_iter, ctx.generator(1))
                else:
                    builder = PositionalMeanBank(num_items, cfg.kmeans_max_iter, ctx.generator(1))
                if len(samples) * patches[0].numel() * 2 <= max_cache_bytes:
                    cache = torch.empty(len(samples), *patches.shape[1:], dtype=torch.float16)
            if cache is not None:
                cache[batch["index"]] = patches.half().cpu()
            for image_features in features.flatten(2).transpose(1, 2):  # (h*w, D') per image
                builder.update(image_features)
    assert builder is not None, "no training image"
    return builder.finish(), cache


def fit_position_whitening(model: CFA, samples: Sequence[Sample], ctx: FitContext) -> None:
    """Fits each grid position's Gaussian to the patch features of ``samples`` (one pass through the backbone)."""
    cfg = model.config
    loader = ctx.loader(samples, cfg, batch_size=cfg.batch_size)
    with torch.no_grad():
        model.whitening.fit(
            model.descriptor.patch_features(model.backbone(batch["image"].to(ctx.device))).flatten(2).transpose(1, 2)
            for batch in ctx.progress(loader, "whitening", len(loader))
        )  # (B, h*w, D) per batch


def make_optimizer(model: CFA, radius: Tensor) -> torch.optim.Optimizer:
    """AdamW with amsgrad (paper and code); r joins the descriptor's group, weight decay included, when learned."""
    cfg = model.config
    params = list(model.descriptor.parameters()) + ([radius] if radius.requires_grad else [])
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True)


def train_step(model: CFA, patches: Tensor, radius: Tensor, optimizer: torch.optim.Optimizer) -> HypersphereLoss:
    """One update of the descriptor (and r) on a batch of patch features p (B, D, h, w); returns the detached
    terms."""
    cfg = model.config
    features = model.descriptor.project(patches)  # (B, D', h, w)
    terms = coupled_hypersphere_loss(
        features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1]),
        model.memory_bank,
        radius,
        cfg.alpha,
        cfg.num_neighbors,
        cfg.num_hard_negatives,
        cfg.loss_distance,
    )
    optimizer.zero_grad(set_to_none=True)
    (cfg.loss_scale * terms.total).backward()
    optimizer.step()
    return HypersphereLoss(*(t.detach() for t in terms))


def _patch_batches(
    model: CFA, samples: Sequence[Sample], cache: Tensor | None, generator: torch.Generator, ctx: FitContext
) -> Iterator[Tensor]:
    """One epoch of shuffled batches of patch features p (B, D, h, w): from the cache, or through the backbone.

    Both draw the epoch's order from ``generator`` and round p to float16 as the cache stores it, so a training set
    too large for the cache trains as a small one would.
    """
    cfg = model.config
    order = torch.randperm(len(samples), generator=generator)
    if cache is None:
        for batch in ctx.loader([samples[i] for i in order.tolist()], cfg, batch_size=cfg.batch_size):
            yield model.patch_features(batch["image"].to(ctx.device)).half().float()
        return
    for first in range(0, len(order), cfg.batch_size):
        yield cache[order[first : first + cfg.batch_size]].to(ctx.device, torch.float32)


def train(model: CFA, samples: Sequence[Sample], radius: Tensor, ctx: FitContext, cache: Tensor | None = None) -> None:
    """``num_epochs`` passes over ``samples`` in seeded random order, logging each epoch's mean loss terms.

    ``cache``: the patch features of ``samples`` (N, D, h, w), as ``build_memory_bank`` returns them, or None.
    """
    cfg = model.config
    optimizer = make_optimizer(model, radius)
    generator = ctx.generator(2)
    model.descriptor.train()
    epochs = ctx.progress(range(cfg.num_epochs), "training", cfg.num_epochs)
    for epoch in epochs:
        totals, steps = np.zeros(4), 0
        for patches in _patch_batches(model, samples, cache, generator, ctx):
            terms = train_step(model, patches, radius, optimizer)
            totals += [float(t) for t in terms]
            steps += 1
        loss, attraction, repulsion, active = (float(v) for v in totals / steps)
        ctx.log.append(
            {
                "epoch": epoch + 1,
                "loss": cfg.loss_scale * loss,
                "attraction": attraction,
                "repulsion": repulsion,
                "repulsion_active": active,
                "radius": float(radius.detach()),
            }
        )
        epochs.set_postfix(loss=f"{cfg.loss_scale * loss:.4g}", rep_active=f"{active:.3f}")
    model.eval()


def fit(model: CFA, samples: Sequence[Sample], ctx: FitContext) -> dict[str, Any]:
    """Builds the memory bank from ``samples`` (good images), then trains the descriptor for ``num_epochs``.

    The final state is kept: no checkpoint is selected (the public code's best-epoch-on-test is not reproduced).
    """
    cfg: CFAConfig = model.config
    if not samples:
        raise DataError("CFA needs at least one good training image to build its memory bank; got none.")
    model.to(ctx.device).eval()
    start = time.perf_counter()
    if cfg.feature_norm == "position":
        fit_position_whitening(model, samples, ctx)
    bank, cache = build_memory_bank(model, samples, ctx, MAX_CACHE_BYTES)
    model.memory_bank = bank.to(ctx.device)
    built = time.perf_counter()
    radius = torch.tensor(cfg.radius, device=ctx.device)
    if cfg.learn_radius:
        radius = torch.nn.Parameter(radius)
    train(model, samples, radius, ctx, cache)
    model.fitted.fill_(True)
    return {
        "num_images": len(samples),
        "memory_init": cfg.memory_init,
        "memory_bank_size": int(bank.shape[0]),
        "descriptor_dim": model.descriptor_dim,
        "final_loss": ctx.log[-1]["loss"] if ctx.log else None,
        "final_repulsion_active": ctx.log[-1]["repulsion_active"] if ctx.log else None,
        "radius": float(radius.detach()),
        "cached_patch_features": cache is not None,
        "bank_seconds": round(built - start, 2),
        "train_seconds": round(time.perf_counter() - built, 2),
    }
