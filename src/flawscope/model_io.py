"""Model folders: ``model.json`` (method, every hyperparameter, calibration, versions) + ``weights.safetensors``.

A folder is self-contained: the backbone's weights are inside ``weights.safetensors``, so loading needs no
network and no other file. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from . import __version__
from .errors import ConfigError, ModelFormatError
from .layers import PositionWhitening
from .models.base import AnomalyModel
from .registry import get_method
from .runs import file_sha256, save_safetensors, write_json

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.safetensors"


def save_model(model: AnomalyModel, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Writes ``model`` to ``folder`` (created if needed) and returns the folder.

    Args:
        model: a fitted inference module.
        folder: destination; existing ``model.json``/``weights.safetensors`` there are replaced.
        metadata: extra JSON-serialisable facts (calibration details, training report) stored in model.json; a
            ``model_id`` there (the fit's, when re-saving a calibrated model) replaces the new weights' digest.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    state, stored = {}, set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        # safetensors refuses two names on one storage (PRN's mf_share_weights=true: one fusion module under two
        # names); each name gets its own copy, and loading fills the shared module twice with the same values.
        storage = tensor.untyped_storage().data_ptr()
        state[name] = tensor.clone() if storage in stored and tensor.numel() else tensor
        stored.add(storage)
    # One metadata key: safetensors writes its metadata map in random order, and a second key would make the
    # file's bytes (and weights_sha256) differ between two identical fits.
    header = json.dumps({"format": FORMAT_VERSION, "method": model.method}, sort_keys=True)
    save_safetensors(state, weights, {"flawscope": header})
    digest = file_sha256(weights)
    info = {
        "format": FORMAT_VERSION,
        "method": model.method,
        "library_version": __version__,
        "config": model.config.to_dict(),
        "input": {
            "shape": ["B", 3, model.config.image_size, model.config.image_size],
            "channel_order": "RGB",
            "range": [0.0, 1.0],
            "resize_size": model.config.resize_size,
        },
        "calibration": {"threshold": float(model.threshold), "score_low": float(model.score_low)},
        "weights_sha256": digest,
        # Which fit this is, kept by `calibrate` (which rewrites the threshold in the weights): the first digest.
        "model_id": digest,
        **(metadata or {}),
    }
    write_json(folder / MODEL_JSON, info)
    return folder


def read_model_info(folder: str | Path) -> dict[str, Any]:
    """Reads and checks ``model.json``; raises ModelFormatError with the fix when it cannot be used."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a run folder" if folder.exists() else "does not exist"
        raise ModelFormatError(f"{folder} {what}. Pass a run folder from `flawscope fit --out` or its model/.")
    path = folder / MODEL_JSON
    if not path.is_file():
        nested = folder / "model" / MODEL_JSON
        if nested.is_file():
            return read_model_info(folder / "model")
        raise ModelFormatError(f"No {MODEL_JSON} in {folder}. Pass a run folder from `flawscope fit` or its model/.")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5,000-digit number, nesting thousands deep
        raise ModelFormatError(f"{path} is not valid JSON ({e}). The model folder is damaged; fit again.") from e
    if not isinstance(info, dict):
        raise ModelFormatError(
            f"{path} holds {json.dumps(info)[:40]} where a JSON object is expected. The model folder is damaged; "
            "re-run `flawscope fit` or re-copy the folder."
        )
    version = info.get("format")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ModelFormatError(
            f"{path} has model format {version!r}; this flawscope ({__version__}) reads format {FORMAT_VERSION}. "
            "Upgrade flawscope (pip install -U flawscope) to load models written by a newer version."
        )
    for key, kind, name in (("method", str, "string"), ("config", dict, "object")):
        if not isinstance(info.get(key), kind):
            problem = f"lacks the {key!r} key" if key not in info else f"has a {key!r} that is not a JSON {name}"
            raise ModelFormatError(
                f"{path} {problem}. The model folder is damaged; re-run `flawscope fit` or re-copy the folder."
            )
    for key in ("calibration_details", "training"):
        if not isinstance(info.get(key, {}), dict | None):
            raise ModelFormatError(
                f"{path} has a {key!r} that is not a JSON object. The model folder is damaged; re-run `flawscope fit` "
                "or re-copy the folder."
            )
    calibration = info.get("calibration", {"threshold": 0.0, "score_low": 0.0})
    if not isinstance(calibration, dict) or not all(_is_finite_number(calibration.get(k)) for k in CALIBRATION_KEYS):
        raise ModelFormatError(
            f"{path} has a 'calibration' that is not a JSON object with finite numbers for "
            f"{' and '.join(CALIBRATION_KEYS)} (got {json.dumps(calibration)[:80]}). The model folder is damaged; "
            "re-run `flawscope fit` or re-copy the folder."
        )
    info["folder"] = str(folder)
    return info


