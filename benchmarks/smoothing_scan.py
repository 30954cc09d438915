"""Scores a trained development run once and compares Gaussian smoothing sigmas of its upsampled maps.

The run's model scores the development test images with its smoothing off, then each sigma smooths those maps with
flawscope's ``GaussianBlur2d`` (the model's own smoothing). For CFA and MLFF, whose image score is the maximum of the
smoothed map, the image score is taken again as that maximum; SimpleNet's is the maximum of its raw grid, before
upsampling and smoothing, so its image score stays the model's own. Nothing is retrained, so the rows differ only in
the smoothing. Run ``dev_select.py`` first; no test image of the real data set is read.

    python benchmarks/smoothing_scan.py --run /tmp/flawscope-dev/runs/dev-cfa-pos-p1-l2-b331 --sigmas 4 0 1 2 3 6 8
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from _common import REPO, command, cpu_model, publish
from flawscope import metrics
from flawscope.api import score_images
from flawscope.data import load_dataset
from flawscope.fitting import FitContext
from flawscope.layers.blur import GaussianBlur2d
from flawscope.model_io import load_model, read_model_info

MAX_OF_SMOOTHED_MAP = ("cfa", "mlff")  # image score: the maximum of the smoothed map
SCORE_BEFORE_SMOOTHING = ("simplenet",)  # image score: computed before the map is smoothed


def scan(run: Path, dev: Path, sigmas: list[float]) -> list[dict]:
    """One row per sigma: image AUROC, pixel AUROC and AUPRO (fractions) of the run's model on ``dev``'s test set."""
    name = read_model_info(run / "model")["method"]
    if name not in MAX_OF_SMOOTHED_MAP + SCORE_BEFORE_SMOOTHING:
        methods = ", ".join(MAX_OF_SMOOTHED_MAP + SCORE_BEFORE_SMOOTHING)
        raise SystemExit(f"{run}: model {name!r}; the scan takes {methods} only")
    model = load_model(run / "model")
    model.blur = GaussianBlur2d(0.0)
    scored = score_images(
        model, load_dataset(dev).test, FitContext(device=torch.device("cpu"), quiet=True), 8, keep_maps=True
    )
    labels = np.array([sample.label for sample in scored.samples], dtype=bool)
    raw = torch.from_numpy(scored.maps)[:, None]  # (N, 1, H, W)
    rows = []
    for sigma in sigmas:
        maps = GaussianBlur2d(sigma)(raw)[:, 0].numpy()
        scores = scored.raw_scores if name in SCORE_BEFORE_SMOOTHING else maps.reshape(len(maps), -1).max(axis=1)
        image = metrics.image_metrics(scores, labels)
        pixel = metrics.pixel_metrics(maps, scored.masks)
        rows.append({"sigma": sigma, **image, **pixel})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder written by dev_select.py")
    parser.add_argument("--dev", type=Path, default=Path("/tmp/flawscope-dev/mtd-band"), help="development folder")
    parser.add_argument("--sigmas", type=float, nargs="+", required=True)
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    args = parser.parse_args()
    rows = scan(args.run, args.dev, args.sigmas)
    heading = f"## Smoothing scan on the development set: {args.run.name}"
    lines = [
        heading,
        "",
        f"Command: `{command()}`",
        "",
        f"The run's model scores the development test images once with its smoothing off; each row smooths those maps "
        f"with a Gaussian of the given sigma (pixels, scipy's kernel); the image score is the smoothed map's maximum "
        f"for CFA and MLFF and the model's own score (the raw grid's maximum) for SimpleNet. "
        f"Hardware: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads.",
        "",
        "| sigma (px) | image AUROC | pixel AUROC | AUPRO |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['sigma']:g} | {100 * r['image_auroc']:.2f} | {100 * r['pixel_auroc']:.2f} "
        f"| {100 * r['pixel_aupro']:.2f} |"
        for r in rows
    ]
    publish(args.docs, heading, lines)


if __name__ == "__main__":
    main()
