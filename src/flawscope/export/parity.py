"""Export a run to ONNX or TorchScript, and check that the exported file agrees with the torch model."""

from __future__ import annotations

import errno
import itertools
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, ModelFormatError
from ..models.base import AnomalyModel
from ..outputs import refuse_inside
from .graph import parse_batch
from .inferencer import (
    ONNX_SUFFIXES,
    TORCHSCRIPT_SUFFIXES,
    OnnxInferencer,
    TorchInferencer,
    TorchScriptInferencer,
    _BaseInferencer,
)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# Agreement required on the calibrated outputs ([0, 1]); float16 weights change the maps by about 1e-3.
PARITY_ATOL = {"float32": 1e-4, "float16": 2e-2}


def _check_export_path(path: str | Path, export_format: str) -> Path:
    """Refuses an unknown format, a folder, or a suffix that does not name the format (read back by suffix)."""
    if export_format not in FORMATS:
        raise ConfigError(f"Unknown export format {export_format!r}; use {' or '.join(FORMATS)}.")
    path = Path(path)
    if path.is_dir():
        example = path / f"model{FORMATS[export_format]}"
        raise ConfigError(f"{path} is a folder; give the file to write, e.g. {example}.")
    suffixes = ONNX_SUFFIXES if export_format == "onnx" else TORCHSCRIPT_SUFFIXES
    if path.suffix.lower() not in suffixes:  # predict and load_inferencer read the format off the suffix
        raise ConfigError(
            f"{path}: an ONNX export must end in .onnx and a TorchScript one in {', '.join(TORCHSCRIPT_SUFFIXES)} "
            f"(the file is read back by its suffix); use {path.with_suffix(FORMATS[export_format])} or choose the "
            "other --format."
        )
    return path


def _written_by_export(path: Path) -> bool:
    """True when ``path`` is a file `flawscope export` wrote: ONNX with flawscope's metadata, or a TorchScript
    archive holding its metadata file (looked up in the zip index; nothing is loaded or unpickled)."""
    from .onnx import read_onnx_metadata
    from .torchscript import EXTRA_FILE

    if path.suffix.lower() == ".onnx":
        try:
            read_onnx_metadata(path)
        except ModelFormatError:
            return False
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"/extra/{EXTRA_FILE}") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def export_model(
    model: AnomalyModel,
    path: str | Path,
    export_format: str = "onnx",
    batch: str | int = "dynamic",
    half: bool = False,
    calibrated: bool = True,
) -> Path:
    """Exports ``model`` to ``path`` in ``export_format`` ('onnx' or 'torchscript'); ``batch`` is 'dynamic' or N;
    ``calibrated=False`` records that the threshold was never set (loading the file then warns)."""
    from .onnx import export_onnx
    from .torchscript import export_torchscript

    path = _check_export_path(path, export_format)
    exporter = export_onnx if export_format == "onnx" else export_torchscript
    return exporter(model, path, batch=parse_batch(batch), half=half, calibrated=calibrated)


def open_exported(path: str | Path, device: str = "cpu", *, trust_code: bool = False) -> _BaseInferencer:
    """The inferencer of an exported file, by its suffix (ONNX, else TorchScript).

    ``trust_code=True`` is needed for a TorchScript file, as in ``load_inferencer``: loading one runs its code.
    """
    path = Path(path)
    if path.suffix.lower() in ONNX_SUFFIXES:
        return OnnxInferencer(path, device)
    return TorchScriptInferencer(path, device, trust_code=trust_code)


def parity_report(
    model: AnomalyModel, exported: _BaseInferencer, images: torch.Tensor | None = None, count: int = 4
) -> dict[str, Any]:
    """Compares an exported file's outputs with the torch model's on ``images`` (default: seeded random images).

    Returns:
        ``max_abs_norm`` (largest difference of the calibrated map and score), ``max_rel_raw`` (largest difference
        of the raw map and score relative to the raw map's range), ``decisions_equal`` (over the images scored
        farther than ``norm_atol`` from the threshold), ``near_threshold`` (how many were not), ``atol``,
        ``norm_atol`` (``atol`` carried through the calibration, see below), ``frames_finite`` and ``ok`` (the raw
        difference at most ``atol``, the calibrated one at most ``norm_atol``, those decisions equal, and the frames
        finite).

    The calibrated outputs are the raw ones times 0.5 / (threshold - score_low), clipped, so a threshold close to
    the typical normal score magnifies float rounding: the calibrated outputs may differ by ``atol`` times the raw
    map's range times that slope (``norm_atol``, never below ``atol``).

    A black and a white frame are also scored, where flat features make a float16 graph likeliest to divide 0 by 0
    or overflow: ``frames_finite`` says that the export's outputs are finite on them wherever the torch model's are
    (they are not held to the tolerance: a method's statistics of a flat image can be ill-conditioned, so float32
    rounding alone may move them more than it moves a real image's).
    """
    size = model.config.image_size
    if images is None:
        images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(1))
    frames = torch.stack([torch.zeros(3, size, size), torch.ones(3, size, size)])
    device = model.fitted.device  # the comparison runs on the CPU; the caller's model goes back where it was
    try:
        torch_model = TorchInferencer(model, "cpu")
        reference, reference_frames = torch_model.run(images), torch_model.run(frames)
    finally:
        model.to(device)
    other, other_frames = exported.run(images), exported.run(frames)
    finite = all(
        np.array_equal(
            np.isfinite(reference_frames[k]), np.isfinite(reference_frames[k]) & np.isfinite(other_frames[k])
        )
        for k in reference_frames
    )
    norm = max(float(np.abs(reference[k] - other[k]).max()) for k in ("norm_map", "norm_score"))
    spread = max(float(np.ptp(reference["anomaly_map"])), 1e-12)
    raw = max(float(np.abs(reference[k] - other[k]).max()) for k in ("anomaly_map", "pred_score")) / spread
    atol = PARITY_ATOL[exported.metadata.get("precision", "float32")]
    slope = 0.5 / max(float(model.threshold - model.score_low), 1e-12)
    norm_atol = atol * max(1.0, slope * spread)
    # An image scored within the tolerance of the threshold may go either way (calibration keeps the held-out images
    # off it, but another image may score close to it); every other decision must agree.
    clear = np.abs(reference["norm_score"] - 0.5) > norm_atol
    decisions = bool(np.array_equal(reference["norm_score"][clear] > 0.5, other["norm_score"][clear] > 0.5))
    return {
        "images": int(images.shape[0]),
        "max_abs_norm": norm,
        "max_rel_raw": raw,
        "decisions_equal": decisions,
        "near_threshold": int((~clear).sum()),
        "atol": atol,
        "norm_atol": norm_atol,
        "frames_finite": finite,
        # The raw check matters where the calibrated outputs clip to 0 or 1 (then they agree trivially).
        "ok": bool(norm <= norm_atol and raw <= atol and decisions and finite),
    }


