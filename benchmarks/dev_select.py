"""Compares fit settings on a development set made only from a data set's *training* images; no test image is read.

The development folder (MVTec layout) is built once:

    train/good/          links to the 90 % of train/good that `flawscope fit` would train on (seed 0)
    test/good/           the other 10 %, written at a fixed reference geometry (``--reference-size``)
    test/texture/        the same images, each with one Perlin-mask defect (texture from ``--textures``, or a
                         grid-shuffled other good image; made grey when the images are), exact masks
    test/drawn/          the same images, each with one drawn scratch, blob or stain at ``--strength``
                         contrast (grey likewise)
    test/band/           with ``--bands``: the same images, each with a band of another good image across its top
                         or bottom (a region ground differently, like MTD's "uneven" defects)

The defects are drawn once at the reference size, so every candidate sees the same defects at the same physical
size whatever input size it resizes them to: a fair comparison of input sizes too. Each candidate is then a
plain `flawscope fit` on the development folder and `flawscope test` on it; the table goes into
docs/benchmarks.md.

    python benchmarks/dev_select.py --title "SimpleNet input size" \
        --candidate "224=--model simplenet --image-size 224" --candidate "320=--model simplenet --image-size 320"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from _common import REPO, command, cpu_model, run, write_section
from flawscope.data import load_dataset, preprocess, read_image, split_validation
from flawscope.data.demo import DEFECT_TYPES, draw_defect
from flawscope.synthesis.perlin import texture_source
from flawscope.synthesis.validation_set import synthetic_defect

SECTION = "## Development-set selection: {title}"


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)
    Image.fromarray(array).save(path)


def _grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W, 3) with every channel the mean of the three."""
    return np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)


