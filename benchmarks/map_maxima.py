"""Where a run's anomaly maps peak on the good images its fit held out (never test images).

For each held-out good image of the run (``val_images`` in its config.json), the map is computed at the model's input
size; the script counts the maps whose maximum lies within ``--band`` pixels of the border, says what share of the
map that band is, and gives the median ratio of the interior maximum to the whole map's. Many border maxima and a
low ratio mean that the good images' scores come from the border. For EfficientAD runs it also counts the images
whose combined map peaks where the autoencoder (global) half of the combination is larger than the student-teacher
(local) half.

    python benchmarks/map_maxima.py RUN [RUN ...] --band 16
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from flawscope.data import preprocess, read_image
from flawscope.model_io import load_model
from flawscope.models.efficientad.model import quantile_normalize


@torch.no_grad()
def border_maxima(run: Path, band: int) -> dict[str, float]:
    """Counts of border maxima over the run's held-out good images, the band's area share and the median ratio."""
    config = json.loads((run / "config.json").read_text())
    model = load_model(run / "model").eval()
    size, resize = config["options"]["image_size"], config["options"].get("resize_size", 0)
    at_border, global_larger, ratios = 0, 0, []
    for path in config["val_images"]:
        image = preprocess(read_image(path), size, resize)[None]
        anomaly_map = model(image)[0][0, 0]  # (s, s)
        row, col = divmod(int(anomaly_map.argmax()), anomaly_map.shape[1])
        at_border += min(row, col, size - 1 - row, size - 1 - col) < band
        ratios.append(float(anomaly_map[band:-band, band:-band].max() / anomaly_map.max()))
        if config["method"] == "efficientad":  # the two halves of the combined map on the PDN grid (B, 1, m, m)
            local, global_ = model.raw_maps(image)
            local = quantile_normalize(local, model.qa_st, model.qb_st).flatten()
            global_ = quantile_normalize(global_, model.qa_ae, model.qb_ae).flatten()
            peak = int((local + global_).argmax())
            global_larger += bool(global_[peak] > local[peak])
    return {
        "images": len(ratios),
        "maxima_in_band": at_border,
        "band_area_share": 1 - ((size - 2 * band) / size) ** 2,
        "median_interior_ratio": statistics.median(ratios),
        "global_larger_at_peak": global_larger if config["method"] == "efficientad" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--band", type=int, default=16, help="border width in input pixels")
    args = parser.parse_args()
    print(
        f"| run | held-out good images | maxima within {args.band} px of the border | band's share of the map "
        "| median interior max / max | EfficientAD: global half larger at the peak |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for run in args.runs:
        r = border_maxima(run, args.band)
        larger = "n/a" if r["global_larger_at_peak"] is None else r["global_larger_at_peak"]
        print(
            f"| {run.name} | {r['images']} | {r['maxima_in_band']} | {100 * r['band_area_share']:.0f} % "
            f"| {r['median_interior_ratio']:.2f} | {larger} |"
        )


if __name__ == "__main__":
    main()
