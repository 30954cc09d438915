"""Rescores a trained EfficientAD run with its local and global maps standardised per position.

The run's model computes its raw local (teacher-student) and global (autoencoder-student) maps once per image. Rows:
the paper's combination as trained (each map quantile-normalised, 0.9 -> 0 and 0.995 -> 0.1, averaged); each map
standardised per cell of the PDN grid, (x - mu) / max(sd, 0.1 median(sd)), before the same combination; the map
minus its per-cell mean only; and each branch alone. mu, sd and the quantiles come from the run's own held-out
validation images (model.json ``training.validation_images``: never trained on, the images its quantiles come from),
never from a test image. Image score: the maximum of the upsampled map. Nothing is retrained.

    python benchmarks/efficientad_map_norm.py RUN --dev /tmp/flawscope-dev/mtd-band
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from _common import REPO, command, cpu_model, publish
from flawscope import metrics
from flawscope.data import load_dataset
from flawscope.data.layouts import Sample
from flawscope.fitting import FitContext
from flawscope.model_io import load_model
from flawscope.models.efficientad.fit import tensor_quantile


def raw_maps(model, samples: list[Sample]) -> tuple[Tensor, Tensor, np.ndarray]:
    """Local and global maps (N, 1, m, m) on the PDN grid, and masks (N, S, S) at the input size S."""
    loader = FitContext(device=torch.device("cpu"), quiet=True).loader(samples, model.config, 8)
    m, size = model.config.map_size(), model.config.image_size
    local, global_ = torch.zeros(2, len(samples), 1, m, m)
    masks = np.zeros((len(samples), size, size), bool)
    with torch.inference_mode():
        for batch in loader:
            index = batch["index"]
            local[index], global_[index] = model.raw_maps(batch["image"])
            masks[index.numpy()] = batch["mask"][:, 0].numpy() > 0.5
    return local, global_, masks


def standardised(good: Tensor, maps: Tensor, divide: bool) -> tuple[Tensor, Tensor]:
    """``good`` and ``maps`` minus the good maps' per-cell mean, divided by their floored per-cell std if ``divide``."""
    mu, sd = good.mean(0, keepdim=True), good.std(0, keepdim=True)
    sd = sd.clamp_min(0.1 * sd.median()) if divide else torch.ones_like(sd)
    return (good - mu) / sd, (maps - mu) / sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="an EfficientAD run folder (flawscope fit --out)")
    parser.add_argument("--dev", type=Path, required=True, help="development folder (MVTec layout) to test on")
    parser.add_argument("--title", default="EfficientAD maps standardised per position")
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    args = parser.parse_args()
    model = load_model(args.run / "model").eval()
    if model.method != "efficientad" or not model.config.padded:
        raise SystemExit(f"{args.run}: this script takes EfficientAD runs with padding=paper")
    info = json.loads((args.run / "model/model.json").read_text())
    val = [Sample(Path(p)) for p in info["training"]["validation_images"]]
    test = load_dataset(args.dev, need_train=False).test
    labels = np.array([s.label for s in test], bool)
    good_local, good_global, _ = raw_maps(model, val)
    local, global_, masks = raw_maps(model, test)
    size = model.config.image_size

    def up(maps: Tensor) -> Tensor:
        return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)

    def quantile_normalised(good: Tensor, maps: Tensor) -> Tensor:
        pooled = up(good).flatten()
        q_a, q_b = tensor_quantile(pooled, model.config.quantile_a), tensor_quantile(pooled, model.config.quantile_b)
        return 0.1 * (maps - q_a) / (q_b - q_a)

    def combined(divide: bool | None) -> Tensor:
        pairs = [(good_local, local), (good_global, global_)]
        if divide is not None:
            pairs = [standardised(good, maps, divide) for good, maps in pairs]
        return 0.5 * sum(quantile_normalised(good, maps) for good, maps in pairs)

    rows = {
        "paper: quantile-normalised, averaged (as trained)": combined(None),
        "standardised per cell (mean and std), then as the paper": combined(True),
        "minus the per-cell mean, then as the paper": combined(False),
        "local map alone": local,
        "local map alone, standardised per cell": standardised(good_local, local, True)[1],
        "global map alone": global_,
        "global map alone, standardised per cell": standardised(good_global, global_, True)[1],
    }
    heading = f"## Scratch checks (development set): {args.title}"
    lines = [
        heading,
        "",
        f"Command: `{command()}` (benchmarks/efficientad_map_norm.py; statistics from the run's own "
        f"{len(val)} held-out validation images; image score the map's maximum; nothing is retrained). "
        f"Hardware: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads.",
        "",
        "| map | image AUROC | pixel AUROC | AUPRO |",
        "|---|---:|---:|---:|",
    ]
    for name, maps in rows.items():
        pixels = up(maps)[:, 0].numpy()
        image = metrics.image_metrics(pixels.reshape(len(pixels), -1).max(axis=1).astype(np.float64), labels)
        pixel = metrics.pixel_metrics(pixels, masks)
        values = (image["image_auroc"], pixel["pixel_auroc"], pixel["pixel_aupro"])
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.2f}" for v in values) + " |")
        print(lines[-1], flush=True)
    publish(args.docs, heading, lines)


if __name__ == "__main__":
    main()
