"""The Python API behind the CLI: fit a run, test it on labelled data, predict on new images.

>>> run = flawscope.fit("patchcore", "datasets/mtd", "runs/mtd", options={"backbone": "efficientnet_lite0"})
>>> metrics = flawscope.test(run, "datasets/mtd")
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibration import DEFAULT_TARGET_FPR, check_target_fpr, threshold_f1, threshold_from_normals
from .data import (
    DatasetSplit,
    Sample,
    load_anomaly_folder,
    load_dataset,
    select_seen_anomalies,
    split_validation,
    warn_enlarged,
)
from .data.io import check_image_header
from .errors import ConfigError, DataError
from .fitting import FitContext, preserved_random_state, torch_threads
from .model_io import load_model, read_model_info, save_model
from .models.base import AnomalyModel
from .outputs import RUN_FILES, TEST_FILES, check_outside, claim_out_folder
from .registry import get_method
from .run_data import refuse_training_data, run_dataset, run_record
from .runs import environment, file_sha256, write_json


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> the first CUDA device when present, else the CPU; anything else is checked."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {device!r} was asked for but CUDA is not available here; use --device cpu.")
    return resolved


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class ScoredImages:
    """Scores of a list of images, in order. Maps and masks are kept only when asked for."""

    samples: list[Sample]
    raw_scores: np.ndarray  # (N,) float64
    norm_scores: np.ndarray  # (N,) float64
    # (N, S, S) at the model's input; after ``evaluation.native_resolution`` a list of (H_i, W_i) arrays, one per
    # image at its file's size
    maps: np.ndarray | list[np.ndarray] | None  # float32 raw anomaly maps
    masks: np.ndarray | list[np.ndarray] | None  # bool ground truth
    seconds: float
    sizes: np.ndarray | None = None  # (N, 2) int64: each image's upright (height, width)


def score_images(
    model: AnomalyModel, samples: Sequence[Sample], ctx: FitContext, batch_size: int = 8, keep_maps: bool = False
) -> ScoredImages:
    """Runs ``model`` over ``samples`` in batches (inference mode, progress bar); warns about images the model
    enlarges more than 4x (``warn_enlarged``)."""
    model.to(ctx.device).eval()
    loader = ctx.loader(samples, model.config, batch_size)
    cfg = model.config
    size, count = cfg.image_size, len(samples)
    raw, norm = np.zeros(count), np.zeros(count)
    maps = np.zeros((count, size, size), np.float32) if keep_maps else None
    masks = np.zeros((count, size, size), bool) if keep_maps else None
    sizes = np.zeros((count, 2), np.int64)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in ctx.progress_images(loader, "scoring"):
            index = batch["index"].numpy()
            out = model(batch["image"].to(ctx.device))
            raw[index] = out.pred_score.double().cpu().numpy()
            norm[index] = out.norm_score.double().cpu().numpy()
            if keep_maps:
                maps[index] = out.anomaly_map[:, 0].float().cpu().numpy()
                masks[index] = batch["mask"][:, 0].numpy() > 0.5
            sizes[index] = batch["size"].numpy()
    seconds = time.perf_counter() - start
    files = [(sample.path, hw) for sample, hw in zip(samples, sizes.tolist(), strict=True)]
    warn_enlarged(files, cfg.image_size, cfg.resize_size)
    return ScoredImages(list(samples), raw, norm, maps, masks, seconds, sizes)


def _refuse_non_finite(scored: ScoredImages, model: str, images: str, fix: str) -> None:
    """Raises ConfigError when any image scored NaN or infinity: no threshold can be set from such scores."""
    broken = [s.path for s, score in zip(scored.samples, scored.raw_scores, strict=True) if not np.isfinite(score)]
    if broken:
        raise ConfigError(
            f"{model} gives non-finite scores (NaN or infinity) for {len(broken)} of {len(scored.samples)} {images}, "
            f"e.g. {broken[0]}, so no threshold can be set: {fix}."
        )


def calibrate(
    model: AnomalyModel, normals: Sequence[Sample], ctx: FitContext, target_fpr: float = DEFAULT_TARGET_FPR
) -> dict[str, Any]:
    """Sets the model's threshold from held-out good images and returns what was done."""
    scored = score_images(model, normals, ctx)
    _refuse_non_finite(
        scored,
        f"The trained {model.method} model",
        "held-out good images",
        "training diverged or an option is out of its sensible range. Check the --set values (learning rates, "
        "weights) and fit again",
    )
    result = threshold_from_normals(scored.raw_scores, target_fpr)
    model.set_calibration(result["threshold"], result["score_low"])
    return result


