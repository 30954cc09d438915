"""One way to run a model, whatever its form: a run folder (torch), an .onnx file (ONNX Runtime), a TorchScript file.

Every inferencer takes a float batch (B, 3, S, S) in [0, 1] (numpy or torch) and returns one :class:`Prediction`
per image, computed the same way from the graph's four outputs, so the three paths give the same predictions.

>>> inferencer = load_inferencer("runs/mtd/export/model.onnx")
>>> predictions = inferencer.predict(images)  # images (B, 3, S, S) float32 in [0, 1]
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import ConfigError, DataError, ModelFormatError
from ..models.base import AnomalyModel, check_images
from .graph import INPUT_NAME, OUTPUT_NAMES, export_metadata
from .regions import Region, find_regions

ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript")


@dataclass
class Prediction:
    """What a model says about one image.

    Attributes:
        raw_score: the image score in the method's own units.
        norm_score: the calibrated score in [0, 1]; the threshold is 0.5.
        is_defective: ``norm_score > 0.5``.
        anomaly_map: (S, S) float32 raw map.
        norm_map: (S, S) float32 calibrated map in [0, 1].
        regions: connected components of ``norm_map > 0.5`` of at least ``min_area`` pixels, largest first.
        mask: (S, S) bool, the pixels of ``regions``.

    The arrays are this image's own (not views of the batch), so keeping a prediction keeps only its maps.
    ``to_dict()`` gives the JSON-ready part (scores, decision, peak, regions).

    The decision comes from the image score and the regions from the map. Where a method's image score is not the
    map's maximum (PatchCore: its worst patch re-weighted, SimpleNet: the unsmoothed grid's maximum; the maps are
    smoothed), a defective image can have no region: ``peak`` says where its map is highest.
    """

    raw_score: float
    norm_score: float
    is_defective: bool
    anomaly_map: np.ndarray = field(repr=False)
    norm_map: np.ndarray = field(repr=False)
    regions: list[Region]
    mask: np.ndarray = field(repr=False)

    @property
    def decision(self) -> str:
        return "defective" if self.is_defective else "good"

    def to_dict(self) -> dict[str, Any]:
        """Scores, decision, peak and regions as JSON-ready Python values, unrounded (the maps are left out;
        predict's files also give ``num_regions`` and ``defect_area``, which follow from the regions)."""
        x, y, peak_score = self.peak
        return {
            "raw_score": self.raw_score,
            "norm_score": self.norm_score,
            "decision": self.decision,
            "peak_x": x,
            "peak_y": y,
            "peak_score": peak_score,
            "regions": [region.to_dict() for region in self.regions],
        }

    @property
    def peak(self) -> tuple[int, int, float]:
        """(x, y) of the raw map's highest pixel and the calibrated map's value there.

        Taken on the raw map: the calibrated one is clipped to [0, 1], so its maximum ties over every saturated pixel
        (and every pixel of a map below the typical normal score). NaN pixels are passed over.
        """
        raw = np.where(np.isnan(self.anomaly_map), -np.inf, self.anomaly_map)
        y, x = np.unravel_index(int(np.argmax(raw)), raw.shape)
        return int(x), int(y), float(self.norm_map[y, x])


class Inferencer(Protocol):
    """What ``flawscope predict`` and deployments use: metadata plus ``predict``.

    An inferencer keeps no state between calls: one instance may serve several threads at once (torch modules in
    eval mode and ONNX Runtime sessions allow concurrent calls; ``tests/test_serving.py`` checks two threads).
    """

    metadata: dict[str, Any]  # input geometry, threshold, method, versions (docs/deploy.md)

    @property
    def image_size(self) -> int:
        """Side S of the square input (after ``preprocess``)."""
        ...

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop; 0: the whole image resized to S x S."""
        ...

    def predict(self, images: np.ndarray | torch.Tensor, min_area: int = 0) -> list[Prediction]:
        """(B, 3, S, S) float in [0, 1] -> B predictions, regions of at least ``min_area`` pixels."""
        ...

    def run(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """(B, 3, S, S) float in [0, 1] -> the four outputs by name: anomaly_map and norm_map (B, 1, S, S),
        pred_score and norm_score (B,)."""
        ...


class _BaseInferencer:
    """Shared part: input checks, padding to a fixed export batch, and turning outputs into predictions."""

    metadata: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.metadata["input"]["image_size"])

    @property
    def resize_size(self) -> int:
        return int(self.metadata["input"]["resize_size"])

    @property
    def fixed_batch(self) -> int | None:
        batch = self.metadata.get("batch", "dynamic")
        return None if batch == "dynamic" else int(batch)

    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def run(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """images (B, 3, S, S) float in [0, 1] -> the graph's four outputs as float32 numpy arrays, by name."""
        if isinstance(images, torch.Tensor):
            if images.is_floating_point():
                images = images.float()  # numpy has no bfloat16
            images = images.detach().cpu().numpy()
        if not isinstance(images, np.ndarray):
            raise DataError(
                f"An inferencer takes a (B, 3, S, S) numpy array or torch tensor; got {type(images).__name__}. Decode "
                "files with flawscope.data.read_image() and make model input with flawscope.data.preprocess()."
            )
        images = np.ascontiguousarray(images)  # views with negative strides (bgr[:, ::-1]) become plain arrays
        if not images.dtype.isnative:
            images = images.astype(images.dtype.newbyteorder("="))
        check_images(images, self.image_size)
        images = images.astype(np.float32, copy=False)
        batch = self.fixed_batch
        if batch is None or images.shape[0] == batch:
            return dict(zip(OUTPUT_NAMES, self._forward(images), strict=True))
        # A fixed-batch graph: run full chunks, zero-pad the last one and drop what the padding produced.
        chunks = []
        for start in range(0, images.shape[0], batch):
            chunk = images[start : start + batch]
            count = chunk.shape[0]
            if count < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - count, *chunk.shape[1:]), np.float32)])
            chunks.append([output[:count] for output in self._forward(chunk)])
        return {name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(OUTPUT_NAMES)}

    def predict(self, images: np.ndarray | torch.Tensor, min_area: int = 0) -> list[Prediction]:
        """images (B, 3, S, S) float in [0, 1] -> B predictions with regions of at least ``min_area`` pixels."""
        out = self.run(images)
        broken = ~(np.isfinite(out["pred_score"]) & np.isfinite(out["norm_score"]))  # norm: a damaged threshold
        broken |= np.isnan(out["anomaly_map"].reshape(len(broken), -1)).any(1)  # wrong regions, masks and overlays
        if broken.any():  # NaN > 0.5 is False: without this an unscorable image would pass as good
            raise ModelFormatError(
                f"The model gave NaN or infinite scores, or NaN map pixels, for images "
                f"{np.flatnonzero(broken)[:10].tolist()} of the batch (0-based) from valid input: the model file is "
                "damaged, its training diverged, or a float16 export overflowed. Fit or export again."
            )
        predictions = []
        for i in range(out["pred_score"].shape[0]):
            norm_map, raw_map = out["norm_map"][i, 0].copy(), out["anomaly_map"][i, 0].copy()  # not batch views
            regions, mask = find_regions(norm_map, raw_map, min_area=min_area)
            norm_score = float(out["norm_score"][i])
            predictions.append(
                Prediction(float(out["pred_score"][i]), norm_score, norm_score > 0.5, raw_map, norm_map, regions, mask)
            )
        return predictions


