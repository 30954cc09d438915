"""Peak memory and time of fitting the per-position whitening (``feature_norm=position``) at the sizes used on MTD.

Each row fits ``flawscope.layers.PositionWhitening`` in its own process on random features (P grid positions, D
channels; one random chunk of 8 images streamed N / 8 times, so the cost is that of N images without the time of
drawing them) and reads the peak resident memory of that process with os.wait4; the process's peak before the fit
(torch imported, the chunk made) is subtracted, so a row is what the fit itself adds. Memory does not depend on N
(the features are streamed), only time does. The table goes into docs/benchmarks.md.

    python benchmarks/whitening_memory.py
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

from _common import REPO, command, cpu_model, publish, run

SECTION = "## Memory of the per-position whitening fit"
# (P, D, what uses it): 224 px at stride 4 (56 x 56) or stride 8 (28 x 28) on MTD's settings.
SIZES = [
    (3136, 176, "CFA, Lite0, strides 4/8/16"),
    (3136, 192, "CFA, Lite2, strides 4/8/16 (`cfa-position-p1-l2`)"),
    (3136, 336, "CFA, Lite2, backbone_blocks 3,3,1 (`cfa-position-p1-l2-b331`)"),
    (784, 384, "SimpleNet, Lite0, embed_dim 384 (`simplenet-position-s012`)"),
]


def child(positions: int, dim: int, images: int, out: Path) -> None:
    """Fits the whitening on random features; writes the resident MiB before the fit and the fit's seconds."""
    import torch

    from flawscope.layers import PositionWhitening

    torch.manual_seed(0)
    chunk = torch.randn(8, positions, dim)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    PositionWhitening(dim).fit(chunk for _ in range(images // 8))
    out.write_text(f"{before:.0f} {time.perf_counter() - start:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96, help="training images streamed, 8 at a time")
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    parser.add_argument("--child", type=int, nargs=2, metavar=("P", "D"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.images < 16 or args.images % 8:
        parser.error(f"--images must be a multiple of 8, at least 16; got {args.images}")
    if args.child:
        child(*args.child, args.images, args.child_out)
        return

    rows = []
    for positions, dim, use in SIZES:
        out = Path(f"/tmp/flawscope-whitening-{positions}-{dim}.txt")
        _, peak = run(
            [sys.executable, __file__, "--child", str(positions), str(dim), "--images", str(args.images)]
            + ["--child-out", str(out)]
        )
        before, seconds = out.read_text().split()
        out.unlink()
        floor = positions * dim * dim * 8 / 2**20  # the float64 sums of outer products alone
        rows.append((use, positions, dim, floor, peak - float(before), float(seconds)))
        print(rows[-1], flush=True)

    table = [
        SECTION,
        "",
        f"Command: `{command()}`",
        "",
        f"Each row: `PositionWhitening(D).fit` on {args.images} random images of P x D features streamed 8 at a time "
        "(one random chunk of 8 streamed repeatedly), in its own process; peak resident memory (os.wait4) minus the "
        "process's peak before the fit. "
        "P · D² · 8 bytes is the float64 accumulator of the sums of outer products, which the fit must hold; the "
        f"fitted float32 matrix is half that. Hardware: {cpu_model()}, {os.cpu_count()} cores, "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')} threads.",
        "",
        "| features | P | D | P·D²·8 (MiB) | fit peak (MiB) | fit (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    table += [f"| {use} | {p} | {d} | {floor:.0f} | {peak:.0f} | {s:.1f} |" for use, p, d, floor, peak, s in rows]
    publish(args.docs, SECTION, table)


if __name__ == "__main__":
    main()
