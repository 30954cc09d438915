"""Pixel metrics of kept runs at the model's input grid and at each test image's own size, side by side.

Runs ``flawscope test`` twice per run (``--eval-resolution input`` and ``native``, no report; the results go to a
scratch folder, the run folder is not touched) and writes a table into docs/benchmarks.md. The image metrics are the
same both ways; only the pixel metrics move. Nothing is chosen from this table: it says how much the evaluation
resolution, a choice of protocol (MLFF spec M17), moves the numbers the issues' floors are stated in.

    python benchmarks/native_eval.py runs/mtd-prn-420steps-bf16-seed2 --data ../shared/datasets/mtd
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import REPO, command, cpu_model, publish
from flawscope.evaluation import test

HEADING = "## Pixel metrics at the model's input and at the native resolution (MTD test set, kept runs)"
KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro")


def _percent(value: float | None) -> str:
    """A metric as a percentage with one decimal, or n/a when it is undefined (no masks, one class only)."""
    return "n/a" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders written by `flawscope fit --out`")
    parser.add_argument("--data", type=Path, default=REPO / "../shared/datasets/mtd")
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for run in args.runs:
            for resolution in ("input", "native"):
                start = time.perf_counter()
                out = Path(scratch) / f"{run.name}-{resolution}"
                metrics = test(run, args.data, out=out, quiet=True, report=False, eval_resolution=resolution)
                seconds = time.perf_counter() - start
                rows.append((run.name, resolution, metrics, seconds))
    lines = [
        HEADING,
        "",
        f"Command: `{command()}`",
        "",
        f"Hardware: {cpu_model()}, {torch.get_num_threads()} torch threads. Each row is one `flawscope test RUN --data "
        f"{args.data} --eval-resolution R --no-report` (the few-shot runs' seen defects left out, as always); the "
        "seconds are the whole call: scoring, resizing the maps and reading the masks at native size, metrics.",
        "",
        "| run | pixel metrics at | image AUROC | pixel AUROC | pixel AP | AUPRO | AUPRO per type (blowhole / break / "
        "crack / fray / uneven) | seconds |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, resolution, m, seconds in rows:
        values = " | ".join(_percent(m.get(key)) for key in KEYS)
        per_type = " / ".join(_percent(row.get("pixel_aupro")) for _, row in sorted(m["per_type"].items()))
        lines.append(f"| {name} | {resolution} | {values} | {per_type} | {seconds:.0f} |")
    publish(args.docs, HEADING, lines)


if __name__ == "__main__":
    main()
