"""Peak memory of `flawscope predict` against the number of images: it must not grow with the number of images.

A small PatchCore run is fitted on MTD at 64 px (the model is not the point; its speed is), then `flawscope predict`
scores N paths for growing N in separate processes, and the peak resident memory of each process is measured with
os.wait4. The N paths are links in a temporary folder, cycling over MTD's test images (real decoding of every
file). The table goes into docs/deploy.md.

    OMP_NUM_THREADS=1 python benchmarks/predict_memory.py --counts 1000 10000 100000
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _common import REPO, command, cpu_model, publish, run
from flawscope.data import find_images

SECTION = "## Memory of batch prediction against the number of images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "../shared/datasets/mtd")
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--docs", type=Path, default=REPO / "docs/deploy.md")
    args = parser.parse_args()

    sources = find_images([args.data / "test"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="flawscope-predict-memory-") as tmp:
        tmp = Path(tmp)
        fit = ["flawscope", "fit", "--model", "patchcore", "--backbone", "efficientnet_lite0", "--image-size", "64"]
        fit += ["--resize-size", "0", "--data", str(args.data), "--out", str(tmp / "run"), "--quiet"]
        run(fit)
        for count in args.counts:
            folder = tmp / f"images-{count}"
            folder.mkdir()
            for i in range(count):
                source = sources[i % len(sources)]
                (folder / f"{i:06d}{source.suffix}").symlink_to(source.resolve())
            predict = ["flawscope", "predict", str(tmp / "run"), str(folder), "--out", str(tmp / f"out-{count}")]
            seconds, peak_mib = run([*predict, "--no-overlays", "--threads", "1", "--quiet"])
            lines = (tmp / f"out-{count}" / "predictions.csv").read_text().count("\n") - 1
            rows.append((count, lines, seconds, peak_mib))
            print(rows[-1], flush=True)

    table = [
        SECTION,
        "",
        f"Command: `{command()}`",
        "",
        f"Model: PatchCore, EfficientNet-Lite0, 64 px (fitted on {args.data.name}); `flawscope predict RUN FOLDER "
        "--out DIR --no-overlays --threads 1 --quiet`, one process per row; the folder holds N links cycling over the "
        f"{len(sources)} test images (each one decoded). Peak memory: resident set of the predict process "
        f"(os.wait4). Hardware: {cpu_model()}, {os.cpu_count()} cores.",
        "",
        "| images | rows written | wall (s) | images/s | peak MiB |",
        "|---:|---:|---:|---:|---:|",
    ]
    table += [f"| {n:,} | {rows_:,} | {s:.0f} | {n / s:.0f} | {mib:.0f} |" for n, rows_, s, mib in rows]
    publish(args.docs, SECTION, table)


if __name__ == "__main__":
    main()
