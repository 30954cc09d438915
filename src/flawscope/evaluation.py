"""`flawscope test`: score a labelled test set, compute the metrics, write metrics.json, per_image.csv, report.html."""

from __future__ import annotations

import csv
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics as M
from .api import ScoredImages, resolve_device, score_images
from .data import DatasetSplit, ImageDataset, exclude_samples, read_mask, to_uint8_image
from .errors import ConfigError, DataError
from .fitting import FitContext, torch_threads
from .model_io import describe_threshold, load_model, read_model_info
from .models.base import AnomalyModel
from .outputs import TEST_FILES, check_outside, claim_out_folder
from .report import Curve, GalleryItem, heatmap_overlay, write_report
from .run_data import run_dataset, run_record
from .runs import write_json

GALLERY_SIZE = 6
# Where the pixel metrics are computed: on the model's input grid, or at each test image's own size.
EVAL_RESOLUTIONS = ("input", "native")


def _defined(fn, *args) -> Any:
    """A metric's value, or None when it is undefined for this data (e.g. no defective images)."""
    try:
        return fn(*args)
    except DataError:
        return None


def _any_defect(masks: np.ndarray | list[np.ndarray] | None) -> bool:
    """True when any mask, stacked (N, H, W) or one (H_i, W_i) array per image, marks a defect pixel."""
    return masks is not None and any(bool(mask.any()) for mask in masks)


def _take(images: np.ndarray | list[np.ndarray], keep: np.ndarray) -> np.ndarray | list[np.ndarray]:
    """The entries of ``images`` (stacked, or one array per image) where the (N,) bool ``keep`` is True."""
    return images[keep] if isinstance(images, np.ndarray) else [images[i] for i in np.flatnonzero(keep)]


def native_resolution(scored: ScoredImages) -> ScoredImages:
    """The same scores with each raw map resized (bilinear) to its image's own (height, width) and each mask read
    at that size: pixel metrics at the native resolution (the maps and masks become lists, one array per image).

    Only meaningful when the model saw the whole image (``resize_size=0``), which ``test`` checks.
    """
    if scored.maps is None or scored.sizes is None:
        raise ValueError("native_resolution needs the maps and image sizes that score_images(keep_maps=True) keeps.")
    maps, masks = [], []
    for sample, raw_map, (height, width) in zip(scored.samples, scored.maps, scored.sizes.tolist(), strict=True):
        grid = torch.from_numpy(raw_map)[None, None]
        maps.append(F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy())
        if sample.mask_path is None:
            masks.append(np.zeros((height, width), bool))
        else:
            masks.append(read_mask(sample.mask_path, size=(height, width), image_path=sample.path))
    return dataclasses.replace(scored, maps=maps, masks=masks)


def _refuse_native(cfg: Any, why: str) -> None:
    """Raises the ConfigError of a native-resolution evaluation the run's geometry does not allow."""
    raise ConfigError(
        f"eval_resolution native (--eval-resolution native) puts the model's map back onto the whole image, but {why} "
        f"(resize_size={cfg.resize_size}, image_size={cfg.image_size}), so the map covers only part of it. Evaluate "
        "at the model's input (the default), or fit with --resize-size 0 (the whole image resized) to evaluate at "
        "the native resolution."
    )


IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
METRIC_KEYS = IMAGE_METRICS + PIXEL_METRICS  # metrics.json's metrics (DESIGN), fractions in [0, 1] or None


def compute_metrics(scored: ScoredImages) -> tuple[dict[str, Any], list[Curve]]:
    """Image and pixel metrics of a scored test set, with the curves for the report. The maps and masks may be
    stacked or one array per image (``native_resolution``)."""
    labels = np.array([s.label for s in scored.samples], bool)
    result: dict[str, Any] = {}
    image = _defined(M.image_metrics, scored.raw_scores, labels) or {}
    for key in IMAGE_METRICS:
        result[key] = image.get(key)
    has_defect_pixels = _any_defect(scored.masks)
    pixel, pro_curve = (
        _defined(M.pixel_metrics_and_pro_curve, scored.maps, scored.masks) if has_defect_pixels else None
    ) or ({}, None)
    for key in PIXEL_METRICS:
        result[key] = pixel.get(key)
    curves = []
    if result["image_auroc"] is not None:
        fpr, tpr, _ = M.roc_curve(scored.raw_scores, labels)
        curves.append(
            Curve("ROC (image)", fpr, tpr, "false positive rate", "true positive rate", result["image_auroc"])
        )
        precision, recall, _ = M.pr_curve(scored.raw_scores, labels)
        curves.append(Curve("PR (image)", recall, precision, "recall", "precision", result["image_ap"]))
    if pro_curve is not None:
        fpr, pro = pro_curve
        curves.append(
            Curve("PRO (pixel)", fpr, pro, "false positive rate", "per-region overlap", result["pixel_aupro"], xmax=0.3)
        )
    return result, curves


