"""PRN training: prototypes by k-means, then batches of normal, extended and simulated anomalies (spec §2.7-2.9).

1. The frozen encoder runs over every good training image (or only a held-out share, ``prototype_holdout``); with
   ``feature_norm=position`` each stage's per-position Gaussian is fitted to those images and whitens it; per
   scale, K = max(1, floor(0.1 N)) prototypes are found by k-means over the flattened whole maps (random-sample
   initialisation, 300 iterations; paper §4.1).
2. Every step draws ``batch_normal`` good images, ``batch_extended`` extended anomalies (EA: augmented seen
   defects pasted into a target area) and ``batch_simulated`` simulated anomalies (SA: Perlin-masked blends with a
   texture, HEA, or a grid-shuffled good image, HOA, each with p = 0.5). With no seen defects the EA slots become
   SA slots (spec proposal). One epoch is ceil(N_normal / batch_normal) steps (spec P17).
3. Loss: smooth-L1(M_o, M) + lambda * focal(M_o, M; alpha, gamma); Adam with constant lr and L2 weight decay.
4. With the final weights, the decoder's BatchNorm statistics are re-estimated exactly over ``precise_bn_batches``
   fresh batches of the same composition (not in the paper; ``recalibrate_batchnorm`` says why).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...config import naming_option
from ...data import ImageDataset, Sample, to_uint8_image
from ...errors import ConfigError
from ...fitting import FitContext, autocast, recalibrate_batchnorm
from ...layers import kmeans
from ...synthesis.anomalies import MAX_TRIES, extended_anomaly, homologous_source, match_grey, simulated_anomaly
from ...synthesis.augment import random_affine
from ...synthesis.perlin import texture_source
from ...synthesis.regions import foreground_mask
from .model import PRN, PRNConfig


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.5, gamma: float = 4.0) -> Tensor:
    """Mean over pixels of -alpha_t (1 - p_t)^gamma log p_t, with p = sigmoid(logits) (Lin et al.).

    alpha_t = alpha for defect pixels and 1 - alpha for good ones; log p_t comes from ``logsigmoid`` of the logits,
    which is exact where xcyao00 clamps probabilities and adds 1e-5.

    Args:
        logits: (B, 1, H, W).
        target: (B, 1, H, W) in {0, 1}.
    """
    signed = torch.where(target > 0.5, logits, -logits)
    log_pt = F.logsigmoid(signed)
    alpha_t = torch.where(target > 0.5, alpha, 1.0 - alpha)
    return (-alpha_t * (1.0 - log_pt.exp()).pow(gamma) * log_pt).mean()


def prn_loss(logits: Tensor, target: Tensor, cfg: PRNConfig) -> Tensor:
    """Eq. 5: SmoothL1(sigmoid(logits), M) + lambda * focal (both means over pixels)."""
    smooth = F.smooth_l1_loss(torch.sigmoid(logits), target, beta=cfg.smooth_l1_beta)
    return smooth + cfg.loss_lambda * focal_loss(logits, target, cfg.focal_alpha, cfg.focal_gamma)


def num_prototypes(num_images: int, ratio: float) -> int:
    """K = max(1, floor(ratio x N)) (spec P6), at most N."""
    return min(num_images, max(1, math.floor(ratio * num_images)))


def _as_arrays(samples: Sequence[Sample], cfg: PRNConfig) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, S, S, 3) uint8 and masks (N, S, S) bool at the model's geometry."""
    dataset = ImageDataset(samples, cfg.image_size, cfg.resize_size)
    images, masks = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        images.append(to_uint8_image(item["image"]))
        masks.append(item["mask"][0].numpy() > 0.5)
    return np.stack(images), np.stack(masks)


