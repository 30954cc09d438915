"""Export a run to ONNX or TorchScript, and check that the exported file agrees with the torch model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, ModelFormatError
from ..models.base import AnomalyModel
from .graph import parse_batch
from .inferencer import OnnxInferencer, TorchInferencer, TorchScriptInferencer, _BaseInferencer

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# Agreement required on the calibrated outputs ([0, 1]); float16 weights change the maps by about 1e-3.
PARITY_ATOL = {"float32": 1e-4, "float16": 2e-2}


def export_model(
    model: AnomalyModel, path: str | Path, export_format: str = "onnx", batch: str | int = "dynamic", half: bool = False
) -> Path:
    """Exports ``model`` to ``path`` in ``export_format`` ('onnx' or 'torchscript'); ``batch`` is 'dynamic' or N."""
    from .onnx import export_onnx
    from .torchscript import export_torchscript

    if export_format not in FORMATS:
        raise ConfigError(f"Unknown export format {export_format!r}; use {' or '.join(FORMATS)}.")
    path = Path(path)
    if path.is_dir():
        example = path / f"model{FORMATS[export_format]}"
        raise ConfigError(f"{path} is a folder; give the file to write, e.g. {example}.")
    if (path.suffix == ".onnx") != (export_format == "onnx"):  # open_exported() reads the format off the suffix
        raise ConfigError(
            f"{path}: an ONNX export must end in .onnx and a TorchScript one must not (the file is read back by its "
            f"suffix); use {path.with_suffix(FORMATS[export_format])} or choose the other --format."
        )
    exporter = export_onnx if export_format == "onnx" else export_torchscript
    return exporter(model, path, batch=parse_batch(batch), half=half)


def open_exported(path: str | Path, device: str = "cpu") -> _BaseInferencer:
    """The inferencer of an exported file, by its suffix."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxInferencer(path, device)
    return TorchScriptInferencer(path, device)


def parity_report(
    model: AnomalyModel, exported: _BaseInferencer, images: torch.Tensor | None = None, count: int = 4
) -> dict[str, Any]:
    """Compares an exported file's outputs with the torch model's on ``images`` (default: seeded random images).

    Returns:
        ``max_abs_norm`` (largest difference of the calibrated map and score), ``max_rel_raw`` (largest difference
        of the raw map and score relative to the raw map's range), ``decisions_equal`` (over the images scored
        farther than ``atol`` from the threshold), ``near_threshold`` (how many were not), ``atol`` and ``ok`` (both
        differences at most ``atol`` and those decisions equal).
    """
    if images is None:
        size = model.config.image_size
        images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(1))
    reference = TorchInferencer(model, "cpu").run(images)
    other = exported.run(images)
    norm = max(float(np.abs(reference[k] - other[k]).max()) for k in ("norm_map", "norm_score"))
    spread = max(float(np.ptp(reference["anomaly_map"])), 1e-12)
    raw = max(float(np.abs(reference[k] - other[k]).max()) for k in ("anomaly_map", "pred_score")) / spread
    atol = PARITY_ATOL[exported.metadata.get("precision", "float32")]
    # An image scored within the tolerance of the threshold may go either way (the threshold is often exactly a
    # held-out image's score); every other decision must agree.
    clear = np.abs(reference["norm_score"] - 0.5) > atol
    decisions = bool(np.array_equal(reference["norm_score"][clear] > 0.5, other["norm_score"][clear] > 0.5))
    return {
        "images": int(images.shape[0]),
        "max_abs_norm": norm,
        "max_rel_raw": raw,
        "decisions_equal": decisions,
        "near_threshold": int((~clear).sum()),
        "atol": atol,
        # The raw check matters where the calibrated outputs clip to 0 or 1 (then they agree trivially).
        "ok": bool(norm <= atol and raw <= atol and decisions),
    }


def held_out_images(run: str | Path, model: AnomalyModel, count: int = 4) -> torch.Tensor | None:
    """Up to ``count`` of the run's held-out good images (config.json), preprocessed; None when unavailable.

    Real images keep the calibrated outputs away from the clipping at 0 and 1 that random noise images reach.
    """
    from ..data import preprocess, read_image
    from ..errors import DataError

    config = Path(run) / "config.json"
    if not config.is_file():
        return None
    cfg = model.config
    images = []
    for path in json.loads(config.read_text()).get("val_images", [])[:count]:
        try:
            images.append(preprocess(read_image(path), cfg.image_size, cfg.resize_size))
        except (DataError, OSError):
            continue
    return torch.stack(images) if images else None


def check_parity(model: AnomalyModel, path: str | Path, images: torch.Tensor | None = None) -> dict[str, Any]:
    """``parity_report`` for an exported file; raises ModelFormatError when it does not agree with ``model``."""
    report = parity_report(model, open_exported(path, "cpu"), images)
    if not report["ok"]:
        raise ModelFormatError(
            f"The exported {path} does not reproduce the torch model: largest difference of the calibrated outputs "
            f"{report['max_abs_norm']:.2e}, of the raw outputs {report['max_rel_raw']:.2e} of the map's range "
            f"(allowed {report['atol']:.0e}), decisions equal: {report['decisions_equal']}. Please report this with "
            "the model's method and options."
        )
    return report