def per_type_metrics(scored: ScoredImages) -> dict[str, dict[str, Any]]:
    """Each defect type's images together with the good images: image AUROC, and with maps pixel AUROC and AUPRO."""
    types = sorted({s.defect_type for s in scored.samples if s.label == 1})
    good = np.array([s.label == 0 for s in scored.samples])
    table = {}
    for defect_type in types:
        chosen = np.array([s.defect_type == defect_type for s in scored.samples])
        keep = chosen | good
        row = {"count": int(chosen.sum()), "image_auroc": _defined(M.auroc, scored.raw_scores[keep], chosen[keep])}
        if scored.maps is not None and _any_defect(_take(scored.masks, chosen)):
            pixel = _defined(M.pixel_metrics, _take(scored.maps, keep), _take(scored.masks, keep)) or {}
            row.update({key: pixel.get(key) for key in ("pixel_auroc", "pixel_aupro")})
        table[defect_type] = row
    return table


def write_per_image(path: Path, scored: ScoredImages, calibrated: bool) -> None:
    """per_image.csv: path, defect type, label, raw and normalised score, decision at the calibrated threshold
    (``norm_score > 0.5``, as predict and exported models decide; "n/a" when the threshold is not ``calibrated``)."""
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "defect_type", "label", "raw_score", "norm_score", "decision"])
        for sample, raw, norm in zip(scored.samples, scored.raw_scores, scored.norm_scores, strict=True):
            decision = "n/a" if not calibrated else "defective" if norm > 0.5 else "good"
            writer.writerow([sample.path, sample.defect_type, sample.label, f"{raw:.6g}", f"{norm:.4f}", decision])


def _gallery(model: AnomalyModel, scored: ScoredImages, calibrated: bool) -> dict[str, list[GalleryItem]]:
    """Worst-scored good images and best/worst-scored defective images with overlays (each image shown once);
    captions give the decision only when the threshold was ``calibrated``."""
    cfg = model.config
    dataset = ImageDataset(scored.samples, cfg.image_size, cfg.resize_size)
    labels = np.array([s.label for s in scored.samples])
    order = np.argsort(-scored.raw_scores, kind="stable")
    good = [i for i in order if labels[i] == 0]
    defective = [i for i in order if labels[i] == 1]
    highest = defective[:GALLERY_SIZE]
    sections = {
        "Good images with the highest scores (possible false alarms)": good[:GALLERY_SIZE],
        "Defective images with the highest scores": highest,
        "Defective images with the lowest scores (possible misses)": [i for i in defective[::-1] if i not in highest][
            :GALLERY_SIZE
        ],
    }
    gallery = {}
    for title, indices in sections.items():
        items = []
        for i in indices:
            image = to_uint8_image(dataset[i]["image"])
            norm_map = model.normalize(torch.from_numpy(scored.maps[i])).numpy()
            overlay = heatmap_overlay(image, norm_map, scored.masks[i] if scored.masks[i].any() else None)
            sample = scored.samples[i]
            score = scored.norm_scores[i]  # rounded, 0.503 reads "0.50"; the decision is named for that reason
            decision = "defective" if score > 0.5 else "good"
            raw = f"raw {scored.raw_scores[i]:.4g}"
            caption = f"{sample.defect_type} · " + (f"score {score:.3f} → {decision} ({raw})" if calibrated else raw)
            items.append(GalleryItem(sample.path.name, caption, overlay))
        if items:
            gallery[title] = items
    return gallery


def seen_anomalies_of(run: str | Path) -> tuple[list[str], list[str]]:
    """Image paths and file SHA-256 of the labelled defects a run trained on (empty lists if none).

    Read from the run's config.json, or, for a model folder copied without it, from its model.json, which holds
    the same list, so a shipped model is never tested on the defects it trained on. Runs fitted before the digests
    were recorded give paths only; model folders written before model.json held the list give the paths PRN's
    training report recorded, as typed at fit time.
    """
    record = run_record(run)
    if "seen_anomalies" in record:
        return list(record["seen_anomalies"]), list(record.get("seen_anomaly_sha256", []))
    info = read_model_info(run)
    seen = info.get("seen_anomalies") or {}
    if seen:
        return list(seen.get("paths", [])), list(seen.get("sha256", []))
    return list((info.get("training") or {}).get("seen_anomalies", [])), []