class TorchInferencer(_BaseInferencer):
    """Runs a model in torch (the reference the exported files are checked against).

    Uses ``model`` itself, not a copy: it is put in eval mode and moved to ``device``.
    """

    def __init__(self, model: AnomalyModel, device: str | torch.device = "cpu") -> None:
        model.check_fitted()
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.metadata = export_metadata(model, "torch", None, False)

    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(images).to(self.device))
        return tuple(t.float().cpu().numpy() for t in out)


TORCHSCRIPT_TRUST = (
    "is a TorchScript file: loading one runs the code it holds, with this user's full access to files and network "
    "(a stranger's file can read, change or delete anything this user can). Load only files you exported yourself or "
    "trust, with trust_code=True (--trust-code on the command line); an ONNX export (--format onnx) runs no code of "
    "its own."
)


class TorchScriptInferencer(_BaseInferencer):
    """Runs an exported TorchScript file.

    Loading TorchScript runs code from the file (its ``__setstate__`` methods and more), so the file must be
    trusted: ``trust_code=True`` says it is, and without it the file is refused before it is opened.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", *, trust_code: bool = False) -> None:
        from .torchscript import load_torchscript

        if not trust_code and Path(path).is_file():  # a missing file is named as such by load_torchscript
            raise ConfigError(f"{path} {TORCHSCRIPT_TRUST}")
        self.device = torch.device(device)
        self.module, self.metadata = load_torchscript(path, self.device)
        self.path = Path(path)

    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(images).to(self.device))
        return tuple(t.float().cpu().numpy() for t in out)


def onnx_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime providers: CUDA first when asked for (or 'auto') and available, the CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
        raise ConfigError(
            f"Device {device!r} was asked for but this onnxruntime has no CUDA provider (has: {', '.join(available)})."
            " Install onnxruntime-gpu or use --device cpu."
        )
    wants_cuda = device == "auto" or device.startswith("cuda")
    return (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if wants_cuda and "CUDAExecutionProvider" in available
        else ["CPUExecutionProvider"]
    )


class OnnxInferencer(_BaseInferencer):
    """Runs an exported .onnx file with ONNX Runtime (CPU by default, CUDA when present and asked for).

    Args:
        path: the .onnx file.
        device: 'auto' (CUDA when onnxruntime has it), 'cpu' or 'cuda'.
        threads: intra-op threads; None uses ``torch.get_num_threads()`` so both runtimes use the same count.
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise ConfigError("Running .onnx files needs onnxruntime: pip install 'flawscope[export]'.") from e
        from .onnx import read_onnx_metadata

        self.path = Path(path)
        self.metadata = read_onnx_metadata(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = onnx_providers(str(device))
        if providers == ["CPUExecutionProvider"]:  # on a GPU, keep the warnings about nodes that fall back to CPU
            options.log_severity_level = 3  # errors only: float16 graphs log harmless constant-folding warnings
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelFormatError(f"ONNX Runtime cannot load {self.path}: {str(e)[:300]}") from e

    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images}))