def fit_prototypes(model: PRN, normals: Tensor, ctx: FitContext) -> list[int]:
    """Runs the encoder over good images (N, 3, S, S) and sets K k-means prototypes per scale; returns K.

    With ``feature_norm=position`` every stage's per-position whitening is fitted to the same images first, and the
    prototypes are k-means centres of the whitened maps.
    """
    cfg = model.config
    maps: list[list[Tensor]] = [[] for _ in model.whitening]
    with torch.no_grad():
        batches = normals.split(16)
        for batch in ctx.progress(batches, "prototype features", len(batches)):
            for j, f in enumerate(model.backbone(batch.float().div(255).to(ctx.device))):
                maps[j].append(f.cpu())
    stages = [torch.cat(parts) for parts in maps]  # [(N, c_j, h_j, w_j)], the decoder's stage last
    if cfg.feature_norm == "position":
        for whitening, stage in zip(model.whitening, stages, strict=True):
            whitening.fit_maps(stage.split(64))
        with torch.no_grad():
            # Only the prototype scales: the decoder's stage needs its statistics, not its whitened maps, here.
            stages = [
                w.whiten_map(f.to(ctx.device))
                for w, f in zip(model.whitening, stages[: len(cfg.strides)], strict=False)
            ]  # the whitening sits on the model's device
    k = num_prototypes(len(normals), cfg.prototype_ratio)
    prototypes = []
    for j, features in enumerate(stages[: len(cfg.strides)]):
        result = kmeans(
            features.flatten(1).to(ctx.device),
            k,
            max_iter=cfg.kmeans_max_iter,
            generator=ctx.generator(10 + j),
            init=cfg.kmeans_init,
        )
        prototypes.append(result.centers.reshape(k, *features.shape[1:]))
    model.set_prototypes(prototypes)
    return [k] * len(prototypes)


