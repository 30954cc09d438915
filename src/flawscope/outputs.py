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
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import ConfigError

OUTPUT_MARKER = ".flawscope"
RUN_FILES = ("model", "config.json", "environment.json", "fit_log.json")  # what `fit` writes into its --out
TEST_FILES = ("metrics.json", "per_image.csv", "curves.json", "report.html")  # what `test` writes into its --out
IMAGE_OUTPUTS = ("overlays", "masks")  # folders of images that predict writes
_LEGACY_RUN = (*RUN_FILES, *TEST_FILES, "export")  # owned by a run folder that predates the manifest


def owned_names(folder: Path) -> set[str]:
    """The names in ``folder`` that flawscope wrote: its manifest's, or a run's standard ones for an older run."""
    marker = folder / OUTPUT_MARKER
    if marker.is_file():
        try:
            names = json.loads(marker.read_text()).get("written", [])
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            names = []  # damaged: owns nothing, so nothing is overwritten
        return {str(name) for name in names}
    if (folder / "model" / "model.json").is_file():
        return set(_LEGACY_RUN)
    return set()


def check_out_folder(out: Path, writes: Sequence[str] = ()) -> None:
    """Refuses, before any work, an output path that names an existing file, or a folder holding any of ``writes``
    (the files and folders this command will write there) that flawscope did not write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file; give a folder path (new or existing) instead.")
    if not out.is_dir():
        return
    owned = owned_names(out)
    clashes = [name for name in writes if (out / name).exists() and name not in owned]
    if clashes:
        raise ConfigError(
            f"--out {out} already holds {', '.join(clashes)}, which flawscope did not write there (its {OUTPUT_MARKER} "
            "file does not list them); flawscope never overwrites files it did not write. Choose another --out, or "
            "move those files away (outputs of a flawscope older than 0.1.0's output manifests: delete them)."
        )


def check_outside(out: Path, data_root: Path, writes: Sequence[str] = ()) -> None:
    """``check_out_folder``, and refuses an output folder inside ``data_root`` (a user's data)."""
    check_out_folder(out, writes)
    out, data_root = out.resolve(), data_root.resolve()
    if out == data_root or data_root in out.parents:
        raise ConfigError(
            f"The output folder {out} is inside the data folder {data_root}; flawscope never writes "
            "into a data folder. Choose --out elsewhere."
        )


def claim_out_folder(out: Path, writes: Iterable[str]) -> None:
    """Creates ``out`` (and its parents) and adds ``writes`` to the names its manifest lists as flawscope's."""
    out.mkdir(parents=True, exist_ok=True)
    owned = owned_names(out)
    if not (out / OUTPUT_MARKER).is_file():  # an older run keeps what it owned
        owned = {name for name in owned if (out / name).exists()}
    names = sorted(owned | set(writes))
    manifest = {"written_by": "flawscope", "written": names}
    (out / OUTPUT_MARKER).write_text(json.dumps(manifest, indent=1) + "\n")


def is_output_image(path: Path, top: Path | None = None) -> bool:
    """True when ``path`` lies in an ``overlays/`` or ``masks/`` folder that a manifest lists as flawscope's.

    Only the folders below ``top`` count (all of ``path``'s folders when None): a folder the user names is read.
    """
    for folder in path.parents:
        if folder == top:
            break
        if folder.name in IMAGE_OUTPUTS and folder.name in owned_names(folder.parent):
            return True
    return False


def drop_output_images(paths: list[Path], searched: Path, top: Path | None = None) -> list[Path]:
    """``paths`` (found under ``searched``) without the images flawscope wrote (``is_output_image``), with one
    warning naming the folders left out."""
    dropped = [path for path in paths if is_output_image(path, top)]
    if dropped:
        folders = sorted({str(path.parent) for path in dropped})
        warnings.warn(
            f"{len(dropped)} image(s) under {searched} are flawscope's own outputs (in {', '.join(folders[:5])}"
            f"{', ...' if len(folders) > 5 else ''}) and were not read as inputs; name such a file directly to score "
            "it.",
            stacklevel=3,
        )
    return [path for path in paths if not is_output_image(path, top)]