def fit(
    method: str,
    data: str | Path,
    out: str | Path,
    *,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "auto",
    val_ratio: float = 0.1,
    target_fpr: float = DEFAULT_TARGET_FPR,
    layout: str = "auto",
    category: str | None = None,
    weights_path: str | Path | None = None,
    quiet: bool = False,
    num_workers: int = 0,
    seen_anomalies: int | None = None,
    anomaly_dir: str | Path | None = None,
    threads: int | None = None,
) -> Path:
    """Trains ``method`` on the good training images of ``data`` and writes a run folder.

    ``data`` is a data set in one of ``load_dataset``'s layouts: an MVTec-style folder (``train/good``), a VisA root,
    or a plain folder whose images (directly in it) are all good ones.

    A seeded ``val_ratio`` share of the good training images is held out to calibrate the threshold; test images
    are never looked at. Writes ``out/model/`` (model.json + weights.safetensors), ``out/config.json``,
    ``out/environment.json`` and ``out/fit_log.json``.

    Few-shot methods (``supervision="few-shot"``, e.g. PRN) also train on labelled defects: ``seen_anomalies``
    of them (default 10, the paper's setting) drawn from ``anomaly_dir`` when given, else from the test split of
    ``data``, stratified over defect types with ``seed``. Their paths go into config.json and ``flawscope test``
    leaves them out of the test set.

    Training is seeded with ``seed`` (Python's, numpy's and torch's generators); the caller's global random states
    are restored afterwards (CPU, and CUDA's once CUDA is initialised).

    ``threads`` sets torch's CPU threads during the call (None: unchanged); the caller's count is restored.

    Returns:
        The run folder.
    """
    with torch_threads(threads):
        spec = get_method(method)
        config = spec.config_class.from_dict(dict(options or {}))
        check_target_fpr(target_fpr)  # before training, not after it
        torch_device = resolve_device(device)
        dataset = load_dataset(data, layout=layout, category=category)
        out = Path(out)
        check_outside(out, dataset.root, RUN_FILES)
        if (out / "model" / "model.json").is_file():
            stale = _run_outputs(out)
            warnings.warn(
                f"{out} already holds a run: its model will be replaced when this fit succeeds"
                + (
                    f", and {', '.join(p.name for p in stale)} stay from the old model until test and export run again"
                    if stale
                    else ""
                )
                + ". Give a new --out to keep both.",
                stacklevel=2,
            )
        # At least 3 held-out images, so the threshold and the normalised scale rest on more than one score.
        train, val = split_validation(dataset.train, val_ratio, seed, min_count=3 if val_ratio > 0 else 1)
        _warn_enlarged_training_images(train, config)
        with preserved_random_state():  # the seed makes the run repeatable without resetting the caller's streams
            seed_everything(seed)
            seen, seen_record = _seen_anomalies(spec, dataset, seen_anomalies, anomaly_dir, seed)
            ctx = FitContext(device=torch_device, seed=seed, quiet=quiet, num_workers=num_workers, seen_anomalies=seen)
            model = spec.model_class(config, pretrained=True, weights_path=weights_path)
            start = time.perf_counter()
            training = spec.fit(model, train, ctx)
            fit_seconds = time.perf_counter() - start
        if val:
            calibration = calibrate(model, val, ctx, target_fpr)
        else:
            calibration = {"rule": "none (no held-out images)"}
            warnings.warn(
                "No good images were held out (val_ratio=0), so the threshold is not calibrated: the decisions and "
                "normalised scores of this run mean nothing until `flawscope calibrate RUN --data DIR` sets it on a "
                "labelled validation folder (or fit again with --val-ratio 0.1).",
                stacklevel=2,
            )
        claim_out_folder(out, RUN_FILES)
        metadata = {"calibration_details": calibration, "training": training}
        pretrained = pretrained_weights(model)
        if pretrained:  # which ImageNet (or distilled) weights the fit started from, by content
            metadata["pretrained_weights"] = pretrained
        if seen_record:  # also here, so that a model folder shipped without config.json still knows them
            metadata["seen_anomalies"] = {
                "paths": seen_record["seen_anomalies"],
                "sha256": seen_record["seen_anomaly_sha256"],
            }
        save_model(model.cpu(), out / "model", metadata=metadata)
        write_json(
            out / "config.json",
            {
                "method": method,
                "options": model.config.to_dict(),  # as used: --weights may have replaced a path in it
                "seed": seed,
                "data": str(dataset.root.resolve()),
                "layout": dataset.layout,
                "category": dataset.category,
                "val_ratio": val_ratio,
                "target_fpr": target_fpr,
                "num_train": len(train),
                "num_val": len(val),
                "fit_seconds": round(fit_seconds, 2),
                "val_images": [str(s.path.resolve()) for s in val],  # absolute: read from any working folder
                **seen_record,
            },
        )
        write_json(out / "environment.json", environment(seed, str(torch_device)))
        write_json(out / "fit_log.json", ctx.log)
        return out