def band_defect(image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A band of another good image across the top or bottom of ``image``, like a region ground differently.

    The band spans the full width, covers 15-45 % of the height, and ends in a slightly tilted, wavy border. Its
    pixels are ``other``'s at the same place, shifted to ``image``'s mean brightness there plus 2-8 % brighter or
    darker, so the band differs in striation and a little in level, and has no edge but its border.

    Args:
        image, other: (S, S, 3) float32 good images in [0, 1].

    Returns:
        (S, S, 3) float32 defective image and its (S, S) bool mask.
    """
    size = image.shape[0]
    columns = np.arange(size) / size
    wave = np.interp(columns, np.linspace(0, 1, 6), rng.normal(0, 0.015, 6))
    border = rng.uniform(0.15, 0.45) + rng.uniform(-0.06, 0.06) * (columns - 0.5) + wave  # (S,) fraction of S
    rows = np.arange(size)[:, None] / size
    mask = rows < border[None] if rng.random() < 0.5 else rows > 1 - border[None]
    band = other[mask] - other[mask].mean() + image[mask].mean() + rng.choice([-1, 1]) * rng.uniform(0.02, 0.08)
    defective = image.copy()
    defective[mask] = np.clip(band, 0, 1)
    return defective, mask


def build_development_set(
    data: Path,
    out: Path,
    reference_size: int,
    strength: float,
    textures: Path | None,
    seed: int = 0,
    bands: bool = False,
) -> dict:
    """Writes the development folder described in the module docstring; returns its summary (also saved)."""
    summary_path = out / "development.json"
    settings = {"data": str(data.resolve()), "reference_size": reference_size, "strength": strength}
    settings |= {"textures": str(textures) if textures else None, "seed": seed}
    if bands:  # only when asked, so development sets written before this kind existed stay valid
        settings["bands"] = True
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary["settings"] != settings:
            raise SystemExit(f"{out} holds a development set with other settings; choose another --dev folder.")
        return summary
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not a development set; choose another --dev folder.")
    train, val = split_validation(load_dataset(data).train, 0.1, seed=seed)
    for sample in train:
        link = out / "train" / "good" / Path(sample.path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(sample.path).resolve())
    rng = np.random.default_rng(seed)
    band_rng = np.random.default_rng([seed, 1])  # its own stream: the other kinds stay as they were without bands
    source = texture_source(textures)
    images = [preprocess(read_image(s.path), reference_size, 0).permute(1, 2, 0).numpy() for s in val]
    grayscale = all(np.ptp(image, axis=2).max() < 1e-6 for image in images)
    for n, (sample, image) in enumerate(zip(val, images, strict=True)):
        stem = Path(sample.path).stem
        _save(image, out / "test" / "good" / f"{stem}.png")
        other = images[(n + 1 + int(rng.integers(len(images) - 1))) % len(images)]
        defective, mask = synthetic_defect(image, other, rng, source)
        if grayscale:  # a grey camera sees grey defects: colour would make them trivially easy to find
            defective = _grey(defective)
        _save(defective, out / "test" / "texture" / f"{stem}.png")
        _save(mask, out / "ground_truth" / "texture" / f"{stem}_mask.png")
        clean = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
        painted, mask = draw_defect(clean, DEFECT_TYPES[rng.integers(len(DEFECT_TYPES))], rng)
        painted = clean + strength * (painted.astype(np.float32) - clean)
        painted = (_grey(painted) if grayscale else painted).round().astype(np.uint8)
        _save(painted, out / "test" / "drawn" / f"{stem}.png")
        _save(mask, out / "ground_truth" / "drawn" / f"{stem}_mask.png")
        if bands:
            other = images[(n + 1 + int(band_rng.integers(len(images) - 1))) % len(images)]
            defective, mask = band_defect(image, other, band_rng)
            _save(_grey(defective) if grayscale else defective, out / "test" / "band" / f"{stem}.png")
            _save(mask, out / "ground_truth" / "band" / f"{stem}_mask.png")
    summary = {"settings": settings, "num_train": len(train), "num_val": len(val)}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def without_kinds(dev: Path, kinds: list[str]) -> Path:
    """A sibling of the development folder whose test set lacks ``kinds``: links to the rest, made once.

    For a candidate trained on defects made by the same generator as one of the kinds (e.g. Perlin blends and
    ``texture``), which would otherwise be scored on its own training distribution.
    """
    view = dev.with_name(f"{dev.name}-without-{'-'.join(sorted(kinds))}")

    def entries(root: Path) -> set[Path]:
        found = {Path(part, f.name) for part in ("test", "ground_truth") if (root / part).is_dir()
                 for f in (root / part).iterdir()}  # fmt: skip
        return found | ({Path("train")} if (root / "train").exists() else set())

    wanted = {entry for entry in entries(dev) if entry.name not in kinds}
    if view.exists():
        present = entries(view)
        if present == wanted:
            return view
        if not all((view / entry).is_symlink() for entry in present):
            raise SystemExit(f"{view} holds more than the links dev_select makes; move it away and run again.")
        shutil.rmtree(view)  # links only (checked above), from an older development set
    building = view.with_name(view.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    for entry in sorted(wanted):
        (building / entry).parent.mkdir(parents=True, exist_ok=True)
        (building / entry).symlink_to((dev / entry).resolve())
    building.rename(view)
    return view


def evaluate(name: str, fit_args: list[str], dev: Path, runs: Path) -> dict:
    """`flawscope fit` + `flawscope test` of one candidate on the development folder (or a view of it)."""
    out = runs / f"dev-{name}"
    fit_seconds, _ = run(["flawscope", "fit", *fit_args, "--data", str(dev), "--out", str(out), "--quiet"])
    run(["flawscope", "test", str(out), "--data", str(dev), "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text())
    per_type = metrics.get("per_type", {})
    return {"name": name, "fit": " ".join(fit_args), "metrics": metrics, "per_type": per_type, "fit_s": fit_seconds}


def _kind(per_type: dict, kind: str, metric: str = "image_auroc") -> str:
    """A kind's metric in per cent, or n/a when it was not tested."""
    return f"{100 * per_type[kind][metric]:.1f}" if kind in per_type else "n/a"


def render(title: str, rows: list[dict], summary: dict, left_out: Sequence[str] = ()) -> str:
    s = summary["settings"]
    textures = Path(s["textures"]).name if s["textures"] else "procedural"
    bands = s.get("bands", False)
    lines = [
        SECTION.format(title=title),
        "",
        f"Command: `{command()}`",
        "",
        f"Development set (benchmarks/dev_select.py; no test image is read): {summary['num_train']} training images "
        f"of `{Path(s['data']).name}` train/good; {summary['num_val']} held-out good images at {s['reference_size']} "
        f"px, each also with one Perlin-mask defect (textures: {textures} or"
        f" a shuffled good image) and one drawn scratch, blob or stain at strength {s['strength']:g}"
        + ("; and one band of another good image across the top or bottom (`band`). " if bands else ". ")
        + (f"Test kinds left out: {', '.join(left_out)} (every number below is without them). " if left_out else "")
        + f"Hardware: {cpu_model()}, {os.cpu_count()} cores. Fit time is the whole `flawscope fit` step.",
        "",
        "| candidate | image AUROC | pixel AUROC | AUPRO | texture / drawn image AUROC"
        + (" | band image / pixel AUROC" if bands else "")
        + " | fit (s) |",
        "|---|---:|---:|---:|---:|" + ("---:|" if bands else "") + "---:|",
    ]
    for r in rows:
        m, t = r["metrics"], r["per_type"]
        lines.append(
            f"| {r['name']} | {100 * m['image_auroc']:.1f} | {100 * m['pixel_auroc']:.1f} "
            f"| {100 * m['pixel_aupro']:.1f} | {_kind(t, 'texture')} / {_kind(t, 'drawn')} | "
            + (f"{_kind(t, 'band')} / {_kind(t, 'band', 'pixel_auroc')} | " if bands else "")
            + f"{r['fit_s']:.0f} |"
        )
    lines += ["", "Fit arguments:", ""]
    lines += [f"- {r['name']}: `flawscope fit {r['fit']}`" for r in rows]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "../shared/datasets/mtd")
    parser.add_argument("--dev", type=Path, default=Path("/tmp/flawscope-dev/mtd"), help="development folder")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/flawscope-dev/runs"))
    parser.add_argument("--reference-size", type=int, default=320)
    parser.add_argument("--strength", type=float, default=0.5, help="contrast of the drawn defects, 1 = as drawn")
    parser.add_argument("--textures", type=Path, default=REPO / "../shared/datasets/bsds500")
    parser.add_argument("--bands", action="store_true", help="also a test/band kind (a differently ground band)")
    parser.add_argument("--candidate", action="append", required=True, help="NAME=fit arguments")
    parser.add_argument(
        "--leave-out",
        action="append",
        default=[],
        choices=("texture", "drawn", "band"),
        help="test without this kind (repeatable), e.g. when a candidate trains on its generator",
    )
    parser.add_argument("--title", required=True, help="section title in docs/benchmarks.md")
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    args = parser.parse_args()

    textures = args.textures.resolve() if args.textures and args.textures.exists() else None
    summary = build_development_set(args.data, args.dev, args.reference_size, args.strength, textures, bands=args.bands)
    # Fitted on the view too: its train/ is the same, and seen defects (PRN) come from the kinds tested.
    dev = without_kinds(args.dev, args.leave_out) if args.leave_out else args.dev
    rows = []
    for item in args.candidate:
        name, fit_args = item.split("=", 1)
        start = time.perf_counter()
        rows.append(evaluate(name, fit_args.split(), dev, args.runs))
        print(f"{name}: {rows[-1]['metrics']['image_auroc']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    section = render(args.title, rows, summary, args.leave_out)
    print(section)
    write_section(args.docs, SECTION.format(title=args.title), section)


if __name__ == "__main__":
    main()
