"""`flawscope bench` on MTD for every model; writes its table into docs/benchmarks.md (and docs/bench_mtd.json).

The backbone settings use EfficientNet-Lite0 (the ImageNet weights reachable offline here) on whole images resized
to 224 px, as benchmarks/mtd.py does (MLFF and EfficientAD at their papers' 256 px). EfficientAD needs a distilled
teacher (`flawscope distill`), given with ``--teacher``; without one it is left out. Usage:

    OMP_NUM_THREADS=1 python benchmarks/bench_mtd.py --threads 1                 # every setting
    OMP_NUM_THREADS=1 python benchmarks/bench_mtd.py --only patchcore --threads 1
    python benchmarks/bench_mtd.py --render-only       # the docs table again from docs/bench_mtd.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from _common import REPO, write_section
from flawscope.bench import BenchSetting, render_markdown, run_bench
from flawscope.registry import available_methods

SECTION = "## MTD: flawscope bench (accuracy, speed in torch and ONNX Runtime, memory)"
LITE0 = {"backbone": "efficientnet_lite0", "image_size": 224, "resize_size": 0}
SETTINGS = {
    "patchcore": {**LITE0, "coreset_ratio": 0.01},
    "simplenet": {**LITE0, "embed_dim": 384, "num_epochs": 8},
    "cfa": {**LITE0, "gamma_c": 1, "num_epochs": 1, "score_mode": "nearest"},  # as benchmarks/mtd.py
    # EfficientAD-S at the paper's 256 px with a CPU schedule (the paper: 70,000 steps); + teacher_path (--teacher).
    "efficientad": {"num_steps": 500},
    # PRN and MLFF at CPU schedules (their paper schedules take days here). bench gives PRN no seen defects, so
    # this row is benchmarks/mtd.py's prn-0seen setting; MLFF runs one pass over the training set (mtd.py: 4).
    "prn": {
        **LITE0,
        "num_epochs": 1,
        "steps_per_epoch": 60,
        "batch_normal": 4,
        "batch_extended": 2,
        "batch_simulated": 2,
        "texture_dir": str((REPO / "../shared/datasets/bsds500").resolve()),
    },
    "mlff": {
        **LITE0,
        "image_size": 256,
        "freeze_backbone": True,
        "batch_size": 8,
        "num_epochs": 1,
        "repeat_factor": 1,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "../shared/datasets/mtd")
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench-mtd")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--teacher", default="", help="EfficientAD teacher (.safetensors from flawscope distill)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs table from bench_mtd.json")
    args = parser.parse_args()
    store = args.docs.with_name("bench_mtd.json")
    if args.render_only:
        write_section(args.docs, SECTION, render_markdown(json.loads(store.read_text()), SECTION))
        return
    if not (args.data / "train" / "good").is_dir():
        sys.exit(f"MTD not found at {args.data}")
    names = args.only or [n for n in SETTINGS if n in available_methods() and (n != "efficientad" or args.teacher)]
    settings = [
        BenchSetting(n, n, {**SETTINGS[n], **({"teacher_path": args.teacher} if n == "efficientad" else {})})
        for n in names
    ]
    result = run_bench(args.data.resolve(), settings, args.out, threads=args.threads, repeats=args.repeats)
    # Rows of earlier runs (other --only selections) are kept, so the table can be built one model at a time.
    previous = json.loads(store.read_text()) if store.exists() else {"rows": [], "settings": []}
    kept = [r for r in previous["rows"] if r["name"] not in names]
    kept_settings = [s for s in previous["settings"] if s["name"] not in names]
    result = {**result, "rows": kept + result["rows"], "settings": kept_settings + result["settings"]}
    store.write_text(json.dumps(result, indent=2, default=str) + "\n")
    section = render_markdown(result, SECTION)
    print(section)
    write_section(args.docs, SECTION, section)


if __name__ == "__main__":
    main()