CALIBRATION_KEYS = ("threshold", "score_low")  # model.json's "calibration", the weights' buffers of the same names


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def describe_threshold(info: dict[str, Any]) -> tuple[bool, str]:
    """Whether a model's threshold was calibrated, and the threshold and how it was set as one line.

    Args:
        info: ``read_model_info``'s dictionary.
    """
    details = info.get("calibration_details") or {}
    if "threshold" not in details:
        why = str(details.get("rule", "no details")).removeprefix("none (").removesuffix(")")  # "none (no held-out...)"
        return False, f"threshold: not calibrated ({why})"
    counts = f"{details['num_normal']} good" + (
        f" and {details['num_defective']} defective" if "num_defective" in details else ""
    )
    f1 = f", F1 {details['f1']:.3f}" if "f1" in details else ""
    # The stored threshold, which set_calibration may have lifted just above the typical normal score.
    threshold = (info.get("calibration") or details)["threshold"]
    return True, f"threshold {threshold:.6g} ({details['rule']}; {counts} images{f1})"


def warn_if_uncalibrated(info: dict[str, Any], action: str) -> None:
    """Warns that ``action`` (e.g. "predictions") will not mean much when the model's threshold was never set: it
    was fitted with no held-out good images, and `flawscope calibrate` has not run on it since."""
    if not describe_threshold(info)[0]:  # one definition of "calibrated" for every command
        warnings.warn(
            f"The model in {info['folder']} has no calibrated threshold (it was fitted with --val-ratio 0), so the "
            f"{action} have meaningless decisions, normalised scores and regions; raw scores are fine. Run "
            "`flawscope calibrate RUN --data DIR` on a labelled validation folder first.",
            stacklevel=3,
        )