def _warn_replaced(out: Path, dataset: DatasetSplit, info: dict[str, Any], report: bool) -> None:
    """Warns when ``out`` holds the metrics of another model (by model.json's ``model_id``, the fitted weights'
    SHA-256: a copied or recalibrated run is the same model), data set or category, which this test replaces, and
    when a report.html there stays from an earlier test (``report=False``)."""
    if not report and (out / "report.html").is_file():
        warnings.warn(
            f"{out / 'report.html'} stays from an earlier test and does not show these results (--no-report). "
            "Delete it, or test without --no-report to replace it.",
            stacklevel=3,
        )
    path = out / "metrics.json"
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(previous, dict):
        return
    # Older metrics.json files hold the data path as typed, no category and no model_id.
    where = (str(Path(previous.get("data", "")).resolve()), previous.get("category", dataset.category))
    now = (str(dataset.root.resolve()), dataset.category)
    if where != now:
        warnings.warn(
            f"{path} holds the results on {where[0]} (category {where[1]!r}); they are replaced by those on "
            f"{now[0]} (category {now[1]!r}). Give each test its own --out to keep both.",
            stacklevel=3,
        )
    if None not in (previous.get("model_id"), info.get("model_id")) and previous["model_id"] != info["model_id"]:
        warnings.warn(
            f"{path} holds the results of another model ({previous.get('method')}, model_id "
            f"{str(previous['model_id'])[:12]}); they are replaced by those of {info['folder']} "
            f"({info['method']}). Give each test its own --out to keep both.",
            stacklevel=3,
        )


def _check_masks(
    scored: ScoredImages, pixels: ScoredImages, root: Path, eval_resolution: str
) -> tuple[list[str], list[str], list[str]]:
    """Warns about the test masks that make pixel metrics wrong or impossible; returns the three lists for
    metrics.json: defective images without a mask, with an empty mask (at the evaluated size), and with a mask
    covering over 95 % of the image (``pixels``: the scored images at the evaluated size)."""
    maskless = [str(s.path) for s in scored.samples if s.label and s.mask_path is None]
    if maskless:
        warnings.warn(
            f"{len(maskless)} defective test image(s) have no mask ({root} has no ground_truth/ folder), "
            "so only the image metrics are computed. For pixel metrics add ground_truth/<type>/<stem>_mask.png "
            "for each of them.",
            stacklevel=3,
        )
    unmarked = [
        str(s.path)
        for s, mask in zip(pixels.samples, pixels.masks, strict=True)
        if s.label and s.mask_path is not None and not mask.any()
    ]
    if unmarked:
        where = (
            "in their mask file (it is empty)"
            if eval_resolution == "native"
            else "in their mask at the model's input size (the mask file is empty, the centre crop cut the defect "
            "off (fit with --resize-size 0 to keep the whole image), or the defect is under a pixel after "
            "resizing)"
        )
        warnings.warn(
            f"{len(unmarked)} defective test image(s) have no defect pixel {where}, e.g. {unmarked[0]}: pixel "
            "metrics count all their pixels as normal and AUPRO has no region of theirs. Check those masks "
            "(listed in metrics.json under unmarked_defective).",
            stacklevel=3,
        )
    full = [str(s.path) for s, mask in zip(pixels.samples, pixels.masks, strict=True) if s.label and mask.mean() > 0.95]
    if full:
        warnings.warn(
            f"{len(full)} defective test image(s) have a mask that marks more than 95 % of the image as defect, "
            f"e.g. {full[0]}: an inverted mask, or one drawn only in its alpha channel (flawscope reads a mask's "
            "colour and ignores alpha) would look like this. Check those masks (listed in metrics.json under "
            "nearly_full_masks).",
            stacklevel=3,
        )
    return maskless, unmarked, full


