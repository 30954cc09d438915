"""Rescores trained MLFF development runs with the head eta, the distance A and their normalised sum.

Each run's model computes its fused features psi once per image; the head gives eta, the hypersphere distance gives
A = sqrt(|psi|^2 + 1) - 1, both upsampled bilinearly to the input (the runs' smoothing is off, as in the MTD
setting). The sum eta~ + A~ normalises each map by the run's own held-out good training images (``val_images`` in
its config.json, never a test image): (x - q0.5) / (q0.995 - q0.5) over all their map pixels. Image score: the
maximum of the map in every column. Nothing is retrained; run ``dev_select.py`` first.

    python benchmarks/mlff_score_source.py --dev /tmp/flawscope-dev/mtd-band-without-texture \
        --group baseline=/tmp/flawscope-dev/runs/dev-mlff-pos-nt,/tmp/flawscope-dev/runs/dev-mlff-pos-nt-seed1
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _common import REPO, command, cpu_model, publish
from flawscope import metrics
from flawscope.data import load_dataset
from flawscope.data.layouts import Sample
from flawscope.fitting import FitContext
from flawscope.model_io import load_model, read_model_info
from flawscope.models.mlff.model import hypersphere_distance

SOURCES = ("eta", "A", "eta~ + A~")


def head_and_distance(model, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eta, A, masks), each (N, S, S) at the model's input size S: float32 maps and bool masks."""
    loader = FitContext(device=torch.device("cpu"), quiet=True).loader(samples, model.config, 8)
    size = model.config.image_size
    eta, dist = np.zeros((2, len(samples), size, size), np.float32)
    masks = np.zeros((len(samples), size, size), bool)
    with torch.inference_mode():
        for batch in loader:
            index, images = batch["index"].numpy(), batch["image"]
            psi = model.features(images)
            for out, grid in ((eta, model.score_head(psi)), (dist, hypersphere_distance(psi))):
                out[index] = F.interpolate(grid, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            masks[index] = batch["mask"][:, 0].numpy() > 0.5
    return eta, dist, masks


def normalised(maps: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``maps`` shifted and scaled so that the good maps' median goes to 0 and their 0.995 quantile to 1."""
    q50, q995 = np.quantile(good, [0.5, 0.995])
    return (maps - q50) / (q995 - q50)


def rescore(run: Path, dev: Path) -> dict[str, list[float]]:
    """Image AUROC, pixel AUROC and AUPRO (percent) of one run for each score source."""
    info = read_model_info(run / "model")
    if info["method"] != "mlff":
        raise SystemExit(f"{run}: model {info['method']!r}; this script takes MLFF runs only")
    model = load_model(run / "model").eval()
    if model.config.smoothing_sigma:
        raise SystemExit(f"{run}: smoothing_sigma={model.config.smoothing_sigma}; the rescoring assumes none")
    good = [Sample(Path(p)) for p in json.loads((run / "config.json").read_text())["val_images"]]
    test = load_dataset(dev, need_train=False).test
    labels = np.array([s.label for s in test], bool)
    good_eta, good_dist, _ = head_and_distance(model, good)
    eta, dist, masks = head_and_distance(model, test)
    combined = normalised(eta, good_eta) + normalised(dist, good_dist)
    rows = {}
    for source, maps in zip(SOURCES, (eta, dist, combined), strict=True):
        image = metrics.image_metrics(maps.reshape(len(maps), -1).max(axis=1).astype(np.float64), labels)
        pixel = metrics.pixel_metrics(maps, masks)
        rows[source] = [100 * image["image_auroc"], 100 * pixel["pixel_auroc"], 100 * pixel["pixel_aupro"]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dev", type=Path, required=True, help="development folder the runs were tested on")
    parser.add_argument(
        "--group", action="append", required=True, help="LABEL=RUN,RUN,...: runs averaged together (seeds)"
    )
    parser.add_argument("--title", default="MLFF score sources")
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    args = parser.parse_args()
    heading = f"## Scratch checks (development set): {args.title}"
    lines = [
        heading,
        "",
        f"Command: `{command()}` (benchmarks/mlff_score_source.py: eta is the head's map, A the hypersphere "
        "distance, eta~ + A~ their sum after normalising each by the run's own held-out good training images, "
        "(x − q0.5) / (q0.995 − q0.5); image score the map's maximum; nothing is retrained). "
        f"Hardware: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads.",
        "",
        "| run | " + " | ".join(SOURCES) + " |",
        "|---|" + "---|" * len(SOURCES),
    ]

    def cells(values: dict[str, list[float]]) -> str:
        return " | ".join(" / ".join(f"{v:.2f}" for v in values[s]) for s in SOURCES)

    for group in args.group:
        label, _, runs = group.partition("=")
        results = []
        for run in runs.split(","):
            results.append(rescore(Path(run), args.dev))
            lines.append(f"| {label}: {Path(run).name} | {cells(results[-1])} |")
            print(lines[-1], flush=True)
        means = {s: np.mean([r[s] for r in results], axis=0).tolist() for s in SOURCES}
        lines.append(f"| **{label}: mean of {len(results)}** | {cells(means)} |")
    lines += ["", "(image AUROC / pixel AUROC / AUPRO, percent.)"]
    publish(args.docs, heading, lines)


if __name__ == "__main__":
    main()