def held_out_images(run: str | Path, model: AnomalyModel, count: int = 4) -> torch.Tensor | None:
    """Up to ``count`` of the run's held-out good images (config.json), preprocessed; None when unavailable.

    Real images keep the calibrated outputs away from the clipping at 0 and 1 that random noise images reach.
    """
    from ..data import preprocess, read_image
    from ..errors import DataError
    from ..run_data import missing_images_reason, run_record

    listed = run_record(run).get("val_images", [])
    cfg = model.config
    images = []
    for path in listed[:count]:
        try:
            images.append(preprocess(read_image(path), cfg.image_size, cfg.resize_size))
        except (DataError, OSError):
            continue
    if listed and not images:
        warnings.warn(
            f"None of the run's held-out images could be read (e.g. {listed[0]}: {missing_images_reason(listed)}); "
            "the export is checked on random images instead, whose calibrated outputs mostly clip to 0 or 1.",
            stacklevel=2,
        )
    return torch.stack(images) if images else None


def check_parity(
    model: AnomalyModel,
    path: str | Path,
    images: torch.Tensor | None = None,
    name: str | None = None,
    *,
    trust_code: bool = False,
) -> dict[str, Any]:
    """``parity_report`` for an exported file; raises ModelFormatError when it does not agree with ``model``.

    ``name`` is how the error names the file (default: ``path``); ``trust_code`` as in ``open_exported`` (a
    TorchScript file runs its code when loaded).
    """
    report = parity_report(model, open_exported(path, "cpu", trust_code=trust_code), images)
    if not report["ok"]:
        raise ModelFormatError(
            f"The exported {name or path} does not reproduce the torch model: largest difference of the calibrated "
            f"outputs {report['max_abs_norm']:.2e} (allowed {report['norm_atol']:.1e}), of the raw outputs "
            f"{report['max_rel_raw']:.2e} of the map's range (allowed {report['atol']:.0e}), decisions equal: "
            f"{report['decisions_equal']}, finite on a black and a white frame: {report['frames_finite']}. Please "
            "report this with the model's method and options (a float16 export that is not finite: use float32)."
        )
    return report


def _check_free_space(model: AnomalyModel, folder: Path, half: bool) -> None:
    """Raises OSError(ENOSPC) when ``folder``'s disk cannot hold the export: torch.jit.save aborts the whole process
    on a full disk (a C++ exception nothing can catch), leaving its partial file behind."""
    tensors = {t.data_ptr(): t for t in itertools.chain(model.parameters(), model.buffers())}.values()  # also the
    # non-persistent buffers (projections, normalisation constants), which the export holds but state_dict leaves out
    size = sum(t.numel() * (2 if half and t.is_floating_point() else t.element_size()) for t in tensors)
    needed = int(size * 1.1) + (16 << 20)  # the graph, the metadata, file-system blocks
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: the export needs about {needed >> 20} MiB, {free >> 20} MiB free",
            str(folder),
        )


def export_checked(
    model: AnomalyModel,
    path: str | Path,
    export_format: str = "onnx",
    batch: str | int = "dynamic",
    half: bool = False,
    images: torch.Tensor | None = None,
    check: bool = True,
    data_root: str | Path | None = None,
    calibrated: bool = True,
) -> tuple[Path, dict[str, Any] | None]:
    """``export_model``, then ``check_parity`` on ``images``; the file appears at ``path`` only if it agrees.

    ``path`` may replace an earlier export but no other file, and may not lie in ``data_root`` (the training data).

    The export is written into a temporary folder next to ``path`` (with its final name, so an ONNX file over 2 GB
    and its ``.data`` file keep matching names) and moved into place after the check: a file that failed it is never
    left where predict would pick it up, and an older file at ``path`` stays as it was.

    Returns:
        The path written and the parity report (None when ``check`` is False).
    """
    path = _check_export_path(path, export_format)
    model.check_fitted()
    if data_root is not None:  # the data the model was trained on
        refuse_inside(path, data_root, "--out")
    if path.exists() and not _written_by_export(path):
        raise ConfigError(
            f"--out {path} exists and was not written by `flawscope export`; flawscope never overwrites files it did "
            "not write. Choose another --out, or move the file away."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(model, path.parent, half)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        export_model(model, staging / path.name, export_format, batch=batch, half=half, calibrated=calibrated)
        name = f"{path} (not written)"
        # trust_code: the file this call has just written
        report = check_parity(model, staging / path.name, images, name=name, trust_code=True) if check else None
        for written in staging.iterdir():
            written.replace(path.parent / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path, report