def test(
    run: str | Path,
    data: str | Path,
    *,
    out: str | Path | None = None,
    layout: str = "auto",
    category: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
    quiet: bool = False,
    report: bool = True,
    exclude_seen_of: str | Path | None = None,
    threads: int | None = None,
    eval_resolution: str = "input",
) -> dict[str, Any]:
    """Evaluates a run on the test split of ``data``.

    Pixel metrics are computed on the model's input grid (``eval_resolution="input"``, the masks resized as the
    images were), or with ``"native"`` at each test image's own size: the map resized bilinearly to the image, the
    mask as read. Native needs a model that sees the whole image (``resize_size=0``, or square images and
    ``resize_size == image_size``) and memory for all full-size maps at once (about 15 bytes a pixel at the peak).

    Defective images the run trained on (few-shot methods; listed in its config.json) are removed from the test
    set first; ``exclude_seen_of`` removes those of another run too, so an unsupervised model can be compared
    with a few-shot one on the very same images. The removed paths are listed in metrics.json.

    ``data`` is read by ``run_dataset``: on a multi-category root, the run's own category unless ``category``
    names another (which warns, as a cross-category result).

    Writes into ``out`` (default: the run folder) ``metrics.json``, ``per_image.csv``, ``curves.json`` and
    ``report.html``; replacing the results of another data set or category there warns.

    ``threads`` sets torch's CPU threads during the call (None: unchanged); the caller's count is restored.

    Returns:
        The metrics dictionary written to metrics.json.
    """
    with torch_threads(threads):
        _check_options(exclude_seen_of, eval_resolution)
        run = Path(run)
        info = read_model_info(run)
        model = load_model(info["folder"])
        cfg = model.config
        # The model sees the whole image when it is resized whole (resize_size 0), or square and resized to image_size.
        whole_if_square = cfg.resize_size == cfg.image_size
        if eval_resolution == "native" and cfg.resize_size != 0 and not whole_if_square:
            _refuse_native(cfg, "this run crops the centre of every image")
        dataset = run_dataset(run, data, layout, category)
        out = Path(out) if out else run
        writes = [name for name in TEST_FILES if report or name != "report.html"]
        check_outside(out, dataset.root, writes)
        claim_out_folder(out)  # the names are listed once they are written
        _warn_replaced(out, dataset, info, report)
        paths, digests = seen_anomalies_of(run)
        if exclude_seen_of:
            other_paths, other_digests = seen_anomalies_of(exclude_seen_of)
            paths, digests = paths + other_paths, digests + other_digests
        test_samples, excluded = exclude_samples(dataset.test, paths, digests)
        ctx = FitContext(device=resolve_device(device), quiet=quiet)
        scored = score_images(model, test_samples, ctx, batch_size, keep_maps=True)
        model.cpu()
        start = time.perf_counter()
        if eval_resolution == "native" and cfg.resize_size != 0:  # whole_if_square: refuse any oblong image
            oblong = [s.path for s, (h, w) in zip(scored.samples, scored.sizes.tolist(), strict=True) if h != w]
            if oblong:
                _refuse_native(
                    cfg, f"this run crops the centre of oblong images ({len(oblong)} here, e.g. {oblong[0]})"
                )
        pixels = native_resolution(scored) if eval_resolution == "native" else scored
        metrics, curves = compute_metrics(pixels)
        metric_seconds = time.perf_counter() - start
        maskless, unmarked, full = _check_masks(scored, pixels, dataset.root, eval_resolution)
        calibrated, threshold_line = describe_threshold(info)
        metrics.update(_decision_counts(scored, calibrated))
        metrics.update(
            {
                "threshold": float(model.threshold),
                "threshold_calibrated": calibrated,
                "threshold_rule": threshold_line,
                "inference_seconds": round(scored.seconds, 3),
                "images_per_second": round(len(scored.samples) / max(scored.seconds, 1e-9), 2),
                "metrics_seconds": round(metric_seconds, 3),
                "per_type": per_type_metrics(pixels),
                "eval_resolution": eval_resolution,
                "method": info["method"],
                "model_id": info.get("model_id"),
                "data": str(dataset.root.resolve()),
                "layout": dataset.layout,
                "category": dataset.category,
                "seed": run_record(run).get("seed"),
                "torch_threads": torch.get_num_threads(),  # scores move at float rounding with the thread count
                "batch_size": batch_size,
                "num_excluded_seen": len(excluded),
                "excluded_seen": [str(s.path) for s in excluded],
                "defective_without_mask": maskless,
                "unmarked_defective": unmarked,
                "nearly_full_masks": full,
            }
        )
        try:
            write_json(out / "metrics.json", metrics)
            write_json(out / "curves.json", {c.name: c.to_dict() for c in curves})
            write_per_image(out / "per_image.csv", scored, calibrated)
            if report:
                write_report(
                    out / "report.html",
                    title=f"flawscope test report: {info['method']} on {dataset.category}",
                    info=_report_cards(metrics, info, run, cfg.image_size, exclude_seen_of),
                    metrics={k: metrics[k] for k in METRIC_KEYS},
                    per_type=metrics["per_type"],
                    curves=curves,
                    gallery=_gallery(model, scored, calibrated),
                    reasons=dict.fromkeys(PIXEL_METRICS, "needs masks") if maskless else {},
                )
        finally:  # what this call wrote is flawscope's, also when it stops half-way (check_outside refused the rest)
            claim_out_folder(out, [name for name in writes if (out / name).exists()])
        return metrics


