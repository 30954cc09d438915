"""Deployment: ONNX / TorchScript export with metadata, inferencers that give identical predictions, regions."""

from .graph import INPUT_NAME, OUTPUT_NAMES, ExportGraph, export_metadata
from .inferencer import (
    Inferencer,
    OnnxInferencer,
    Prediction,
    TorchInferencer,
    TorchScriptInferencer,
    load_inferencer,
)
from .parity import FORMATS, check_parity, export_checked, export_model, open_exported, parity_report
from .regions import Region, find_regions

__all__ = [
    "FORMATS",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "ExportGraph",
    "Inferencer",
    "OnnxInferencer",
    "Prediction",
    "Region",
    "TorchInferencer",
    "TorchScriptInferencer",
    "check_parity",
    "export_checked",
    "export_metadata",
    "export_model",
    "find_regions",
    "load_inferencer",
    "open_exported",
    "parity_report",
]