def _warn_enlarged_training_images(train: Sequence[Sample], config: Any) -> None:
    """``warn_enlarged`` for the training images, from their headers (the held-out ones are named when scored)."""
    sizes = []
    for sample in train:
        with contextlib.suppress(DataError):  # an unreadable image is named by the fit's own loading
            sizes.append((sample.path, check_image_header(sample.path)))
    warn_enlarged(sizes, config.image_size, config.resize_size, used="trained on")


def pretrained_weights(model: AnomalyModel) -> list[dict[str, str]]:
    """The weight files a model was built from: each backbone's (name, file, SHA-256), and EfficientAD's teacher."""
    from .backbones import Backbone

    found = [(m.name, m.weights_file) for m in model.modules() if isinstance(m, Backbone) and m.weights_file]
    teacher = getattr(model, "teacher_info", {}).get("source")
    if teacher and Path(teacher).is_file():
        found.append(("teacher", teacher))
    return [{"name": name, "file": str(file), "sha256": file_sha256(file)} for name, file in found]


DEFAULT_SEEN_ANOMALIES = 10  # PRN's "general setting" (DRA, DevNet): 10 labelled defects per category


def _seen_anomalies(
    spec, dataset: DatasetSplit, count: int | None, anomaly_dir: str | Path | None, seed: int
) -> tuple[list[Sample], dict[str, Any]]:
    """The labelled defects a few-shot method trains on, and what config.json records about them."""
    test = dataset.test
    if spec.supervision != "few-shot":
        if count or anomaly_dir:
            raise ConfigError(
                f"{spec.name} trains on good images only (supervision {spec.supervision!r}); it cannot use "
                f"seen anomalies (got seen_anomalies={count}, anomaly_dir={anomaly_dir}). Drop --seen-anomalies / "
                "--anomaly-dir, or choose a few-shot method such as prn."
            )
        return [], {}
    pool = load_anomaly_folder(anomaly_dir) if anomaly_dir else list(test)
    # A separate defect folder is used whole unless a count is given.
    requested = (len(pool) if anomaly_dir else DEFAULT_SEEN_ANOMALIES) if count is None else count
    seen = select_seen_anomalies(pool, requested, seed)
    source = (
        str(anomaly_dir)
        if anomaly_dir
        else "data, a plain folder of good images with no test split"
        if dataset.layout == "folder"
        else "test split of the data (removed from it by `flawscope test`)"
    )
    if not seen:
        why = "0 seen anomalies were asked for" if requested == 0 else f"no labelled defects with masks in the {source}"
        warnings.warn(
            f"{spec.name} trains on synthetic defects only ({why}), so it learns no real defect appearance (see "
            "docs/methods.md). Give --seen-anomalies N with a labelled test split, or --anomaly-dir DIR.",
            stacklevel=3,
        )
    elif len(seen) < requested:
        warnings.warn(
            f"{spec.name}: {requested} seen anomalies were asked for but only {len(seen)} labelled defect(s) with "
            f"masks exist in the {source}; it trains on those and on synthetic defects.",
            stacklevel=3,
        )
    if seen and not anomaly_dir and all(s in seen for s in test if s.label):
        warnings.warn(
            f"{spec.name} takes every labelled defect of the test split ({len(seen)}) to train on, and `flawscope "
            "test` leaves them out: no defective image is left to test on, so the metrics will be n/a. Ask for fewer "
            "with --seen-anomalies N, or give labelled defects of their own with --anomaly-dir DIR.",
            stacklevel=3,
        )
    record = {
        "seen_anomalies_requested": requested,
        "seen_anomalies_source": source,
        "seen_anomaly_seed": seed,
        "seen_anomalies": [str(s.path.resolve()) for s in seen],
        "seen_anomaly_sha256": [file_sha256(s.path) for s in seen],
        "seen_anomaly_masks": [str(s.mask_path.resolve()) for s in seen],
        "seen_anomalies_from_test": anomaly_dir is None,
    }
    return seen, record


