"""ONNX export with ``torch.onnx.export(dynamo=True)`` and the metadata in the file's ``metadata_props``.

Why the dynamo exporter: the TorchScript-based one (``dynamo=False``, deprecated) cannot export
``adaptive_avg_pool1d`` to a length that does not divide the input (PatchCore's and SimpleNet's local-feature
aggregation; it also failed on the Gaussian smoothing's channel-expanded kernel, used now only above 1024 px). The
dynamo exporter exports every registered model with a dynamic batch dimension and is torch 2.14's default.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, ModelFormatError
from ..models.base import AnomalyModel
from .graph import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    ExportGraph,
    example_input,
    export_metadata,
    metadata_json,
    read_metadata,
)

OPSET = 18


def export_onnx(
    model: AnomalyModel, path: str | Path, *, batch: int | None = None, half: bool = False, calibrated: bool = True
) -> Path:
    """Writes ``model``'s inference graph to ``path`` as ONNX.

    Args:
        model: a fitted model (not changed).
        path: the .onnx file to write (its folder is created).
        batch: None for a dynamic batch dimension, else the fixed batch size.
        half: float16 weights (inputs and outputs stay float32).
        calibrated: whether the model's threshold was calibrated (recorded in the metadata; loading warns if not).

    Returns:
        ``path``.
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's backend)
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ConfigError("ONNX export needs onnx and onnxscript: pip install 'flawscope[export]'.") from e
    model.check_fitted()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = ExportGraph(model, half=half).eval()
    images = example_input(model, batch)
    dynamic_shapes = None if batch else ({0: torch.export.Dim("batch", min=1, max=4096)},)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (images,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    metadata = export_metadata(model, "onnx", batch, half, calibrated)
    props = {
        METADATA_KEY: metadata_json(metadata),
        # Flat copies of the keys a deployer reads first, for tools that show metadata_props as a table.
        "method": metadata["method"],
        "library_version": metadata["library_version"],
        "image_size": str(metadata["input"]["image_size"]),
        "resize_size": str(metadata["input"]["resize_size"]),
        "channel_order": "RGB",
        "threshold": repr(metadata["threshold"]),
    }
    program.model.metadata_props.update(props)
    program.model.producer_name, program.model.producer_version = "flawscope", metadata["library_version"]
    # Weights stay inside the file unless it would pass protobuf's 2 GB limit; then they go to a side file.
    program.save(str(path))
    return path


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The flawscope metadata of an exported .onnx file (read without loading the weights, never unpickled)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path} does not exist; export one with `flawscope export RUN --format onnx`.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others, by protobuf version
        raise ModelFormatError(f"{path} cannot be read as ONNX ({str(e)[:200]}).") from e
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ModelFormatError(
            f"{path} has no '{METADATA_KEY}' metadata: it was not written by `flawscope export`. Export the run "
            "again, or run the file with onnxruntime directly."
        )
    metadata = read_metadata(props[METADATA_KEY], str(path))
    inputs = proto.graph.input
    dims = (
        [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
        if inputs
        else []
    )
    size = metadata["input"]["image_size"]
    if len(dims) != 4 or any(d is not None and d != size for d in dims[2:]):
        raise ModelFormatError(
            f"{path}: its graph takes inputs of shape {dims}, but its flawscope metadata says {size} x {size} images: "
            "the metadata was edited or the file damaged. Export the run again."
        )
    return metadata
