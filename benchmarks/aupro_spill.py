"""Where a model's AUPRO is lost: false positives on the normal pixels of defective images, by distance.

AUPRO (MVTec AD) counts false positives over *every* normal pixel of the test set, those of the defective images
included. A model whose response to a defect spreads beyond the defect's mask (a halo) raises the normal pixels
around it, so at a given false-positive rate the threshold sits higher and every region's overlap falls. This
script scores a labelled folder with a fitted run and measures that effect:

- AUPRO as `flawscope test` reports it;
- AUPRO with the false positives counted on the good images only (what AUPRO would be without any spill);
- AUPRO with the normal pixels within 16 and 32 px of a defect left out (how far the spill reaches);
- the share of the defective images' normal pixels above the good images' 99th percentile (the threshold at which
  a good image has 1 % false positives), by distance from the nearest defect pixel, in input pixels.

It reads only the folder it is given; run it on the development set of `dev_select.py` (training images only)
to study a setting, or on a test set to explain a result already measured, never to choose a setting.

With ``--per-type``, each defect type's images with the good ones get a row of their own. With ``--padim``, PaDiM
(``padim_check.py``: per-position Gaussians, 256 px, strides 4/8/16, fitted on the folder's train/good) gets rows
too, as the reference the issues quote. With ``--reach``, on a
development set (whose defective images are good test images with a defect added, under the same file name), it
also measures how far each backbone stage responds to a defect: the change of the stage's features between an
image and its defective twin, in units of the good image's per-channel spread, by distance from the defect.

    python benchmarks/aupro_spill.py RUN [RUN ...] --data /tmp/flawscope-dev/mtd-band --label "development set" \
        --reach efficientnet_lite0
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import padim_check
import torch
from scipy import ndimage

import flawscope.metrics as M
from _common import REPO, command, cpu_model, write_section
from flawscope.api import score_images
from flawscope.backbones import create_backbone
from flawscope.data import load_dataset, preprocess, preprocess_mask, read_image, read_mask
from flawscope.fitting import FitContext
from flawscope.model_io import load_model

BANDS = ((0, 8), (8, 16), (16, 32), (32, 64), (64, None))  # distance from the nearest defect pixel, px


def _band_key(lo: int, hi: int | None) -> str:
    return f"fp_{lo}_{hi or ''}"


def _band_labels() -> str:
    return " | ".join(f"{lo}–{hi} px" if hi else f"≥ {lo} px" for lo, hi in BANDS)


SECTION = "## Where AUPRO is lost: false positives around defects ({label})"


def spill_table(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """AUPRO variants and the defective images' false-positive shares by distance.

    Args:
        maps: (N, H, W) anomaly maps of good and defective images.
        masks: (N, H, W) bool ground truth; images without a defect pixel are the good ones.

    Returns:
        ``aupro``, ``aupro_good_fpr``, ``aupro_without_16``, ``aupro_without_32`` and ``fp_<lo>_<hi>`` per band
        of BANDS (``hi`` empty for the last, open band).
    """
    defective = masks.reshape(len(masks), -1).any(axis=1)
    distance = np.stack([ndimage.distance_transform_edt(~m) if m.any() else np.full(m.shape, np.inf) for m in masks])
    floor = np.float32(maps.min() - 1)  # below every score: a pixel set to it never counts as a false positive
    row = {"aupro": M.pixel_metrics(maps, masks)["pixel_aupro"]}
    row["aupro_good_fpr"] = M.aupro(np.where(defective[:, None, None] & ~masks, floor, maps), masks)
    for reach in (16, 32):
        row[f"aupro_without_{reach}"] = M.aupro(np.where((distance > 0) & (distance <= reach), floor, maps), masks)
    threshold = np.quantile(maps[~defective], 0.99)
    scores, distance = maps[defective], distance[defective]  # the defective images' pixels only
    for lo, hi in BANDS:
        band = (distance > 0) & (distance >= lo) & (distance < (hi or np.inf))
        row[_band_key(lo, hi)] = float((scores[band] > threshold).mean())
    return row


def feature_reach(
    backbone_name: str, data: Path, image_size: int, strides: tuple[int, ...], kind: str = "drawn", count: int = 24
) -> dict[int, list[float]]:
    """Median change of each stage's features at each distance band of BANDS, over ``count`` twin pairs.

    The change at a grid cell is |f_defective - f_good| / sigma (L2 over channels, sigma the good image's
    per-channel std over the grid), at the cell's centre distance from the defect in input pixels.

    Returns:
        {stride: [median change per band of BANDS]}.
    """
    backbone = create_backbone(backbone_name, strides).eval()
    changes: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in strides}
    for path in sorted((data / "test" / kind).glob("*.png"))[:count]:
        pair = [data / "test" / "good" / path.name, path]
        images = torch.stack([preprocess(read_image(p), image_size, 0) for p in pair])
        mask = read_mask(data / "ground_truth" / kind / f"{path.stem}_mask.png")
        mask = preprocess_mask(mask, image_size, 0).numpy().reshape(image_size, image_size) > 0.5
        distance = ndimage.distance_transform_edt(~mask)
        with torch.inference_mode():
            for stride, feature in zip(strides, backbone(images), strict=True):
                sigma = feature[0].std(dim=(1, 2), keepdim=True).clamp_min(1e-6)
                change = ((feature[1] - feature[0]) / sigma).norm(dim=0).numpy()  # (h, w)
                centres = distance[stride // 2 :: stride, stride // 2 :: stride][: change.shape[0], : change.shape[1]]
                changes[stride].append((change, centres))
    table = {}
    for stride, pairs in changes.items():
        change, distance = (np.concatenate([p[i].ravel() for p in pairs]) for i in (0, 1))
        table[stride] = [float(np.median(change[(distance >= lo) & (distance < (hi or np.inf))])) for lo, hi in BANDS]
    return table


def render_reach(backbone: str, image_size: int, table: dict[int, list[float]]) -> str:
    lines = [
        "",
        f"How far the backbone responds to a defect (`--reach {backbone}`, {image_size} px, the drawn kind: 24 "
        "defective images and their good twins): median change of a stage's features, |f_defective − f_good| / "
        "σ over the channels, by distance of the grid cell's centre from the defect.",
        "",
        f"| stage | {_band_labels()} |",
        "|---|" + "---:|" * len(BANDS),
    ]
    lines += [f"| stride {s} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for s, row in table.items()]
    return "\n".join(lines) + "\n"


def render(label: str, rows: dict[str, dict[str, float]]) -> str:
    bands = _band_labels()
    lines = [
        SECTION.format(label=label),
        "",
        f"Command: `{command()}`",
        "",
        f"Hardware: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads. Maps at each "
        "run's input size; distances in those pixels. The last five columns: the share of the defective images' "
        "normal pixels above the good images' 99th percentile (1 % false positives on a good image), by distance "
        "from the nearest defect pixel.",
        "",
        f"| run | AUPRO | AUPRO, FP on good images | AUPRO without normal px ≤ 16 / 32 px off a defect | {bands} |",
        "|---|---:|---:|---:|" + "---:|" * len(BANDS),
    ]
    for name, r in rows.items():
        shares = " | ".join(f"{100 * r[_band_key(lo, hi)]:.1f} %" for lo, hi in BANDS)
        lines.append(
            f"| {name} | {100 * r['aupro']:.1f} | {100 * r['aupro_good_fpr']:.1f} | "
            f"{100 * r['aupro_without_16']:.1f} / {100 * r['aupro_without_32']:.1f} | {shares} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of `flawscope fit`")
    parser.add_argument("--data", type=Path, required=True, help="labelled folder (MVTec layout)")
    parser.add_argument("--label", default="development set", help="what --data is, for the section's title")
    parser.add_argument("--reach", metavar="BACKBONE", help="also measure each stage's reach (development sets)")
    parser.add_argument("--reach-size", type=int, default=224, help="input size of --reach")
    parser.add_argument("--per-type", action="store_true", help="also a row per defect type (with the good images)")
    parser.add_argument("--padim", action="store_true", help="also rows for PaDiM (padim_check.py), the peer")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()

    split = load_dataset(args.data)
    samples = split.test
    types = np.array([sample.defect_type for sample in samples])
    kinds = sorted(set(types[[sample.label == 1 for sample in samples]])) if args.per_type else []
    rows = {}

    def add_rows(name: str, maps: np.ndarray, masks: np.ndarray) -> None:
        rows[name] = spill_table(maps, masks)
        print(name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)
        for kind in kinds:
            keep = (types == kind) | (types == "good")
            rows[f"{name}: {kind}"] = spill_table(maps[keep], masks[keep])

    for run in args.runs:
        scored = score_images(load_model(run), samples, FitContext(quiet=True), keep_maps=True)
        add_rows(run.name, scored.maps, scored.masks)
    if args.padim:
        size, batch = padim_check.IMAGE_SIZE, padim_check.BATCH_SIZE
        backbone = create_backbone(padim_check.BACKBONE, padim_check.STRIDES).eval()
        with torch.inference_mode():
            gaussians = padim_check.fit_gaussians(backbone, split.train, size, batch, variants=("per-position",))
            _, maps, masks = padim_check.score(backbone, samples, gaussians, size, batch)
        add_rows(f"PaDiM (reference, {size} px)", maps["per-position"], masks)
    section = render(args.label, rows)
    if args.reach:
        reach = feature_reach(args.reach, args.data, args.reach_size, (8, 16))
        section += render_reach(args.reach, args.reach_size, reach)
    print(section)
    write_section(args.docs, SECTION.format(label=args.label), section)


if __name__ == "__main__":
    main()
