"""TorchScript export by tracing, with the metadata as a JSON extra file inside the archive.

Tracing (``torch.jit.trace``) works for every model because the contract forbids data-dependent Python branches in
``forward``: the only branches depend on the configuration and on buffer shapes, which are fixed once a model is
fitted. The traced graph keeps the batch dimension symbolic, so one file serves any batch size.

Loading uses ``torch.jit.load``, which reads the archive with TorchScript's own loader (tensors and TorchScript code,
no Python pickle). That code runs while the file loads, with the user's full access to files: load only files you
trust (``TorchScriptInferencer`` asks for ``trust_code=True``), or use ONNX.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFormatError
from ..models.base import AnomalyModel
from .graph import ExportGraph, example_input, export_metadata, metadata_json, read_metadata

EXTRA_FILE = "flawscope.json"


def export_torchscript(
    model: AnomalyModel, path: str | Path, *, batch: int | None = None, half: bool = False, calibrated: bool = True
) -> Path:
    """Writes ``model``'s inference graph to ``path`` as a TorchScript archive.

    Args:
        model: a fitted model (not changed).
        path: the file to write (.pt), its folder is created.
        batch: None for any batch size, else the fixed batch size recorded in the metadata (inferencers pad to it).
        half: float16 weights (inputs and outputs stay float32).
        calibrated: whether the model's threshold was calibrated (recorded in the metadata; loading warns if not).

    Returns:
        ``path``.
    """
    model.check_fitted()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = ExportGraph(model, half=half).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived Python ints, fixed after fitting
        traced = torch.jit.trace(graph, (example_input(model, batch),), check_trace=False)
        metadata = export_metadata(model, "torchscript", batch, half, calibrated)
        # torch 2.14 marks torch.jit deprecated in favour of torch.export, whose files need torch >= 2.x to load and
        # are not yet a stable runtime format; TorchScript still loads in libtorch (C++) on an edge box.
        # A file object, not a path string: libtorch opens path strings with the ANSI code page on Windows, which
        # fails for names outside it (pytorch/pytorch#75171).
        with open(path, "wb") as handle:
            torch.jit.save(traced, handle, _extra_files={EXTRA_FILE: metadata_json(metadata)})
    return path


def load_torchscript(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Loads an exported TorchScript file and its metadata. This runs code from the file: trusted files only."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path} does not exist; export one with `flawscope export RUN --format torchscript`.")
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with open(path, "rb") as handle:  # a file object, as in export_torchscript
                module = torch.jit.load(handle, map_location=map_location, _extra_files=extra)
        except RuntimeError as e:
            raise ModelFormatError(f"{path} cannot be read as TorchScript ({str(e)[:200]}).") from e
    if not extra[EXTRA_FILE]:
        raise ModelFormatError(f"{path} has no {EXTRA_FILE} inside: it was not written by `flawscope export`.")
    return module.eval(), read_metadata(extra[EXTRA_FILE], str(path))
