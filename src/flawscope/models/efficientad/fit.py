"""EfficientAD training (spec 2.8-2.9): teacher normalisation, the three losses, then the map quantiles.

``fit`` holds out ``validation_ratio`` of the good training images it is given (``split_validation`` with the run's
seed) and never trains on them: the quantiles of the local and global maps are computed on these held-out normals,
as the paper prescribes ("unseen images from the training set"), never on test images.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor
from torch.utils.data import DataLoader

from ...config import naming_option
from ...data import Sample, find_images, preprocess, read_image, split_validation
from ...data.io import ImageReadingDataset
from ...errors import DataError
from ...fitting import FitContext, autocast
from .model import EfficientAD, EfficientADConfig

# Training images are decoded once and kept as float32 when they fit in this budget (no augmentation touches the
# geometry, so the cache is exact); larger sets are streamed from disk every step.
MAX_CACHE_BYTES = 2 << 30


def tensor_quantile(values: Tensor, q: float) -> Tensor:
    """The q-quantile of all elements with linear interpolation, as ``torch.quantile``, without its 2^24 limit."""
    flat = values.detach().flatten()
    position = q * (flat.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, flat.numel() - 1)
    value_low = flat.kthvalue(low + 1).values
    value_high = flat.kthvalue(high + 1).values if high != low else value_low
    return value_low + (position - low) * (value_high - value_low)


def hard_feature_loss(teacher: Tensor, student: Tensor, hard_quantile: float) -> Tensor:
    """L_hard (spec 2.8): the mean of the squared differences at or above their ``hard_quantile``-quantile.

    Args:
        teacher: (B, C, h, w) normalised teacher output T^.
        student: (B, C, h, w) the student's first C channels.
        hard_quantile: p_hard; 0 gives the plain student-teacher loss (mean of all elements).
    """
    distance = (teacher - student).pow(2)
    d_hard = tensor_quantile(distance, hard_quantile)
    return distance[distance >= d_hard].mean()


def penalty_loss(student_penalty: Tensor) -> Tensor:
    """(CWH)^-1 sum_c ||S(P)_c||^2 averaged over the batch; ``student_penalty`` is (B, C, h, w), first C channels."""
    return student_penalty.pow(2).mean()


def mean_squared_difference(a: Tensor, b: Tensor) -> Tensor:
    """L_AE = mean (T^ - A)^2 and L_STAE = mean (A - S')^2 (spec 2.8); A is not detached in L_STAE."""
    return (a - b).pow(2).mean()


def grayscale_decisions(count: int, prob: float, generator: torch.Generator) -> Tensor:
    """(count,) bool: which of ``count`` images become grayscale, each with probability ``prob``."""
    return torch.rand(count, generator=generator) < prob


def grayscale_where(images: Tensor, chosen: Tensor) -> Tensor:
    """(B, 3, H, W) with the images where ``chosen`` (B,) is True converted to 3-channel grayscale."""
    return torch.where(chosen[:, None, None, None], TF.rgb_to_grayscale(images, 3), images)


def random_grayscale(images: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """Converts each image of (B, 3, H, W) to 3-channel grayscale with probability ``prob``."""
    return grayscale_where(images, grayscale_decisions(images.shape[0], prob, generator).to(images.device))


def color_augment(images: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """The autoencoder branch's augmentation: per image one of brightness, contrast or saturation, factor
    lambda ~ U(1 - strength, 1 + strength) (the public code's RandomChoice of ColorJitter(0.2) ...).

    Args:
        images: (B, 3, H, W) in [0, 1].

    Returns:
        (B, 3, H, W) in [0, 1].
    """
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    choices = torch.randint(3, (images.shape[0],), generator=generator).tolist()
    factors = (1 - strength + 2 * strength * torch.rand(images.shape[0], generator=generator)).tolist()
    return torch.cat([adjust[c](image[None], f) for image, c, f in zip(images, choices, factors, strict=True)])


class _TrainImages:
    """The training images as batches: a float32 cache in memory when it fits, else streamed by the loader."""

    def __init__(self, samples: Sequence[Sample], cfg: EfficientADConfig, ctx: FitContext) -> None:
        self.samples, self.cfg, self.ctx = samples, cfg, ctx
        self.cache: Tensor | None = None
        if len(samples) * 3 * cfg.image_size**2 * 4 <= MAX_CACHE_BYTES:
            loader = ctx.loader(samples, cfg, batch_size=8)
            batches = [b["image"] for b in ctx.progress(loader, "loading images", len(loader))]
            self.cache = torch.cat(batches)

    def once(self) -> Iterator[Tensor]:
        """Every image once, in order, in batches of 8."""
        if self.cache is not None:
            yield from self.cache.split(8)
        else:
            for batch in self.ctx.loader(self.samples, self.cfg, batch_size=8):
                yield batch["image"]

    def forever(self, generator: torch.Generator) -> Iterator[Tensor]:
        """Random batches of ``batch_size`` images, reshuffled every epoch from ``generator``, without end; the same
        batches whether the images are cached or streamed."""
        size = self.cfg.batch_size
        while True:
            order = torch.randperm(len(self.samples), generator=generator)
            if self.cache is None:
                for batch in self.ctx.loader([self.samples[i] for i in order.tolist()], self.cfg, batch_size=size):
                    yield batch["image"]
                continue
            for first in range(0, len(order), size):
                yield self.cache[order[first : first + size]]


class _PenaltyImages(ImageReadingDataset):
    """Penalty images resized whole to twice the model input (spec 2.2: resize 512, later a centre crop 256)."""

    def __init__(self, paths: Sequence[Path], image_size: int) -> None:
        self.paths, self.image_size = list(paths), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return preprocess(read_image(self.paths[index]), 2 * self.image_size, 0)


def _penalty_batches(paths: Sequence[Path], cfg: EfficientADConfig, ctx: FitContext) -> Iterator[Tensor]:
    """Endless batches P: resize to 2s, grayscale with p = ``penalty_gray_prob``, centre crop s (spec 2.2)."""
    s = cfg.image_size
    loader = DataLoader(
        _PenaltyImages(paths, s),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=ctx.num_workers,
        generator=ctx.generator(5),
        drop_last=len(paths) >= cfg.batch_size,
    )
    generator = ctx.generator(6)
    while True:
        for images in loader:
            images = random_grayscale(images, cfg.penalty_gray_prob, generator)
            yield images[..., s // 2 : s // 2 + s, s // 2 : s // 2 + s]


@torch.no_grad()
def teacher_channel_stats(model: EfficientAD, batches: Iterator[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population std of the teacher output over all training images and positions.

    Returns:
        mean, std: (1, C, 1, 1) float32 each.
    """
    total = total_sq = None
    count = 0
    for images in batches:
        out = model.teacher(model.normalize_images(images.to(device))).double()  # (B, C, h, w)
        sums, sums_sq = out.sum(dim=(0, 2, 3)), out.pow(2).sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        total_sq = sums_sq if total_sq is None else total_sq + sums_sq
        count += out.numel() // out.shape[1]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)  # a dead channel must not give inf
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def training_losses(model: EfficientAD, images: Tensor, augmented: Tensor, penalty: Tensor | None) -> dict[str, Tensor]:
    """The loss terms of one step (spec 2.8). All three student inputs go through one batched forward pass.

    The forward passes run in ``train_precision``; the losses are computed in float32.

    Args:
        images: (B, 3, s, s) training images in [0, 1] (student-teacher branch, not augmented).
        augmented: (B, 3, s, s) the same images colour-augmented (autoencoder branch: T, A and S' see them).
        penalty: (B', 3, s, s) penalty images, or None when the penalty is off.
    """
    cfg = model.config
    channels, batch = cfg.out_channels, images.shape[0]
    with autocast(cfg.train_precision, images.device):
        with torch.no_grad():
            teacher = model.teacher_features(model.normalize_images(torch.cat([images, augmented])))
        inputs = [images, augmented] + ([penalty] if penalty is not None else [])
        student = model.student(model.normalize_images(torch.cat(inputs)))
        autoencoder = model.autoencoder(model.normalize_images(augmented))
    teacher, student, autoencoder = teacher.float(), student.float(), autoencoder.float()
    losses = {
        "hard": hard_feature_loss(teacher[:batch], student[:batch, :channels], cfg.hard_quantile),
        "ae": mean_squared_difference(teacher[batch:], autoencoder),
        "stae": mean_squared_difference(autoencoder, student[batch : 2 * batch, channels:]),
    }
    if penalty is not None:
        losses["penalty"] = penalty_loss(student[2 * batch :, :channels])
    return losses


def train(model: EfficientAD, images: _TrainImages, penalty: Iterator[Tensor] | None, ctx: FitContext) -> None:
    """``num_steps`` Adam steps on student and autoencoder; lr x 0.1 after ``lr_drop_ratio`` of them."""
    cfg = model.config
    params = [*model.student.parameters(), *model.autoencoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # One drop, as the public code's StepLR(int(0.95 * steps)) gives within its run (StepLR would repeat it).
    drop_step = max(1, int(cfg.lr_drop_ratio * cfg.num_steps))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[drop_step], gamma=0.1)
    batches, augment_rng = images.forever(ctx.generator(1)), ctx.generator(2)
    log_every = max(1, cfg.num_steps // 200)
    model.student.train()
    model.autoencoder.train()
    sums: dict[str, float] = {}
    bar = ctx.progress(range(cfg.num_steps), "training", cfg.num_steps)
    for step in bar:
        image = next(batches).to(ctx.device)
        augmented = color_augment(image, cfg.ae_aug_strength, augment_rng)
        losses = training_losses(model, image, augmented, None if penalty is None else next(penalty).to(ctx.device))
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        for key, value in {"loss": loss, **losses}.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        if (step + 1) % log_every == 0 or step + 1 == cfg.num_steps:
            count = (step % log_every) + 1
            record = {"step": step + 1, "lr": lr, **{k: v / count for k, v in sums.items()}}
            ctx.log.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            sums = {}
    model.eval()


@torch.no_grad()
def map_quantiles(model: EfficientAD, samples: Sequence[Sample], ctx: FitContext) -> dict[str, float]:
    """q_a and q_b of the local and global maps over all pixels of the held-out normal images (spec 2.9).

    Padding "paper" takes them on maps resized bilinearly to the input size (the appendix's Algorithm 2);
    "code" on the raw PDN-grid maps (the public code). Sets the four buffers and returns their values.
    ``map_normalization="gaussian"`` (the ablation baseline) sets q_a = mean and q_b = mean + 0.1 std instead, so
    that the same inference formula 0.1 (M - q_a) / (q_b - q_a) gives (M - mean) / std.
    """
    cfg = model.config
    model.eval()
    values: dict[str, list[Tensor]] = {"st": [], "ae": []}
    for batch in ctx.progress(ctx.loader(samples, cfg, batch_size=8), "map quantiles"):
        images = batch["image"].to(ctx.device)
        for key, raw in zip(("st", "ae"), model.raw_maps(images), strict=True):
            if cfg.padded:
                raw = F.interpolate(raw, size=images.shape[-2:], mode="bilinear", align_corners=False)
            values[key].append(raw.flatten().cpu())
    result = {}
    for key, chunks in values.items():
        pooled = torch.cat(chunks)
        if cfg.map_normalization == "gaussian":
            mean, std = pooled.double().mean(), pooled.double().std(correction=0)
            levels = {"qa": mean, "qb": mean + 0.1 * std}
        else:
            levels = {"qa": tensor_quantile(pooled, cfg.quantile_a), "qb": tensor_quantile(pooled, cfg.quantile_b)}
        for name, value in levels.items():
            getattr(model, f"{name}_{key}").fill_(float(value))
            result[f"{name}_{key}"] = float(value)
    return result


def fit(model: EfficientAD, samples: Sequence[Sample], ctx: FitContext) -> dict[str, Any]:
    """Trains student and autoencoder on ``samples`` (good images) and sets the map-normalisation quantiles.

    The quantiles come from every image under ``quantile_images`` (taken as good) when it names a folder; else a
    seeded ``validation_ratio`` share of ``samples`` is held out of training for them (at least one image). The
    final state is kept; nothing is selected on test images.
    """
    cfg = model.config
    start = time.perf_counter()
    if cfg.quantile_images:
        with naming_option("quantile_images", cfg.quantile_images):
            train_samples, val_samples = list(samples), [Sample(p) for p in find_images(cfg.quantile_images)]
    else:
        if len(samples) < 2:  # split_validation's message would name fit's --val-ratio, which is not this hold-out
            raise DataError(
                f"EfficientAD holds out validation_ratio={cfg.validation_ratio} of its training images (at least "
                f"one) to set its map quantiles and trains on the rest; {len(samples)} image(s) leave none to train "
                "on. Add good images, or give other good images for the quantiles with --set quantile_images=DIR."
            )
        train_samples, val_samples = split_validation(samples, cfg.validation_ratio, seed=ctx.seed, min_count=1)
    with naming_option("penalty_images", cfg.penalty_images):
        penalty_paths = find_images(cfg.penalty_images) if cfg.penalty_images else []
    model.to(ctx.device)
    images = _TrainImages(train_samples, cfg, ctx)
    mean, std = teacher_channel_stats(model, images.once(), ctx.device)
    model.teacher_mean.copy_(mean)
    model.teacher_std.copy_(std)
    prepared = time.perf_counter()
    train(model, images, _penalty_batches(penalty_paths, cfg, ctx) if penalty_paths else None, ctx)
    trained = time.perf_counter()
    quantiles = map_quantiles(model, val_samples, ctx)
    model.fitted.fill_(True)
    return {
        "num_train": len(train_samples),
        "num_validation": len(val_samples),
        "validation_images": [str(s.path) for s in val_samples],
        "teacher": model.teacher_info,
        "penalty": {"images": cfg.penalty_images, "num_images": len(penalty_paths)} if penalty_paths else "off",
        "num_steps": cfg.num_steps,
        "final": ctx.log[-1] if ctx.log else None,
        "quantiles": quantiles,
        "teacher_std_range": [float(std.min()), float(std.max())],
        "prepare_seconds": round(prepared - start, 2),
        "train_seconds": round(trained - prepared, 2),
        "quantile_seconds": round(time.perf_counter() - trained, 2),
    }