def load_model(folder: str | Path, map_location: str | torch.device = "cpu") -> AnomalyModel:
    """Rebuilds a model from its folder. The backbone is built without downloading and filled from the file.

    The model is ready for inference: eval mode, and no parameter requires a gradient, so calling it keeps no
    autograd graph. (flawscope does not train a loaded model further; ``fit`` builds a new one.) Loading leaves the
    caller's torch random stream as it was.

    Args:
        folder: a run folder or its ``model`` folder.
        map_location: device the weights are loaded to ('cpu', 'cuda', 'cuda:1', ...).

    Returns:
        The model. ``model(images)`` takes (B, 3, S, S) float in [0, 1] with S = ``model.config.image_size``, made
        with ``flawscope.data.preprocess(read_image(path), S, model.config.resize_size)``, and returns an
        :class:`~flawscope.models.base.AnomalyOutput`. ``forward`` does not check its input (it never branches on
        tensor values); call ``model.check_input(images)`` first, or serve through ``load_inferencer``, which does.
    """
    info = read_model_info(folder)
    folder = Path(info["folder"])
    try:
        method = get_method(info["method"])
        config = method.config_class.from_dict(info["config"])
    except ConfigError as e:
        raise ConfigError(
            f"{folder / MODEL_JSON}: {e} The model folder is damaged or was written by another flawscope; re-run "
            "`flawscope fit` or re-copy the folder."
        ) from e
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFormatError(f"{weights} is missing; a model folder needs both {MODEL_JSON} and {WEIGHTS_FILE}.")
    if info.get("weights_sha256") and file_sha256(weights) != info["weights_sha256"]:
        raise ModelFormatError(
            f"{weights} does not match the hash in {MODEL_JSON}: the file was changed or damaged. "
            "Restore the model folder from a copy or fit again."
        )
    try:
        state = load_file(str(weights), device=str(map_location))
        with safe_open(str(weights), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("flawscope", "{}"))
    except (SafetensorError, ValueError, RecursionError) as e:
        raise ModelFormatError(f"{weights} cannot be read as safetensors ({str(e)[:200]}).") from e
    if not isinstance(header, dict):
        raise ModelFormatError(f"{weights} has metadata that is not a JSON object: it was not written by flawscope.")
    if header.get("method", info["method"]) != info["method"]:
        raise ModelFormatError(
            f"{weights} holds a {header['method']} model but {MODEL_JSON} says {info['method']}: the files come "
            "from two different runs. Restore the model folder from a copy or fit again."
        )
    with torch.random.fork_rng(devices=[]):  # the random initialisation is overwritten; the caller's stream is kept
        model = method.model_class(config, pretrained=False)
    load_state(model, state, weights)
    unfitted = [name for name, m in model.named_modules() if isinstance(m, PositionWhitening) and not m.fitted]
    if getattr(config, "feature_norm", None) == "position" and unfitted:
        raise ModelFormatError(
            f"{weights} has no whitening statistics ({unfitted[0]}) although {MODEL_JSON} says feature_norm=position. "
            "The file is damaged; restore the model folder from a copy or fit again."
        )
    threshold, score_low = float(model.threshold), float(model.score_low)
    if not (math.isfinite(threshold) and math.isfinite(score_low) and threshold > score_low):
        # A NaN threshold would call every image good (NaN comparisons are False).
        raise ModelFormatError(
            f"{weights} holds the threshold {threshold} and typical score {score_low}; both must be finite numbers, "
            "the threshold the larger. The file is damaged; restore the model folder from a copy or fit again."
        )
    return model.to(map_location).requires_grad_(False).eval()  # parameters too, not only the resized buffers


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path = "The weights") -> None:
    """``load_state_dict`` that first resizes buffers whose size is learned (memory banks, statistics); ``source``
    names the file in messages."""
    buffers = dict(model.named_buffers())
    for name, tensor in state.items():
        if name in buffers and buffers[name].shape != tensor.shape:
            if buffers[name].dim() != tensor.dim():  # a learned size changes lengths, never the number of dims
                raise ModelFormatError(
                    f"{source} does not fit {type(model).__name__}: {name} has shape {tuple(tensor.shape)}, expected "
                    f"{buffers[name].dim()} dimensions. The file was written for another configuration or is damaged."
                )
            owner_name, _, buffer_name = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner.register_buffer(buffer_name, torch.empty_like(tensor))
    # Per-position whitening was added to methods after their first folders were written; it is empty until fitted,
    # which is what such a file means, so a folder without any of its entries loads with it unfitted (load_model
    # checks that the options agree). Any other missing entry, or half a layer, is damage.
    layers = [name for name, module in model.named_modules() if isinstance(module, PositionWhitening)]
    unfitted = [
        f"{prefix}{key}"
        for prefix in (f"{name}." if name else "" for name in layers)
        if f"{prefix}mean" not in state and f"{prefix}matrix" not in state
        for key in ("mean", "matrix")
    ]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [name for name in missing if name not in unfitted]
    except RuntimeError as e:  # a tensor of another shape
        raise ModelFormatError(
            f"{source} does not fit {type(model).__name__}: {str(e)[:300]}. The file was written for another "
            "configuration or is damaged."
        ) from e
    if missing or unexpected:
        raise ModelFormatError(
            f"{source} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}. "
            "The file was written for another configuration."
        )
