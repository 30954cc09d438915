"""MLFF training: a 10x repeated training set, half of it made pseudo-anomalous on the fly, three losses, SGD.

Nothing is cached: the pseudo-anomalies change the images, so the backbone runs on every step. Each pass over the
images is one repetition; of the ``repeat_factor x N`` copies of an epoch exactly ``round(pseudo_ratio x R x N)``
(a seeded random subset) get a pseudo-anomaly, the paper's "repeat 10x, then select half". Which generator and
which defect an image gets depends only on (seed, pass, image index), not on the batch order.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...config import naming_option
from ...data import Sample
from ...errors import ConfigError
from ...fitting import FitContext
from ...synthesis import TextureSource, confetti_noise, cutpaste, match_grey, synthetic_defect, texture_source
from .losses import consistency_loss, feature_loss, normal_patch_mask, score_loss
from .model import MLFF, MLFFConfig, hypersphere_distance


def pseudo_anomaly_plan(
    num_images: int, repeat_factor: int, ratio: float, rng: np.random.Generator, bernoulli: bool = False
) -> np.ndarray:
    """Which copies of the repeated training set get a pseudo-anomaly (the paper's "repeat 10x, then pick half").

    Returns:
        (repeat_factor, num_images) bool; exactly round(ratio * repeat_factor * num_images) entries are True,
        drawn uniformly among all copies, or with ``bernoulli`` each entry True with probability ``ratio``. Row r
        is the plan of the r-th pass over the images.
    """
    total = repeat_factor * num_images
    if bernoulli:
        return (rng.random(total) < ratio).reshape(repeat_factor, num_images)
    plan = np.zeros(total, dtype=bool)
    plan[rng.permutation(total)[: int(round(ratio * total))]] = True
    return plan.reshape(repeat_factor, num_images)


def add_pseudo_anomalies(
    images: Tensor,
    indices: Tensor,
    plan: np.ndarray,
    cfg: MLFFConfig,
    seed: int,
    repetition: int,
    textures: TextureSource | None = None,
) -> tuple[Tensor, Tensor]:
    """Applies confetti noise or CutPaste (or a Perlin blend) to the planned images of a batch.

    Args:
        images: (B, 3, S, S) float in [0, 1].
        indices: (B,) positions of the images in the training set (rows of ``plan``).
        plan: (N,) bool, the row of :func:`pseudo_anomaly_plan` for this pass.
        cfg: the generators to draw from (``pseudo_kinds``, ``cutpaste_variant``, ``grey_pseudo``).
        seed, repetition: with the image index, seed each image's generator.
        textures: the texture source of the ``perlin`` kind; None = procedural.

    Returns:
        images: (B, 3, S, S) with the pseudo-anomalies.
        masks: (B, 1, S, S) bool, exactly the changed pixels.
    """
    images = images.clone()
    masks = torch.zeros(images.shape[0], 1, *images.shape[-2:], dtype=torch.bool)
    probs = np.asarray(cfg.pseudo_probs, float) / sum(cfg.pseudo_probs) if cfg.pseudo_probs else None
    for row, index in enumerate(indices.tolist()):
        if not plan[index]:
            continue
        rng = np.random.default_rng([seed, repetition, index])
        if probs is not None:
            kind = cfg.pseudo_kinds[int(rng.choice(len(probs), p=probs))]
        else:
            kind = cfg.pseudo_kinds[int(rng.integers(len(cfg.pseudo_kinds)))]
        pixels = images[row].permute(1, 2, 0).numpy()
        if kind == "confetti":
            color_prob, grey_prob = cfg.confetti_probs
            new, mask = confetti_noise(
                pixels, rng, color_prob=color_prob, grey_prob=grey_prob, side_px=cfg.confetti_sides
            )
        elif kind == "cutpaste":
            new, mask = cutpaste(
                pixels,
                rng,
                variant=cfg.cutpaste_variant,
                area_ratio=cfg.cutpaste_area,
                aspect_ratio=cfg.cutpaste_aspect,
                jitter=cfg.cutpaste_jitter,
            )
        else:  # perlin: the homologous source is the image itself, so the defect depends on nothing else
            new, mask = synthetic_defect(pixels, pixels, rng, textures)
        if cfg.grey_pseudo:
            new, mask = match_grey(pixels, new, mask)
        images[row] = torch.from_numpy(new).permute(2, 0, 1)
        masks[row, 0] = torch.from_numpy(mask)
    return images, masks


def mlff_losses(model: MLFF, images: Tensor, masks: Tensor, generator: torch.Generator | None = None) -> dict:
    """The weighted total and its three parts for a batch (B, 3, S, S) with masks (B, 1, S, S) bool."""
    cfg = model.config
    alpha, beta, xi = cfg.loss_weights
    psi = model.features(images)
    scores = model.score_head(psi)
    distance = hypersphere_distance(psi)
    if cfg.loss_resolution == "input":
        size = masks.shape[-2:]
        distance_map = F.interpolate(distance, size=size, mode="bilinear", align_corners=False)
        score_map = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        anomalous = masks
    else:  # feature grid: a location is anomalous when most of its footprint is
        distance_map, score_map = distance, scores
        anomalous = F.adaptive_avg_pool2d(masks.float(), psi.shape[-2:]) > 0.5
    parts = {"feature": feature_loss(distance_map, anomalous, cfg.feature_loss_counts)}
    zero = psi.sum() * 0
    parts["score"] = (
        score_loss(score_map, anomalous, cfg.gamma_margin, cfg.lambda_margin, cfg.score_pairing, generator)
        if beta
        else zero
    )
    if xi:
        p = cfg.consistency_patch
        patch_f = F.avg_pool2d(psi.detach() if cfg.detach_features else psi, p)
        patch_z = F.avg_pool2d(scores, p)
        normal = normal_patch_mask(masks, tuple(patch_f.shape[-2:]))
        parts["consistency"] = consistency_loss(patch_f, patch_z, normal, cfg.consistency_sign, cfg.consistency_tau)
    else:
        parts["consistency"] = zero
    parts["total"] = alpha * parts["feature"] + beta * parts["score"] + xi * parts["consistency"]
    return parts


def make_optimizer(model: MLFF) -> torch.optim.Optimizer:
    """SGD, Nesterov momentum, weight decay 3e-5, constant learning rate (spec 2.8, M15)."""
    cfg = model.config
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
    )


def fit_position_whitening(model: MLFF, samples: Sequence[Sample], ctx: FitContext) -> None:
    """Fits each backbone stage's per-position Gaussian to the clean training images.

    One pass through the backbone; the three stages' features are held until the fits (for Lite0 at 256 px about
    0.7 MB an image in float32).
    """
    loader = ctx.loader(samples, model.config, batch_size=model.config.batch_size)
    stages: list[list[Tensor]] = [[], [], []]
    with torch.no_grad():
        for batch in ctx.progress(loader, "whitening", len(loader)):
            for kept, stage in zip(stages, model.backbone(batch["image"].to(ctx.device)), strict=True):
                kept.append(stage)  # (B, C_i, h_i, w_i)
        for whitening, kept in zip(model.whitening, stages, strict=True):
            whitening.fit_maps(kept)


def fit(model: MLFF, samples: Sequence[Sample], ctx: FitContext) -> dict[str, Any]:
    """Trains the whole network (or the head, with ``freeze_backbone``) on ``samples`` plus pseudo-anomalies.

    Runs ``num_epochs`` epochs over the training set repeated ``repeat_factor`` times; the final weights are kept
    (no checkpoint selection).
    """
    cfg = model.config
    # BatchNorm layers train on each step's batch statistics: one image is no statistic (at small inputs a pooled
    # branch has one value per channel, which BatchNorm refuses; larger ones would normalise it to zero).
    if cfg.batch_size < 2:
        raise ConfigError(
            f"batch_size={cfg.batch_size}: MLFF's BatchNorm layers need at least 2 images a step; set "
            "--set batch_size=2 or more (the paper: 32)."
        )
    if len(samples) < 2:
        raise ConfigError(
            f"MLFF needs at least 2 training images (its BatchNorm layers train on batches of 2 or more); got "
            f"{len(samples)}. Add good images, or fit with --val-ratio 0 if the hold-out took them."
        )
    model.to(ctx.device)
    if cfg.feature_norm == "position":
        fit_position_whitening(model, samples, ctx)
    model.train()
    optimizer = make_optimizer(model)
    loader = ctx.loader(samples, cfg, batch_size=cfg.batch_size, shuffle=True)
    plan_rng = np.random.default_rng(ctx.seed + 5)
    # Read at fit time only (a saved model must load where its texture folder is gone); a missing folder is a
    # DataError that names it.
    with naming_option("texture_dir", cfg.texture_dir):
        textures = texture_source(cfg.texture_dir or None) if "perlin" in cfg.pseudo_kinds else None
    if cfg.texture_dir and textures is None:
        warnings.warn(
            f"texture_dir={cfg.texture_dir} is not used: only the 'perlin' pseudo-anomaly kind reads textures; "
            "add it with --set pseudo_kinds=confetti,cutpaste,perlin.",
            stacklevel=2,
        )
    generator = ctx.generator(6)
    repetitions = cfg.num_epochs * cfg.repeat_factor
    bar = ctx.progress(None, "training", repetitions * len(loader))
    start = time.perf_counter()
    pseudo, seen, steps = 0, 0, 0
    bernoulli = cfg.pseudo_selection == "bernoulli"
    for epoch in range(cfg.num_epochs):
        plans = pseudo_anomaly_plan(len(samples), cfg.repeat_factor, cfg.pseudo_ratio, plan_rng, bernoulli)
        for offset, plan in enumerate(plans):
            repetition = epoch * cfg.repeat_factor + offset
            totals: dict[str, float] = {}
            num_steps = 0
            for batch in loader:
                if len(batch["image"]) == 1:
                    # A last batch of one image: its BatchNorm statistics would come from one image (at small inputs
                    # the pooled branches have one value per channel, which BatchNorm refuses); it is left out.
                    bar.update()
                    continue
                images, masks = add_pseudo_anomalies(
                    batch["image"], batch["index"], plan, cfg, ctx.seed, repetition, textures
                )
                parts = mlff_losses(model, images.to(ctx.device), masks.to(ctx.device), generator)
                optimizer.zero_grad(set_to_none=True)
                parts["total"].backward()
                optimizer.step()
                pseudo += int(plan[batch["index"].numpy()].sum())
                seen += len(images)
                for key, value in parts.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach())
                num_steps += 1
                steps += 1
                bar.update()
                bar.set_postfix(loss=f"{float(parts['total'].detach()):.3f}")
            # One record per pass over the images (an epoch has repeat_factor of them).
            ctx.log.append(
                {"epoch": epoch + 1, "pass": repetition + 1, **{k: v / num_steps for k, v in totals.items()}}
            )
    bar.close()
    if pseudo == 0:  # pseudo_ratio=0, or a Bernoulli draw that chose none
        warnings.warn(
            f"No training image was made pseudo-anomalous (pseudo_ratio={cfg.pseudo_ratio}), so the score head "
            "learnt from normal images only and its map says little; the method learns from pseudo-anomalies "
            "(the paper: pseudo_ratio=0.5).",
            stacklevel=2,
        )
    model.eval()
    model.fitted.fill_(True)
    return {
        "num_images": len(samples),
        "repetitions": repetitions,
        "steps": steps,
        "images_seen": seen,
        "pseudo_fraction": pseudo / max(seen, 1),
        "final_losses": ctx.log[-1] if ctx.log else None,
        "train_seconds": round(time.perf_counter() - start, 2),
    }
