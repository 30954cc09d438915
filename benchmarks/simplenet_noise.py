"""Chooses SimpleNet's relative noise sigma on a development set that uses no test image.

The development set is built from the *training* folder of a data set: the seeded 10 % validation share that
`flawscope fit` holds out, each image once as it is (good) and once with a synthetic defect drawn in (scratch, blob
or stain from flawscope's demo painters, exact masks). SimpleNet is trained on the other 90 % for each candidate
sigma, on one shared feature cache, and scored on the development set. The table goes into docs/benchmarks.md.

    python benchmarks/simplenet_noise.py --data ../shared/datasets/mtd
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

import flawscope.metrics as M
from _common import REPO, command, cpu_model, publish
from flawscope.data import load_dataset, make_loader, split_validation
from flawscope.data.demo import DEFECT_TYPES, draw_defect
from flawscope.fitting import FitContext
from flawscope.models.simplenet import SimpleNet, SimpleNetConfig
from flawscope.models.simplenet.fit import build_feature_cache, fit_standardization, noise_sigma, train_on_cache

SECTION = "## SimpleNet: noise sigma on a synthetic development set, defect strength {strength:g}"


def development_set(
    model: SimpleNet, val, seed: int, strength: float = 1.0
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Validation images (good) and the same images with one drawn defect each: images, labels, masks.

    ``strength`` < 1 blends the drawn defect back towards the clean image, for subtler defects.
    """
    cfg = model.config
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for batch in make_loader(val, cfg.image_size, cfg.resize_size, batch_size=16):
        for image in batch["image"]:
            clean = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            painted, mask = draw_defect(clean, DEFECT_TYPES[rng.integers(len(DEFECT_TYPES))], rng)
            painted = (clean + strength * (painted.astype(np.float32) - clean)).round().astype(np.uint8)
            images += [torch.from_numpy(clean), torch.from_numpy(painted)]
            masks += [np.zeros(mask.shape, bool), mask]
    stacked = torch.stack(images).permute(0, 3, 1, 2).float() / 255
    labels = np.tile([0, 1], len(images) // 2)
    return stacked, labels, np.stack(masks)


def evaluate(model: SimpleNet, images: torch.Tensor, labels: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    scores, maps = [], []
    with torch.inference_mode():
        for chunk in images.split(16):
            anomaly_map, score = model.raw_scores(chunk)
            scores.append(score.numpy())
            maps.append(anomaly_map[:, 0].numpy())
    scores, maps = np.concatenate(scores), np.concatenate(maps)
    return {"image_auroc": M.auroc(scores, labels), **M.pixel_metrics(maps, masks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "../shared/datasets/mtd")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.03, 0.06, 0.12, 0.25])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--strength", type=float, default=1.0, help="defect contrast, 1 = as drawn by the demo")
    parser.add_argument("--set", nargs="*", default=["embed_dim=384"], help="SimpleNet options, key=value")
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    args = parser.parse_args()

    options = {"backbone": "efficientnet_lite0", "image_size": 224, "resize_size": 0, "num_epochs": args.epochs}
    options.update(dict(item.split("=", 1) for item in args.set))
    split = load_dataset(args.data)
    train, val = split_validation(split.train, 0.1, seed=0)
    ctx = FitContext(quiet=False)
    base = SimpleNet(SimpleNetConfig.from_dict(options))
    cache = build_feature_cache(base, train, ctx)
    fit_standardization(base, cache)
    feature_std = noise_sigma(base.config, cache, base)[1]
    images, labels, masks = development_set(base, val, seed=0, strength=args.strength)
    rows = []
    for sigma in args.sigmas:
        torch.manual_seed(0)
        model = SimpleNet(SimpleNetConfig.from_dict(options))
        model.backbone.load_state_dict(base.backbone.state_dict())
        model.feature_mean.copy_(base.feature_mean)
        model.feature_scale.copy_(base.feature_scale)
        start = time.perf_counter()
        train_on_cache(model, cache, sigma * feature_std, FitContext(quiet=False))
        rows.append((sigma, evaluate(model, images, labels, masks), time.perf_counter() - start))
        print(sigma, rows[-1][1], flush=True)

    heading = SECTION.format(strength=args.strength)
    lines = [
        heading,
        "",
        f"Command: `{command()}`",
        "",
        f"Data: {args.data.name} train/good only: {len(train)} images to train, {len(val)} held-out images used "
        f"twice (as they are, and with one drawn scratch, blob or stain at strength {args.strength:g}). "
        f"Options: {options}. Feature std {feature_std:.3f}. "
        f"Hardware: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads.",
        "",
        "| sigma / feature std | sigma | image AUROC | pixel AUROC | AUPRO | train (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for sigma, m, seconds in rows:
        lines.append(
            f"| {sigma:g} | {sigma * feature_std:.3f} | {100 * m['image_auroc']:.1f} "
            f"| {100 * m['pixel_auroc']:.1f} | {100 * m['pixel_aupro']:.1f} | {seconds:.0f} |"
        )
    publish(args.docs, heading, lines)


if __name__ == "__main__":
    main()
