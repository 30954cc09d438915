"""Accuracy and speed of flawscope's methods on the MTD data set; writes the table into docs/benchmarks.md.

Each setting runs `flawscope fit` and `flawscope test` as separate processes, so the peak resident memory of each
step is measured on its own (os.wait4). Usage:

    python benchmarks/mtd.py                       # every setting in SETTINGS
    python benchmarks/mtd.py --only patchcore      # one of them
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import REPO, cpu_model, write_section

SECTION = "## MTD: accuracy and speed"

# name -> fit arguments. Every setting uses EfficientNet-Lite0 (the ImageNet weights reachable offline here) on
# whole images resized to 224 px (MTD tiles are up to 2.5:1, so a centre crop would cut defects off).
WHOLE_224 = "--backbone efficientnet_lite0 --image-size 224 --resize-size 0"
SETTINGS = {
    "patchcore": f"--model patchcore {WHOLE_224} --set coreset_ratio=0.01".split(),
    "simplenet": f"--model simplenet {WHOLE_224} --set embed_dim=384 --set num_epochs=8".split(),
    "cfa": f"--model cfa {WHOLE_224} --set gamma_c=4 --set num_epochs=8".split(),
}


def run(args: list[str]) -> tuple[float, float]:
    """Runs a command; returns (wall seconds, peak resident MiB of that process)."""
    start = time.perf_counter()
    process = subprocess.Popen(args)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(args)}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def bench(name: str, data: Path, runs: Path) -> dict:
    out = runs / f"mtd-{name}"
    fit_args = ["flawscope", "fit", *SETTINGS[name], "--data", str(data), "--out", str(out), "--quiet"]
    fit_seconds, fit_mib = run(fit_args)
    test_seconds, test_mib = run(["flawscope", "test", str(out), "--data", str(data), "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "name": name,
        "fit": " ".join(fit_args[:2] + SETTINGS[name]),
        "metrics": metrics,
        "fit_seconds": fit_seconds,
        "test_seconds": test_seconds,
        "fit_mib": fit_mib,
        "test_mib": test_mib,
    }


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def render(rows: list[dict], data: Path) -> str:
    lines = [
        SECTION,
        "",
        "Command: `python benchmarks/mtd.py` (each row kept in docs/mtd_results.json; a row may come from a "
        f"`--only NAME` run; data: `{data}`; 700 good training images, 10 % held out for the threshold; "
        "test: 252 good, 392 defective).",
        "",
        f"- Hardware: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU only.",
        f"- Software: Python {platform.python_version()}, torch {torch.__version__}.",
        "- Times are wall-clock for the whole CLI step (fit: feature extraction, training, calibration, saving; "
        "test: inference, metrics, report). Images/s is inference alone over the 644 test images, batch 8. "
        "Peak memory is the resident set of that process.",
        "",
        "| model | image AUROC | image AP | pixel AUROC | AUPRO | fit (s) | test (s) | images/s "
        "| peak MiB fit / test |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["metrics"]
        lines.append(
            f"| {r['name']} | {percent(m['image_auroc'])} | {percent(m['image_ap'])} | {percent(m['pixel_auroc'])} "
            f"| {percent(m['pixel_aupro'])} | {r['fit_seconds']:.0f} | {r['test_seconds']:.0f} "
            f"| {m['images_per_second']:.1f} | {r['fit_mib']:.0f} / {r['test_mib']:.0f} |"
        )
    lines += ["", "Settings (fit arguments):", ""]
    lines += [f"- {r['name']}: `{r['fit']}`" for r in rows]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "../shared/datasets/mtd")
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--only", nargs="*", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md", help="also keeps mtd_results.json")
    args = parser.parse_args()
    if not (args.data / "train" / "good").is_dir():
        sys.exit(f"MTD not found at {args.data}")
    store = args.docs.with_name("mtd_results.json")
    results = json.loads(store.read_text()) if store.exists() else {}
    for name in args.only:
        results[name] = bench(name, args.data.resolve(), args.runs)
        store.write_text(json.dumps(results, indent=2) + "\n")
    section = render([results[name] for name in sorted(results)], args.data)
    print(section)
    write_section(args.docs, SECTION, section)


if __name__ == "__main__":
    main()
