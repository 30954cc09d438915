"""Output folders: flawscope overwrites only what it wrote itself, and never reads its own images back as inputs.

Every command that writes into an ``--out`` folder (fit, test, predict, bench) records the names it wrote there in
a hidden ``.flawscope`` file (a JSON manifest). Before writing, a command refuses a folder that already holds one of
the names it would write unless the manifest lists that name: the user's own ``report.html`` or ``predictions.csv``
is never replaced. A run folder written before manifests existed (it holds ``model/model.json`` and no manifest)
owns the names a run and its test write. Folder searches for images skip the ``overlays/`` and ``masks/`` folders a
manifest lists, so a predict's pictures are not scored by the next predict over the same tree.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import ConfigError

OUTPUT_MARKER = ".flawscope"
RUN_FILES = ("model", "config.json", "environment.json", "fit_log.json")  # what `fit` writes into its --out
TEST_FILES = ("metrics.json", "per_image.csv", "curves.json", "report.html")  # what `test` writes into its --out
IMAGE_OUTPUTS = ("overlays", "masks")  # folders of images that predict writes
_LEGACY_RUN = (*RUN_FILES, *TEST_FILES, "export")  # owned by a run folder that predates the manifest


MAX_STEM_BYTES = 200  # of an output name's stem: a number, "_", "_mask" and ".png" keep it under 255 bytes


def portable_stem(path: Path) -> str:
    """``path``'s stem as part of an output file name that every common file system can hold: the characters
    Windows refuses (``<>:"/\\|?*`` and control characters) become "_", trailing dots and spaces go, and the name is
    cut to MAX_STEM_BYTES. A name that is not UTF-8 (bytes kept by surrogateescape) loses those bytes only."""
    stem = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", path.stem)
    stem = stem.encode(errors="surrogateescape")[:MAX_STEM_BYTES].decode(errors="ignore")
    return stem.rstrip(" .")


def _read_manifest(folder: Path) -> set[str] | None:
    """The names ``folder``'s manifest lists; None when it has none or it cannot be read as one."""
    try:
        manifest = json.loads((folder / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("written_by") != "flawscope":
        return None
    written = manifest.get("written")
    if not isinstance(written, list) or not all(isinstance(name, str) for name in written):
        return None
    return set(written)


def _is_older_run(folder: Path) -> bool:
    """A run folder written before manifests existed: its model/model.json is flawscope's (format and method)."""
    try:
        info = json.loads((folder / "model" / "model.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(info, dict) and "format" in info and "method" in info


def owned_names(folder: Path) -> set[str]:
    """The names in ``folder`` that flawscope wrote: its manifest's, or a run's standard ones for an older run."""
    names = _read_manifest(folder)
    if names is not None:
        return names
    return set(_LEGACY_RUN) if _is_older_run(folder) else set()


def check_out_folder(out: Path, writes: Sequence[str] = ()) -> None:
    """Refuses, before any work, an output path that names an existing file, or a folder holding any of ``writes``
    (the files and folders this command will write there) that flawscope did not write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file; give a folder path (new or existing) instead.")
    if not out.is_dir():
        return
    marker = out / OUTPUT_MARKER
    links = [name for name in (OUTPUT_MARKER, *writes) if (out / name).is_symlink()]
    if links:  # writing through a link (even a dangling one) would write, or delete, outside --out
        raise ConfigError(
            f"--out {out} holds {', '.join(links)} as a symbolic link; flawscope does not write through links, which "
            "could change files outside the output folder. Choose another --out, or remove the link."
        )
    if marker.exists() and _read_manifest(out) is None:  # the user's own file of that name, or a damaged list
        raise ConfigError(
            f"{marker} is not flawscope's list of what it wrote there (a folder, another program's file, or damaged), "
            "and flawscope would have to replace it. Choose another --out, or move that file away."
        )
    owned = owned_names(out)
    clashes = [name for name in writes if os.path.lexists(out / name) and name not in owned]
    if clashes:
        why = f"its {OUTPUT_MARKER} file does not list them" if marker.exists() else f"it has no {OUTPUT_MARKER} file"
        raise ConfigError(
            f"--out {out} already holds {', '.join(clashes)}, which flawscope did not write there ({why}); flawscope "
            "never overwrites files it did not write. Choose another --out, or move those files away."
        )


def check_outside(out: Path, data_root: Path, writes: Sequence[str] = ()) -> None:
    """``check_out_folder``, and refuses an output folder inside ``data_root`` (a user's data)."""
    check_out_folder(out, writes)
    refuse_inside(out, data_root)


def refuse_inside(out: str | Path, data_root: str | Path, what: str = "The output folder") -> None:
    """Refuses an output (folder or file, named ``what`` in the message) that is, or lies inside, ``data_root``."""
    out, data_root = Path(out).resolve(), Path(data_root).resolve()
    if out == data_root or data_root in out.parents:
        raise ConfigError(
            f"{what} {out} is inside the data folder {data_root}; flawscope never writes into a data folder. Choose "
            "--out elsewhere."
        )


def claim_out_folder(out: Path, writes: Iterable[str] = ()) -> None:
    """Creates ``out`` (and its parents) and lists ``writes`` in its manifest as flawscope's, with the names it
    listed before that still exist (a name whose file is gone is flawscope's no longer)."""
    out.mkdir(parents=True, exist_ok=True)
    check_out_folder(out)  # refuses a marker that is not flawscope's, which the write below would replace
    marker = out / OUTPUT_MARKER
    owned = {name for name in owned_names(out) if (out / name).exists()}
    manifest = {"written_by": "flawscope", "written": sorted(owned | set(writes))}
    marker.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def is_output_image(path: Path, top: Path | None = None, owned: dict[Path, set[str]] | None = None) -> bool:
    """True when ``path`` lies in an ``overlays/`` or ``masks/`` folder that a manifest lists as flawscope's.

    Only the folders below ``top`` count (all of ``path``'s folders when None): a folder the user names is read.
    ``owned`` caches each folder's ``owned_names`` across calls.
    """
    owned = {} if owned is None else owned
    for folder in path.parents:
        if folder == top:
            break
        if folder.name in IMAGE_OUTPUTS:
            if folder.parent not in owned:
                owned[folder.parent] = owned_names(folder.parent)
            if folder.name in owned[folder.parent]:
                return True
    return False


def drop_output_images(paths: list[Path], searched: Path, top: Path | None = None) -> list[Path]:
    """``paths`` (found under ``searched``) without the images flawscope wrote (``is_output_image``), with one
    warning naming the folders left out."""
    owned: dict[Path, set[str]] = {}
    dropped = {path for path in paths if is_output_image(path, top, owned)}
    if dropped:
        folders = sorted({str(path.parent) for path in dropped})
        warnings.warn(
            f"{len(dropped)} image(s) under {searched} are flawscope's own outputs (in {', '.join(folders[:5])}"
            f"{', ...' if len(folders) > 5 else ''}) and were not read as inputs; name their folder or file to "
            "score them.",
            stacklevel=3,
        )
    return [path for path in paths if path not in dropped]
