"""Checks flawscope's data path and metrics against the peer number the issues quote: PaDiM on MTD.

The issues give anomalib 2.7's PaDiM with an EfficientNet-Lite backbone as the peer on MTD (0.929 / 0.765 / 0.746
image AUROC / pixel AUROC / AUPRO). This script runs PaDiM (Defard et al. 2020) on flawscope's own pieces: the
dataset reader and geometry, the backbone and weights, the blur and the metrics. If it lands near the quoted
numbers, the data path and the metrics are not what holds our models below the floors; if it does not, they are.
PaDiM is a reference here, not a model of the library.

PaDiM as in the paper and anomalib: the stride-4/8/16 stages (ResNet layer1-3), each upsampled (nearest) to the
stride-4 grid and concatenated; per grid position the mean and covariance of the training features, covariance
+ 0.01 I; the score of a position is its Mahalanobis distance; the map is upsampled bilinearly to the input size
and smoothed with a Gaussian of sigma 4; the image score is the map's maximum. All channels are kept (Lite0 has
24 + 40 + 112 = 176; PaDiM's random channel selection is for ResNets' 448 to 1792). Trains on every training image.

    python benchmarks/padim_check.py --data ../shared/datasets/mtd
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import flawscope.metrics as M
from _common import REPO, command, cpu_model, write_section
from flawscope.backbones import create_backbone
from flawscope.data import load_dataset, make_loader
from flawscope.layers import GaussianBlur2d

SECTION = "## MTD: PaDiM as a check of the data path against the issues' peer number"


def embed(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) images -> (B, C, S/4, S/4) concatenated stage features, float64."""
    stages = backbone(images)
    size = stages[0].shape[-2:]
    return torch.cat([F.interpolate(s, size=size, mode="nearest") for s in stages], dim=1).double()


def fit_gaussians(
    backbone, samples, image_size: int, batch_size: int, pooled: bool = False, diagonal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position mean (P, C) and inverse covariance (P, C, C) of the training features, P = grid positions.

    ``pooled`` fits one Gaussian to the features of all positions instead (shapes (1, C) and (1, C, C)): the check
    of whether PaDiM's edge comes from modelling each position of an aligned part separately. ``diagonal`` keeps
    only the variances: the Mahalanobis distance becomes the length of the per-position standardised feature.
    """
    total, outer, count = None, None, 0
    for batch in make_loader(samples, image_size, 0, batch_size=batch_size):
        feats = embed(backbone, batch["image"]).flatten(2).permute(2, 0, 1)  # (P, B, C)
        if total is None:
            total, outer = feats.sum(1), feats.transpose(1, 2) @ feats
        else:
            total += feats.sum(1)
            outer += feats.transpose(1, 2) @ feats
        count += feats.shape[1]
    if pooled:
        total, outer, count = total.sum(0, keepdim=True), outer.sum(0, keepdim=True), count * total.shape[0]
    mean = total / count
    cov = (outer - count * mean[:, :, None] * mean[:, None, :]) / (count - 1)
    if diagonal:
        cov = torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
    cov += 0.01 * torch.eye(cov.shape[-1], dtype=cov.dtype)
    return mean, torch.linalg.inv(cov)


def score(backbone, samples, mean, inv_cov, image_size: int, batch_size: int):
    """Image scores (N,), maps (N, S, S) and masks (N, S, S) of ``samples``."""
    blur = GaussianBlur2d(4.0)
    scores, maps, masks = [], [], []
    for batch in make_loader(samples, image_size, 0, batch_size=batch_size):
        feats = embed(backbone, batch["image"])
        diff = feats.flatten(2).permute(2, 0, 1) - mean[:, None]  # (P, B, C)
        dist = ((diff @ inv_cov) * diff).sum(-1).clamp_min(0).sqrt()  # (P, B)
        coarse = dist.T.reshape(-1, 1, *feats.shape[-2:]).float()
        full = blur(F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False))
        maps.append(full[:, 0].numpy())
        scores.append(full.flatten(1).amax(1).numpy())
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
    return np.concatenate(scores), np.concatenate(maps), np.concatenate(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO / ".." / "shared" / "datasets" / "mtd"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--strides", default="4,8,16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pooled", action="store_true", help="one Gaussian for all positions")
    parser.add_argument("--diagonal", action="store_true", help="variances only (per-position standardisation)")
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    torch.manual_seed(0)
    split = load_dataset(args.data)
    backbone = create_backbone(args.backbone, tuple(int(s) for s in args.strides.split(","))).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        mean, inv_cov = fit_gaussians(backbone, split.train, args.image_size, args.batch_size, args.pooled, args.diagonal)
        fit_s = time.perf_counter() - start
        scores, maps, masks = score(backbone, split.test, mean, inv_cov, args.image_size, args.batch_size)
    test_s = time.perf_counter() - start - fit_s
    labels = np.array([s.label for s in split.test])
    result = {**M.image_metrics(scores, labels), **M.pixel_metrics(maps, masks)}
    pct = {k: 100 * result[k] for k in ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")}
    print(pct, f"fit {fit_s:.0f} s, test {test_s:.0f} s")

    row = (
        f"| {args.backbone}, {args.image_size} px, strides {args.strides} | {pct['image_auroc']:.1f} | "
        f"{pct['image_ap']:.1f} | {pct['pixel_auroc']:.1f} | {pct['pixel_aupro']:.1f} | {fit_s:.0f} | {test_s:.0f} |"
    )
    section = (
        f"{SECTION}\n\nCommand: `{command()}`\n\n"
        f"Data: `{args.data}`, {len(split.train)} training images (all of them), {len(split.test)} test images "
        f"({int(labels.sum())} defective). Hardware: {cpu_model()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}. PaDiM as described in `benchmarks/padim_check.py`.\n\n"
        "| PaDiM | image AUROC | image AP | pixel AUROC | AUPRO | fit (s) | test (s) |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        f"{row}\n\n"
        "The issues quote anomalib 2.7's PaDiM with an EfficientNet-Lite backbone at 92.9 / 76.5 / 74.6.\n"
    )
    write_section(Path(args.docs), SECTION, section)


if __name__ == "__main__":
    main()
