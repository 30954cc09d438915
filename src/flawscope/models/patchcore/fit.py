"""PatchCore training: collect local features of the good images, reduce them with the greedy coreset."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ...data import Sample
from ...fitting import FitContext
from ...sampling import greedy_coreset, nearest_in_bank
from .model import PatchCore


def collect_features(model: PatchCore, samples: Sequence[Sample], ctx: FitContext) -> torch.Tensor:
    """Local features of every training image, as float16 (N, D) to halve memory.

    When the images together give more than ``config.max_train_features`` locations, each image contributes
    a seeded random subset of equal size, so memory stays bounded for large training sets.
    """
    cfg = model.config
    loader = ctx.loader(samples, cfg, cfg.batch_size)
    generator = ctx.generator(1)
    store, filled = None, 0
    for batch in ctx.progress(loader, "features", len(loader)):
        features = model.local_features(batch["image"].to(ctx.device))  # (B, D, h, w)
        features = features.permute(0, 2, 3, 1).flatten(1, 2).cpu()  # (B, h*w, D)
        if store is None:
            per_image = min(features.shape[1], max(1, cfg.max_train_features // len(samples)))
            # Filled in place: concatenating per-batch chunks would hold every feature twice at the end.
            store = torch.empty(len(samples) * per_image, features.shape[2], dtype=torch.float16)
        if per_image < features.shape[1]:
            keep = torch.stack(
                [torch.randperm(features.shape[1], generator=generator)[:per_image] for _ in range(features.shape[0])]
            )
            features = torch.gather(features, 1, keep[..., None].expand(-1, -1, features.shape[2]))
        rows = features.reshape(-1, features.shape[2])
        store[filled : filled + len(rows)] = rows
        filled += len(rows)
    return store[:filled]


def fit(model: PatchCore, samples: Sequence[Sample], ctx: FitContext) -> dict[str, Any]:
    """Fills the memory bank from ``samples`` (good images). Returns a report of sizes and timings."""
    cfg = model.config
    model.to(ctx.device).eval()
    start = time.perf_counter()
    features = collect_features(model, samples, ctx).to(ctx.device)  # float16, bounded by max_train_features
    extracted = time.perf_counter()
    num_features = features.shape[0]
    num_keep = max(1, round(cfg.coreset_ratio * num_features))
    if num_keep < num_features:
        index = greedy_coreset(features, num_keep, cfg.projection_dim, ctx.generator(2), ctx.progress)
        features = features[index]
    bank = features.float()
    model.memory_bank = bank
    model.bank_neighbors = nearest_in_bank(bank, min(cfg.num_neighbors, bank.shape[0]))
    model.fitted.fill_(True)
    return {
        "num_images": len(samples),
        "num_features": num_features,
        "memory_bank_size": int(bank.shape[0]),
        "feature_seconds": round(extracted - start, 2),
        "coreset_seconds": round(time.perf_counter() - extracted, 2),
    }