def _warn_if_run_changed(path: Path, metadata: dict[str, Any]) -> None:
    """Warns when an export still in its run's ``export/`` folder carries another threshold than the run: the run
    was calibrated or fitted again since (only ``calibrate`` would otherwise say so, naming the file)."""
    from ..model_io import MODEL_JSON

    if path.parent.name != "export":
        return
    run = path.parent.parent
    try:
        calibration = json.loads((run / "model" / MODEL_JSON).read_text(encoding="utf-8"))["calibration"]
        current = (float(calibration["threshold"]), float(calibration["score_low"]))
    except (OSError, ValueError, KeyError, TypeError):  # no run beside it, or one the run's own commands will name
        return
    if current != (metadata.get("threshold"), metadata.get("score_low")):
        warnings.warn(
            f"{path} carries threshold {metadata.get('threshold')!r}, and its run {run} now has {current[0]!r}: the "
            "run was calibrated or fitted again after this export, so its decisions are the old model's. Export "
            f"again: flawscope export {run}.",
            stacklevel=3,
        )


def load_inferencer(
    path: str | Path, device: str = "auto", threads: int | None = None, *, trust_code: bool = False
) -> Inferencer:
    """An inferencer for a run or model folder (torch), an .onnx file or a TorchScript file (.pt, .ts, .torchscript).

    ``trust_code=True`` is needed for a TorchScript file: loading one runs the code it holds (a run folder's weights
    are safetensors and an ONNX graph runs no code of its own, so neither needs it).

    ``threads`` is ONNX Runtime's thread count for this session. Torch models (run folders, TorchScript) use torch's
    process-wide count instead: call ``torch.set_num_threads(N)`` once at start-up; asking for another count here
    warns, as it would otherwise be ignored.
    """
    from ..api import resolve_device
    from ..model_io import load_model, read_model_info, warn_if_uncalibrated

    path = Path(path)

    def torch_threads_differ() -> None:
        if threads and threads != torch.get_num_threads():  # 0 and None: leave the count as it is
            warnings.warn(
                f"threads={threads} sets ONNX Runtime's threads; {path} runs in torch, with torch's process-wide "
                f"{torch.get_num_threads()} threads. Call torch.set_num_threads({threads}) once at start-up.",
                stacklevel=3,
            )

    if path.is_dir():
        torch_threads_differ()
        info = read_model_info(path)
        warn_if_uncalibrated(info, "predictions")
        return TorchInferencer(load_model(info["folder"]), resolve_device(device))
    if path.suffix.lower() in ONNX_SUFFIXES + TORCHSCRIPT_SUFFIXES:
        if path.suffix.lower() in ONNX_SUFFIXES:
            exported = OnnxInferencer(path, device, threads)
        else:
            torch_threads_differ()
            exported = TorchScriptInferencer(path, resolve_device(device), trust_code=trust_code)
        _warn_if_run_changed(path, exported.metadata)
        if exported.metadata.get("calibrated") is False:  # exports before the flag existed say nothing
            warnings.warn(
                f"{path} was exported from a run with no calibrated threshold (fitted with --val-ratio 0), so its "
                "decisions, normalised scores and regions mean nothing; raw scores are fine. Run `flawscope "
                "calibrate RUN --data DIR` on the run, then export it again.",
                stacklevel=2,
            )
        return exported
    if not path.exists():
        raise ModelFormatError(f"{path} does not exist. Pass a run folder, an .onnx file or a TorchScript .pt file.")
    raise ModelFormatError(
        f"Cannot tell what {path} is: expected a run or model folder, an .onnx file or a TorchScript file "
        f"({', '.join(TORCHSCRIPT_SUFFIXES)})."
    )