def calibrate_run(
    run: str | Path,
    data: str | Path,
    *,
    rule: str = "f1",
    target_fpr: float | None = None,
    layout: str = "auto",
    category: str | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Recomputes a run's threshold on a separate labelled validation folder and saves it into the run.

    ``data`` is read like a test set (MVTec layout ``test/`` or ``test_public/``, or VisA's test rows) but must not
    be the data the model will be evaluated on: images that are among the training data set's (its training images
    or its test split) are refused. With the "fpr" rule ``data`` may also be a plain folder of good images (new good
    parts, such as MVTec LOCO's or AD 2's ``validation/good``).

    Args:
        rule: "f1" for the F1-optimal threshold (needs good and defective images), "fpr" for the quantile of the
            good images at ``target_fpr`` (None: 0.01; only the "fpr" rule uses it).

    Returns:
        The calibration details written to model.json.
    """
    if rule not in ("f1", "fpr"):
        raise ConfigError(f"Unknown calibration rule {rule!r}; use 'f1' or 'fpr'.")
    if rule == "fpr":
        target_fpr = DEFAULT_TARGET_FPR if target_fpr is None else target_fpr
        check_target_fpr(target_fpr)  # before the images are scored
    elif target_fpr is not None:
        warnings.warn(
            f"target_fpr={target_fpr} (--target-fpr) is used by the 'fpr' rule only; the 'f1' rule ignores it.",
            stacklevel=2,
        )
    info = read_model_info(run)
    dataset = run_dataset(run, data, layout, category, calibrating=True, good_only=rule == "fpr")
    samples = dataset.test or dataset.train  # a plain folder of good images (rule "fpr"): all of them
    refuse_training_data(run, samples, dataset.root)
    model = load_model(info["folder"])
    scored = score_images(model, samples, FitContext(device=resolve_device(device), quiet=quiet))
    labels = np.array([s.label for s in samples], bool)
    _refuse_non_finite(
        scored,
        f"The {model.method} model in {info['folder']}",
        f"images in {dataset.root}",
        "the model is damaged or its training diverged: fit it again",
    )
    normal, defect = scored.raw_scores[~labels], scored.raw_scores[labels]
    result = threshold_f1(normal, defect) if rule == "f1" else threshold_from_normals(normal, target_fpr)
    result["data"] = str(dataset.root.resolve())
    if normal.size < 3:
        warnings.warn(
            f"Only {normal.size} good image(s) in {dataset.root}: a threshold from so few is a guess (the fit holds "
            "out at least 3). Add good images to the validation folder.",
            stacklevel=2,
        )
    elif (normal > result["threshold"]).all():
        warnings.warn(
            f"The threshold ({result['threshold']:.6g}, rule {rule!r}) calls all {normal.size} good images of "
            f"{dataset.root} defective: on this folder ({normal.size} good, {defect.size} defective) calling every "
            "image defective gives the best F1. Either the model does not score its defective images above its good "
            "ones (check the labels, and whether the folder looks like the training images), or good images are "
            "too few among the defective ones (add some). --rule fpr sets the threshold from the good images alone.",
            stacklevel=2,
        )
    model.set_calibration(result["threshold"], result["score_low"])
    kept = ("training", "seen_anomalies", "model_id", "pretrained_weights")
    metadata = {key: info[key] for key in kept if key in info}
    save_model(model.cpu(), info["folder"], metadata={"calibration_details": result, **metadata})
    stale = _run_outputs(Path(run))
    if stale:
        warnings.warn(
            f"These outputs in {run} were made with the previous threshold and still carry it: "
            f"{', '.join(str(p.relative_to(run)) for p in stale)}. Run `flawscope export` and `flawscope test` on "
            "the run again.",
            stacklevel=2,
        )
    return result


def _run_outputs(run: Path) -> list[Path]:
    """What `flawscope test` and `flawscope export` wrote into a run folder (exports: ``export/`` only)."""
    tested = [run / name for name in TEST_FILES]
    from .export.inferencer import ONNX_SUFFIXES, TORCHSCRIPT_SUFFIXES

    folder = run / "export"
    suffixes = ONNX_SUFFIXES + TORCHSCRIPT_SUFFIXES
    exported = sorted(p for p in folder.glob("*") if p.suffix.lower() in suffixes) if folder.is_dir() else []
    return [p for p in tested if p.is_file()] + exported


def export_run(
    run: str | Path,
    out: str | Path | None = None,
    *,
    export_format: str = "onnx",
    batch: str | int = "dynamic",
    half: bool = False,
    check: bool = True,
    threads: int | None = None,
) -> tuple[Path, dict[str, Any] | None]:
    """Exports a run's whole inference graph (normalisation, calibration, threshold) to ONNX or TorchScript.

    The file is checked against the torch model on up to 4 of the run's held-out good images (random images when
    they are gone) and appears only if it agrees (``export.export_checked``); never inside the training data.

    Args:
        out: the file to write; default ``RUN/export/model.onnx`` (``.pt`` for TorchScript).
        batch: "dynamic" or a fixed batch size N.
        half: float16 weights (inputs, outputs and the threshold stay float32).
        check: False skips the parity check.
        threads: torch's CPU threads during the call (None: unchanged); the caller's count is restored.

    Returns:
        The path written and the parity report (None without ``check``); the report's ``image_source`` says
        whether held-out or random images were compared.
    """
    from .export import FORMATS, export_checked
    from .export.parity import held_out_images
    from .model_io import describe_threshold, warn_if_uncalibrated

    with torch_threads(threads):
        info = read_model_info(run)
        model = load_model(info["folder"])
        model.check_fitted()
        warn_if_uncalibrated(info, "exported model's outputs")
        if export_format not in FORMATS:
            raise ConfigError(f"Unknown export format {export_format!r}; use {' or '.join(FORMATS)}.")
        path = Path(out) if out else Path(run) / "export" / f"model{FORMATS[export_format]}"
        images = held_out_images(run, model) if check else None
        path, report = export_checked(
            model,
            path,
            export_format,
            batch=batch,
            half=half,
            images=images,
            check=check,
            data_root=run_record(run).get("data"),  # the training data, never written into
            calibrated=describe_threshold(info)[0],
        )
    if report is not None:
        report["image_source"] = "random" if images is None else "held-out"
    return path, report
