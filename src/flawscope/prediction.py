"""`flawscope predict`: score new images with a trained run, write a CSV and heat-map overlays."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .api import _check_outside, resolve_device
from .data import Sample, find_images, make_loader
from .errors import DataError
from .fitting import FitContext
from .model_io import load_model, read_model_info
from .report import heatmap_overlay, save_png


def predict(
    run: str | Path,
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 8,
    overlays: bool = True,
    strict: bool = False,
    quiet: bool = False,
) -> Path:
    """Scores every image found under ``paths`` (files, folders, globs).

    Writes ``out/predictions.csv`` (path, raw_score, norm_score, decision) and, with ``overlays``, one
    ``out/overlays/NNNNN_<name>.png`` per image. Unreadable files are skipped and listed in ``out/skipped.csv``
    unless ``strict``, which stops at the first one.

    Returns:
        The path of predictions.csv.
    """
    info = read_model_info(run)
    model = load_model(info["folder"])
    model.check_fitted()
    images = find_images(paths)
    out = Path(out)
    for folder in (Path(p) for p in paths):
        if folder.is_dir():  # overlays written there would be read back as images by the next run
            _check_outside(out, folder)
    (out / "overlays").mkdir(parents=True, exist_ok=True) if overlays else out.mkdir(parents=True, exist_ok=True)
    ctx = FitContext(device=resolve_device(device), quiet=quiet)
    model.to(ctx.device).eval()
    cfg = model.config
    samples = [Sample(path) for path in images]
    loader = make_loader(samples, cfg.image_size, cfg.resize_size, batch_size=batch_size, skip_bad=not strict)
    csv_path = out / "predictions.csv"
    with open(csv_path, "w", newline="") as f, torch.inference_mode():
        writer = csv.writer(f)
        writer.writerow(["path", "raw_score", "norm_score", "decision"])
        for batch in ctx.progress(loader, "predicting", len(loader)):
            if batch is None:
                continue
            result = model(batch["image"].to(ctx.device))
            for row, index in enumerate(batch["index"].tolist()):
                raw, norm = float(result.pred_score[row]), float(result.norm_score[row])
                writer.writerow([images[index], f"{raw:.6g}", f"{norm:.4f}", "defective" if norm > 0.5 else "good"])
                if overlays:
                    image = (batch["image"][row].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                    region = result.norm_map[row, 0].cpu().numpy()
                    save_png(
                        out / "overlays" / f"{index:05d}_{images[index].stem}.png",
                        heatmap_overlay(image, region, region > 0.5),
                    )
    bad = getattr(loader.dataset, "bad_files", [])
    (out / "skipped.csv").unlink(missing_ok=True)  # a list left by an earlier run into this folder would mislead
    if bad:
        with open(out / "skipped.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "reason"), *bad])
    if len(bad) == len(images):
        raise DataError(f"None of the {len(images)} images could be read; see {out / 'skipped.csv'}.")
    return csv_path