def _check_options(exclude_seen_of: str | Path | None, eval_resolution: str) -> None:
    """Refuses a ``--exclude-seen-of`` that is not a run folder and an unknown ``eval_resolution``."""
    if exclude_seen_of is not None and not (Path(exclude_seen_of) / "config.json").is_file():
        raise ConfigError(
            f"--exclude-seen-of {exclude_seen_of} is not a run folder (no config.json in it); give the folder that "
            "`flawscope fit --out` wrote for the few-shot run whose seen defects should be left out."
        )
    if eval_resolution not in EVAL_RESOLUTIONS:
        raise ConfigError(f"eval_resolution must be one of {', '.join(EVAL_RESOLUTIONS)}; got {eval_resolution!r}.")


def _decision_counts(scored: ScoredImages, calibrated: bool) -> dict[str, Any]:
    """Image counts, and the deployed decisions' accuracy, false alarms and misses (None when not calibrated)."""
    labels = np.array([s.label for s in scored.samples])
    # The deployed decision: the calibrated score above 0.5, computed in the model's graph. It equals
    # raw > threshold but for raw scores a float32 rounding step above the threshold.
    decisions = scored.norm_scores > 0.5
    # Without a calibrated threshold there are no decisions to count.
    return {
        "num_images": int(labels.size),
        "num_good": int((labels == 0).sum()),
        "num_defective": int(labels.sum()),
        "accuracy_at_threshold": float((decisions == (labels == 1)).mean()) if calibrated else None,
        "num_false_alarms": int((decisions & (labels == 0)).sum()) if calibrated else None,
        "num_missed": int((~decisions & (labels == 1)).sum()) if calibrated else None,
    }


def _report_cards(
    metrics: dict[str, Any], info: dict[str, Any], run: Path, image_size: int, exclude_seen_of: str | Path | None
) -> dict[str, str]:
    """The report's summary lines: model, run, data, threshold, images, where pixels were scored, decisions."""
    num_good, num_defective = metrics["num_good"], metrics["num_defective"]
    if metrics["threshold_calibrated"]:
        decided = (
            f"{metrics['num_false_alarms']} of {num_good} good images flagged, {metrics['num_missed']} of "
            f"{num_defective} defective missed"
        )
    else:
        decided = "none: the threshold is not calibrated (run `flawscope calibrate`); use the raw scores"
    cards = {
        "model": info["method"],
        "backbone": info["config"].get("backbone", ""),
        "run": str(run.resolve()),
        "data": metrics["data"],
        "threshold": metrics["threshold_rule"],
        "images": f"{metrics['num_images']} ({num_good} good, {num_defective} defective)",
        "pixel metrics at": (
            "each image's own size (native)"
            if metrics["eval_resolution"] == "native"
            else f"the model input, {image_size} x {image_size}"
        ),
        "decisions": decided,
    }
    if metrics["num_excluded_seen"]:
        whose = "this run" + (f" and {exclude_seen_of}" if exclude_seen_of else "")
        count = metrics["num_excluded_seen"]
        cards["excluded"] = f"{count} seen defects that {whose} trained on (listed in metrics.json)"
    unmarked, full = metrics["unmarked_defective"], metrics["nearly_full_masks"]
    if metrics["defective_without_mask"]:
        cards["masks"] = "none (no ground_truth/ folder): image metrics only"
    elif unmarked or full:
        cards["masks"] = (
            f"{len(unmarked)} with no defect pixel, {len(full)} marking over 95 % of the image: check them "
            "(unmarked_defective and nearly_full_masks in metrics.json)"
        )
    return cards
