"""Run folders: what `flawscope fit` writes besides the model, and the environment it ran in."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from . import __version__


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(seed: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Versions, hardware and settings that affect results, for environment.json and benchmark tables."""
    import numpy
    import timm

    info: dict[str, Any] = {
        "flawscope": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # The GPU a run used (cuda:N), else the first one there is.
        "cuda": torch.cuda.get_device_name(device if str(device).startswith("cuda") else 0)
        if torch.cuda.is_available()
        else None,
        "device": device,
        "seed": seed,
        "git_revision": _git_revision(),
        "command": " ".join(sys.argv),
    }
    return info


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unlink_if_link(path: str | Path) -> None:
    """Removes ``path`` when it is a symbolic link (the link only), so that the write that follows makes a new file
    there instead of writing through the link into a file elsewhere."""
    if Path(path).is_symlink():
        Path(path).unlink()


def write_json(path: Path, data: Any) -> None:
    """Writes pretty JSON with a trailing newline (a link at ``path`` is replaced, never written through)."""
    _unlink_if_link(path)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """``safetensors``' ``save_file``, leaving the file readable as any file the user creates (umask) would be.

    safetensors 0.8 writes its files with mode 0600, so a model folder or teacher copied for a service account or a
    colleague could not be read by them. A link at ``path`` is replaced, never written through.
    """
    _unlink_if_link(path)
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:  # an OS error inside the Rust writer (a full disk): say so as Python's would
        found = re.search(r"code: (\d+)|os error (\d+)", str(e))  # the Rust error's Debug and Display forms
        if not found:
            raise
        code = int(found[1] or found[2])
        raise OSError(code, os.strerror(code), str(path)) from e
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
