"""Checks flawscope's data path and metrics against the peer number the issues quote: PaDiM on MTD.

The issues give anomalib 2.7's PaDiM with an EfficientNet-Lite backbone as the peer on MTD (0.929 / 0.765 / 0.746
image AUROC / pixel AUROC / AUPRO). This script runs PaDiM (Defard et al. 2020) on flawscope's own pieces: the
dataset reader and geometry, the backbone and weights, the blur and the metrics. If it lands near the quoted
numbers, the data path and the metrics are not what holds our models below the floors. PaDiM is a reference here,
not a model of the library.

PaDiM as in the paper and anomalib: the stride-4/8/16 stages (ResNet layer1-3), each upsampled (nearest) to the
finest grid and concatenated; per grid position the mean and covariance of the training features, covariance
+ 0.01 I; the score of a position is its Mahalanobis distance; the map is upsampled bilinearly to the input size
and smoothed with a Gaussian of sigma 4; the image score is the map's maximum. All channels are kept (Lite0 has
24 + 40 + 112 = 176; PaDiM's random channel selection is for ResNets' 448 to 1792). Trains on every training image.

Two ablations come from the same statistics: ``pooled`` (one Gaussian for all positions: does the edge come from
modelling each position of an aligned part?) and ``diagonal`` (variances only: is per-position standardisation
enough?).

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

VARIANTS = ("per-position", "pooled", "diagonal")
# The reference setting (the paper's stages on the issues' backbone); aupro_spill.py --padim uses it too.
BACKBONE, IMAGE_SIZE, STRIDES, BATCH_SIZE = "efficientnet_lite0", 256, (4, 8, 16), 16


def embed(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) images -> (P, B, C) concatenated stage features on the finest grid (P positions), float64."""
    stages = backbone(images)
    size = stages[0].shape[-2:]
    feats = torch.cat([F.interpolate(s, size=size, mode="nearest") for s in stages], dim=1).double()
    return feats.flatten(2).permute(2, 0, 1)


def fit_gaussians(
    backbone, samples, image_size: int, batch_size: int, variants: tuple[str, ...] = VARIANTS
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean (P or 1, C) and inverse covariance (P or 1, C, C) of the training features, for each of ``variants``."""
    total, outer, count = 0.0, 0.0, 0
    for batch in make_loader(samples, image_size, 0, batch_size=batch_size):
        feats = embed(backbone, batch["image"])  # (P, B, C)
        total, outer, count = total + feats.sum(1), outer + feats.transpose(1, 2) @ feats, count + feats.shape[1]
    stats = {
        "per-position": (total, outer, count),
        "pooled": (total.sum(0, keepdim=True), outer.sum(0, keepdim=True), count * total.shape[0]),
    }
    gaussians = {}
    for name, (t, o, n) in stats.items():
        mean = t / n
        gaussians[name] = (mean, (o - n * mean[:, :, None] * mean[:, None, :]) / (n - 1))
    mean, cov = gaussians["per-position"]
    gaussians["diagonal"] = (mean, torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1)))
    eye = 0.01 * torch.eye(mean.shape[-1], dtype=mean.dtype)
    return {name: (mean, torch.linalg.inv(cov + eye)) for name, (mean, cov) in gaussians.items() if name in variants}


def score(backbone, samples, gaussians, image_size: int, batch_size: int):
    """Per variant: image scores (N,) and maps (N, S, S) of ``samples``; and the masks (N, S, S)."""
    blur = GaussianBlur2d(4.0)
    scores, maps, masks = {name: [] for name in gaussians}, {name: [] for name in gaussians}, []
    for batch in make_loader(samples, image_size, 0, batch_size=batch_size):
        feats = embed(backbone, batch["image"])
        grid = int(feats.shape[0] ** 0.5)
        for name, (mean, inv_cov) in gaussians.items():
            diff = feats - mean[:, None]  # (P, B, C)
            dist = ((diff @ inv_cov) * diff).sum(-1).clamp_min(0).sqrt()  # (P, B)
            coarse = dist.T.reshape(-1, 1, grid, grid).float()
            full = blur(F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False))
            maps[name].append(full[:, 0].numpy())
            scores[name].append(full.flatten(1).amax(1).numpy())
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
    return (
        {n: np.concatenate(s) for n, s in scores.items()},
        {n: np.concatenate(m) for n, m in maps.items()},
        (np.concatenate(masks)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO / ".." / "shared" / "datasets" / "mtd"))
    parser.add_argument("--label", default="MTD test set", help="what --data is, for the docs section's title")
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--strides", default=",".join(map(str, STRIDES)))
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    split = load_dataset(args.data)
    backbone = create_backbone(args.backbone, tuple(int(s) for s in args.strides.split(","))).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        gaussians = fit_gaussians(backbone, split.train, args.image_size, args.batch_size)
        fit_s = time.perf_counter() - start
        scores, maps, masks = score(backbone, split.test, gaussians, args.image_size, args.batch_size)
    test_s = time.perf_counter() - start - fit_s
    labels = np.array([s.label for s in split.test])
    rows = []
    for name in VARIANTS:
        result = {**M.image_metrics(scores[name], labels), **M.pixel_metrics(maps[name], masks)}
        pct = [100 * result[k] for k in ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")]
        print(name, [round(p, 1) for p in pct])
        rows.append(f"| {name} | " + " | ".join(f"{p:.1f}" for p in pct) + " |")

    heading = f"## PaDiM as a check of the data path: {args.label}"
    section = (
        f"{heading}\n\nCommand: `{command()}`\n\n"
        f"Data: `{args.data}`, {len(split.train)} training images (all of them), {len(split.test)} test images "
        f"({int(labels.sum())} defective). Backbone {args.backbone} at {args.image_size} px, strides {args.strides}. "
        f"Hardware: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; statistics of "
        f"all three variants in {fit_s:.0f} s, their scores in {test_s:.0f} s. PaDiM and its two ablations as "
        "described in `benchmarks/padim_check.py`.\n\n"
        "| PaDiM variant | image AUROC | image AP | pixel AUROC | AUPRO |\n|---|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + "\n"
    )
    write_section(Path(args.docs), heading, section)


if __name__ == "__main__":
    main()
