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
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from _common import REPO, write_section
from flawscope.bench import BenchSetting, render_markdown, run_bench
from flawscope.config import parse_overrides
from flawscope.registry import available_methods, get_method
from mtd import SETTINGS as MTD_SETTINGS

SECTION = "## MTD: flawscope bench (accuracy, speed in torch and ONNX Runtime, memory)"
# The same settings as benchmarks/mtd.py, read from its fit arguments (one definition of each). PRN's row takes the
# options of mtd.py's prn-0seen setting, but bench passes no --seen-anomalies, so its fit draws PRN's default 10 seen
# defects from the test split and leaves them out of its test (bench.json: excluded_seen). EfficientAD-S runs at the
# paper's 256 px with a CPU schedule (the paper: 70,000 steps), plus teacher_path from --teacher.
FROM_MTD = {"patchcore": "patchcore", "simplenet": "simplenet", "cfa": "cfa", "prn": "prn-0seen", "mlff": "mlff"}
FLAGS = {"--backbone": "backbone", "--image-size": "image_size", "--resize-size": "resize_size"}


MIXED_COMMAND = "benchmarks/bench_mtd.py --only NAME --threads T, one run per row or group of rows (threads column)"


def options_of(fit_args: list[str]) -> dict[str, Any]:
    """`flawscope fit` arguments -> the model options they set, typed by the method's config."""
    method = fit_args[fit_args.index("--model") + 1]
    pairs = [f"{FLAGS[flag]}={value}" for flag, value in pairwise(fit_args) if flag in FLAGS]
    pairs += [value for flag, value in pairwise(fit_args) if flag == "--set"]
    given = parse_overrides(pairs)
    typed = get_method(method).config_class.from_dict(given).to_dict()
    return {key: typed[key] for key in given}


SETTINGS = {name: options_of(MTD_SETTINGS[mtd_name]) for name, mtd_name in FROM_MTD.items()}
SETTINGS["efficientad"] = {"num_steps": 500}
# At the 128 px the offline teacher was distilled at, a step costs a quarter: 2,000 steps fit in the 30 minutes.
SETTINGS["efficientad-128"] = {"image_size": 128, "num_steps": 2000}
# bfloat16 autocast halves the step (0.41 against 0.74 s at 128 px, measured): 3,600 steps in the same 30 minutes.
SETTINGS["efficientad-128-bf16"] = {"image_size": 128, "num_steps": 3600, "train_precision": "bfloat16"}
# The same with a longer-distilled teacher (--teacher names it; docs/benchmarks.md says which steps).
SETTINGS["efficientad-128-bf16-t1500"] = SETTINGS["efficientad-128-bf16"]
# The same with the teacher distilled for 57,000 steps on a GPU (benchmarks/teachers/, docs/benchmarks.md).
SETTINGS["efficientad-128-bf16-t57k"] = SETTINGS["efficientad-128-bf16"]
# The public code's unpadded PDN (maps zero-padded by 4), with that teacher; chosen or not on the development set.
SETTINGS["efficientad-128-bf16-t57k-code"] = {**SETTINGS["efficientad-128-bf16"], "padding": "code"}


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
    method = {n: n.split("-")[0] for n in SETTINGS}
    names = args.only or [
        n for n in SETTINGS if method[n] in available_methods() and (method[n] != "efficientad" or args.teacher)
    ]
    settings = [
        BenchSetting(
            n, method[n], {**SETTINGS[n], **({"teacher_path": args.teacher} if method[n] == "efficientad" else {})}
        )
        for n in names
    ]
    result = run_bench(args.data.resolve(), settings, args.out, threads=args.threads, repeats=args.repeats)
    # Rows of earlier runs (other --only selections) are kept, so the table can be built one model at a time.
    previous = json.loads(store.read_text()) if store.exists() else {"rows": [], "settings": []}
    earlier_cpu = previous.get("environment", {}).get("cpu")  # rows from before rows recorded their CPU
    kept = [{"cpu": earlier_cpu, **r} if earlier_cpu else r for r in previous["rows"] if r["name"] not in names]
    kept_settings = [s for s in previous["settings"] if s["name"] not in names]
    result = {**result, "rows": kept + result["rows"], "settings": kept_settings + result["settings"]}
    if kept:  # the table mixes runs: name the command of a row, not just the latest one
        result["environment"]["command"] = MIXED_COMMAND
    store.write_text(json.dumps(result, indent=2, default=str) + "\n")
    section = render_markdown(result, SECTION)
    print(section)
    write_section(args.docs, SECTION, section)


if __name__ == "__main__":
    main()