def split_prototype_images(normals: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits good images (N, ...) into (prototype images, training images); holdout 0 gives both all of them.

    With ``holdout`` > 0, a seeded random ``round(holdout x N)`` images (at least 1) make only the prototypes and
    the rest (at least 1) are the only good images training batches draw, so training sees residuals of images
    that took no part in the k-means, as every test image is.
    """
    if holdout <= 0:
        return normals, normals
    if len(normals) < 2:
        raise ConfigError(f"prototype_holdout={holdout} needs at least 2 good training images; set it to 0.")
    order = np.random.default_rng(seed).permutation(len(normals))
    cut = min(len(normals) - 1, max(1, round(holdout * len(normals))))
    return normals[np.sort(order[:cut])], normals[np.sort(order[cut:])]


class AnomalyBatches:
    """Draws PRN's training batches: good images, extended anomalies and simulated anomalies, with masks."""

    def __init__(self, cfg: PRNConfig, normals: np.ndarray, seen: tuple[np.ndarray, np.ndarray], seed: int) -> None:
        self.cfg = cfg
        self.normals = normals  # (N, S, S, 3) uint8
        self.seen_images, self.seen_masks = seen
        self.rng = np.random.default_rng(seed)
        with naming_option("texture_dir", cfg.texture_dir):
            self.textures = texture_source(cfg.texture_dir or None)
        self.foregrounds = [foreground_mask(image) for image in normals] if cfg.foreground == "otsu" else None
        self.num_extended = cfg.batch_extended if len(self.seen_images) else 0
        self.num_simulated = cfg.batch_simulated + cfg.batch_extended - self.num_extended

    def _normal(self, base: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """A random good image (S, S, 3) float32 and its foreground; a ``base`` for a synthetic defect is rotated by
        U(-90, 90) degrees with probability ``base_rotate_prob`` (xcyao00's DRAEM step), its foreground with it."""
        i = int(self.rng.integers(len(self.normals)))
        foreground = self.foregrounds[i] if self.foregrounds is not None else None
        image = self.normals[i].astype(np.float32) / 255.0
        if base and self.cfg.base_rotate_prob and self.rng.random() < self.cfg.base_rotate_prob:
            inside = np.ones(image.shape[:2], bool) if foreground is None else foreground
            image, inside = random_affine(image, inside, self.rng, rotate=90.0, shear=0.0, translate=0.0)
            foreground = None if foreground is None else inside
        return image, foreground

    def extended(self) -> tuple[np.ndarray, np.ndarray]:
        i = int(self.rng.integers(len(self.seen_images)))
        defect, mask = self.seen_images[i].astype(np.float32) / 255.0, self.seen_masks[i]
        if self.cfg.include_raw_seen and self.rng.random() < 0.5:
            return defect, mask
        image, foreground = self._normal(base=True)
        cfg = self.cfg
        made = extended_anomaly(
            image,
            defect,
            mask,
            self.rng,
            foreground,
            num_ops=cfg.aug_num_ops,
            opacity=tuple(cfg.opacity_range),
            use_target_area=cfg.use_target_area,
            shapes=cfg.target_area_shapes,
            affine=cfg.aug2_ranges,
        )
        return match_grey(image, *made) if cfg.grey_pseudo else made

    def simulated(self) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        image, foreground = self._normal(base=True)
        shape = image.shape[:2]
        if self.rng.random() < cfg.hea_prob:
            source, ops = self.textures(shape, self.rng), cfg.aug_num_ops
        else:  # HOA: another good image, augmented and shuffled here, so no second colour augmentation below
            other, _ = self._normal()
            source, ops = homologous_source(other, self.rng, cfg.hoa_grid, cfg.aug_num_ops), 0
        made = simulated_anomaly(
            image,
            source,
            self.rng,
            foreground,
            num_ops=ops,
            max_exponent=cfg.perlin_max_exponent,
            threshold=cfg.perlin_threshold,
            opacity=tuple(cfg.opacity_range),
            use_target_area=cfg.use_target_area,
            tries=MAX_TRIES if cfg.redraw_empty_simulated else 1,
            shapes=cfg.target_area_shapes,
        )
        return match_grey(image, *made) if cfg.grey_pseudo else made

    def __call__(self) -> tuple[Tensor, Tensor]:
        """Returns images (B, 3, S, S) float in [0, 1] and masks (B, 1, S, S) in {0, 1}."""
        pairs = []
        for _ in range(self.cfg.batch_normal):
            image, _ = self._normal()
            pairs.append((image, np.zeros(image.shape[:2], bool)))
        pairs += [self.extended() for _ in range(self.num_extended)]
        pairs += [self.simulated() for _ in range(self.num_simulated)]
        images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float()
        masks = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None].float()
        return images, masks


def fit(model: PRN, samples: Sequence[Sample], ctx: FitContext) -> dict[str, Any]:
    """Fits prototypes, then trains the fusion, attention and decoder blocks for ``num_epochs``.

    Seen defects come from ``ctx.seen_anomalies`` (image + mask); none means synthetic anomalies only.
    The final weights are kept; nothing is selected on test images.
    """
    cfg = model.config
    model.to(ctx.device)
    start = time.perf_counter()
    normals, _ = _as_arrays(samples, cfg)
    seen = list(ctx.seen_anomalies)
    seen_arrays = _as_arrays(seen, cfg) if seen else (np.zeros((0, *normals.shape[1:]), np.uint8), np.zeros(0))
    prototype_images, hosts = split_prototype_images(normals, cfg.prototype_holdout, ctx.seed + 5)
    prototype_counts = fit_prototypes(model, torch.from_numpy(prototype_images).permute(0, 3, 1, 2), ctx)
    prototype_seconds = time.perf_counter() - start
    batches = AnomalyBatches(cfg, hosts, seen_arrays, ctx.seed + 7)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = cfg.steps_per_epoch or math.ceil(len(hosts) / max(cfg.batch_normal, 1))
    model.train()
    bar = ctx.progress(range(cfg.num_epochs * steps_per_epoch), "training", cfg.num_epochs * steps_per_epoch)
    total, count = 0.0, 0
    for step in bar:
        images, masks = batches()
        with autocast(cfg.train_precision, ctx.device):
            logits = model.segment_logits(images.to(ctx.device))
        loss = prn_loss(logits.float(), masks.to(ctx.device), cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, count = total + float(loss.detach()), count + 1
        if (step + 1) % steps_per_epoch == 0:
            ctx.log.append({"epoch": (step + 1) // steps_per_epoch, "loss": total / count})
            bar.set_postfix(loss=f"{total / count:.4f}")
            total, count = 0.0, 0
    if cfg.precise_bn_batches:  # in float32 whatever train_precision was: the statistics serve float32 inference
        fresh = (batches()[0].to(ctx.device) for _ in range(cfg.precise_bn_batches))
        recalibrate_batchnorm(
            model, ctx.progress(fresh, "BatchNorm statistics", cfg.precise_bn_batches), model.segment_logits
        )
    model.eval()
    model.fitted.fill_(True)
    return {
        "num_images": len(samples),
        "num_prototype_images": len(prototype_images),
        "num_training_hosts": len(hosts),
        "num_seen_anomalies": len(seen),
        "seen_anomalies": [str(s.path) for s in seen],
        "num_prototypes": prototype_counts,
        "steps": cfg.num_epochs * steps_per_epoch,
        "batch": [cfg.batch_normal, batches.num_extended, batches.num_simulated],
        "textures": cfg.texture_dir or "procedural",
        "final_loss": ctx.log[-1]["loss"] if ctx.log else None,
        "prototype_seconds": round(prototype_seconds, 2),
        "train_seconds": round(time.perf_counter() - start - prototype_seconds, 2),
    }
