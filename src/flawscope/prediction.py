"""`flawscope predict`: score new images with a run or an exported file; write CSV, JSON lines, overlays, masks.

Streaming: images are decoded batch by batch and every row is written as soon as its batch is scored, so memory
stays constant whatever the number of images (only the list of paths and of unreadable files is kept).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .data import Sample, find_images, is_enlarged, make_loader, to_uint8_image, warn_enlarged
from .errors import ConfigError, DataError
from .export import Prediction, load_inferencer
from .fitting import FitContext, torch_threads
from .outputs import IMAGE_OUTPUTS, check_out_folder, check_outside, claim_out_folder, owned_names, portable_stem
from .report import heatmap_overlay, save_png

CSV_COLUMNS = [
    *("path", "raw_score", "norm_score", "decision", "num_regions", "defect_area", "regions"),
    *("peak_x", "peak_y", "peak_score"),  # added after the first release's columns, so their positions hold
    *("width", "height", "input_size"),  # the file's upright size and S, to map input pixels back (docs/deploy.md)
]


def _region_rows(prediction: Prediction) -> list[dict]:
    return [
        {**r.to_dict(), "peak_score": round(r.peak_score, 4), "peak_raw": float(f"{r.peak_raw:.6g}")}
        for r in prediction.regions
    ]


def _row(
    path: Path, index: int, prediction: Prediction, size: tuple[int, int], overlays: bool, masks: bool
) -> dict[str, Any]:
    """The CSV/JSONL record of one image (``size``: its upright height and width); its overlay and mask names are
    ``NNNNN_<stem>.png``."""
    name = f"{index:05d}_{portable_stem(path)}.png"  # the index keeps names unique
    regions = _region_rows(prediction)
    peak_x, peak_y, peak_score = prediction.peak
    return {
        "path": str(path),
        "raw_score": float(f"{prediction.raw_score:.6g}"),
        "norm_score": round(prediction.norm_score, 4),
        "decision": prediction.decision,
        "num_regions": len(regions),
        "defect_area": int(prediction.mask.sum()),
        "peak_x": peak_x,
        "peak_y": peak_y,
        "peak_score": round(peak_score, 4),
        "width": size[1],
        "height": size[0],
        "input_size": int(prediction.mask.shape[-1]),
        "regions": regions,
        "overlay": f"overlays/{name}" if overlays else None,
        "mask": f"masks/{name}" if masks else None,
    }


def _prepare_out_folder(out: Path, paths: list[Path], images: list[Path], overlays: bool, masks: bool) -> list[str]:
    """Checks ``out`` for predict and clears the numbered overlays and masks an earlier predict left there; returns
    the names predict writes (claimed by the caller once the folder is ready)."""
    # Files written into an input folder would be read back as images by the next run on it. Only folders given as
    # inputs count: the folder of a file given by name (often the working folder) is not treated as a data folder.
    for folder in (Path(p) for p in paths):
        if folder.is_dir():
            check_outside(out, folder)
    writes = ["predictions.csv", "predictions.jsonl", "skipped.csv"]
    writes += ["overlays"] * overlays + ["masks"] * masks
    check_out_folder(out, writes)
    # An earlier predict into this folder left overlays and masks numbered by its own image list; new ones would mix
    # with them. Only the folders flawscope wrote, and in them only the numbered PNG files it names, never an input.
    owned = owned_names(out) if out.is_dir() else set()
    replaced = [(out / name).resolve() for name in IMAGE_OUTPUTS if name in owned]
    inputs = [path for path in images if any(folder in path.resolve().parents for folder in replaced)]
    if inputs:
        raise ConfigError(
            f"{inputs[0]} is an input and lies in {inputs[0].parent}, which predict rewrites in --out {out}; "
            "choose another --out (or copy those images elsewhere first)."
        )
    for folder in (out / name for name in IMAGE_OUTPUTS if name in owned):
        if folder.is_symlink() or not folder.is_dir():  # a link could lead to another folder's pictures
            continue
        for stale in folder.glob("*_*.png"):
            if re.fullmatch(r"\d{5,}_.*\.png", stale.name):  # a link goes too (the link, not its target)
                stale.unlink()
    return writes


def predict(
    run: str | Path,
    paths: str | Path | Iterable[str | Path],
    out: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 8,
    overlays: bool = True,
    masks: bool = False,
    min_area: int = 0,
    strict: bool = False,
    quiet: bool = False,
    threads: int | None = None,
    trust_code: bool = False,
) -> Path:
    """Scores every image found under ``paths`` (files, folders, globs).

    Args:
        run: a run or model folder (torch), or an exported ``.onnx`` / TorchScript ``.pt`` file.
        paths: image files, folders (searched recursively) and glob patterns.
        out: output folder (never inside an input folder).
        device: 'auto', 'cpu', 'cuda' (ONNX Runtime uses CUDA when it has the provider).
        batch_size: images per forward pass.
        overlays: write ``out/overlays/NNNNN_<name>.png`` (heat map, region outlines).
        masks: write ``out/masks/NNNNN_<name>.png``, the binary defect mask (255 = defect).
        min_area: regions smaller than this many pixels are dropped (from the regions and the masks).
        strict: stop at the first unreadable image instead of skipping it and listing it in ``out/skipped.csv``.
        quiet: no progress bar.
        threads: CPU threads for torch and ONNX Runtime during this call (default: torch's setting; the caller's
            count is restored afterwards). On a machine shared with other
            jobs, fewer threads than cores is often faster: threads of one operation wait for each other.
        trust_code: load a TorchScript ``run`` file, whose loading runs the code it holds (see ``load_inferencer``).

    Writes ``out/predictions.csv`` (one row per image: path, raw and normalised score, decision, number of regions,
    defect area in pixels, the regions as JSON, where the map peaks and the calibrated value there) and
    ``out/predictions.jsonl`` (the same as one JSON object per line, with the overlay and mask paths). Regions are
    in pixels of the model input; see docs/deploy.md.

    Returns:
        The path of predictions.csv.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)  # a generator is read more than once below
    paths = [Path(p).expanduser() for p in paths]  # "~/imgs" quoted: the input-folder check below must see it
    with torch_threads(threads):
        inferencer = load_inferencer(run, device, threads, trust_code=trust_code)
        images = find_images(paths)
        out = Path(out).expanduser()
        writes = _prepare_out_folder(out, paths, images, overlays, masks)
        claim_out_folder(out, writes)
        samples = [Sample(path) for path in images]
        loader = make_loader(
            samples, inferencer.image_size, inferencer.resize_size, batch_size=batch_size, skip_bad=not strict
        )
        csv_path = out / "predictions.csv"
        enlarged: list[tuple[Path, list[int]]] = []  # (path, [height, width]): only those, so memory stays flat
        (out / "skipped.csv").unlink(missing_ok=True)  # a list left by an earlier run into this folder would mislead
        try:
            # surrogateescape: a file name that is not UTF-8 is written back as the bytes it has on disk.
            with (
                open(csv_path, "w", newline="", encoding="utf-8", errors="surrogateescape") as csv_file,
                open(out / "predictions.jsonl", "w", encoding="utf-8") as jsonl_file,
            ):
                writer = csv.writer(csv_file)
                writer.writerow(CSV_COLUMNS)
                for batch in FitContext(quiet=quiet).progress_images(loader, "predicting"):
                    if batch is None:
                        continue
                    predictions = inferencer.predict(batch["image"], min_area=min_area)
                    for index, size, pixels, prediction in zip(
                        batch["index"].tolist(), batch["size"].tolist(), batch["image"], predictions, strict=True
                    ):
                        if is_enlarged(size, inferencer.image_size, inferencer.resize_size):
                            enlarged.append((images[index], size))
                        row = _row(images[index], index, prediction, size, overlays, masks)
                        if overlays:  # the images first: a row written is a row whose files exist
                            image = to_uint8_image(pixels)
                            save_png(out / row["overlay"], heatmap_overlay(image, prediction.norm_map, prediction.mask))
                        if masks:
                            save_png(out / row["mask"], prediction.mask.astype(np.uint8) * 255)
                        writer.writerow(
                            [
                                row[c] if c != "regions" else json.dumps(row[c], separators=(",", ":"))
                                for c in CSV_COLUMNS
                            ]
                        )
                        jsonl_file.write(json.dumps(row) + "\n")
                    csv_file.flush()
                    jsonl_file.flush()
        finally:  # also when interrupted: the files skipped so far are listed next to the rows written so far
            bad = getattr(loader.dataset, "bad_files", [])
            if bad:
                with open(out / "skipped.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
                    csv.writer(f).writerows([("path", "reason"), *bad])
        if len(bad) == len(images):
            raise DataError(f"None of the {len(images)} images could be read; see {out / 'skipped.csv'}.")
        warn_enlarged(enlarged, inferencer.image_size, inferencer.resize_size)
        return csv_path
