"""Inference speed of every model at its MTD setting, torch and ONNX Runtime, and where the time goes.

No training: each model is built with random weights and its learned buffers filled with random values of the
size an MTD fit gives (PatchCore's 1 % coreset of 630 x 28 x 28 features, CFA's 56 x 56 / 4 memory items), so the
timings are those of a fitted model. Per model: latency at batch 1, images/s at batch 16, FLOPs per image, the
achieved fraction of the machine's matrix-product peak, and the torch.profiler operators that take the time.

    OMP_NUM_THREADS=1 python benchmarks/inference_speed.py                  # every model
    OMP_NUM_THREADS=1 python benchmarks/inference_speed.py --only patchcore
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from _common import REPO, command, cpu_model, write_section
from flawscope.bench import count_flops, matmul_peak_gflops, time_inference
from flawscope.export import OnnxInferencer, TorchInferencer, export_model
from flawscope.registry import available_methods, get_method

SECTION = "## Inference speed per model (CPU)"
LITE0 = {"backbone": "efficientnet_lite0", "image_size": 224, "resize_size": 0}
SETTINGS = {
    "patchcore": {**LITE0, "coreset_ratio": 0.01},
    "simplenet": {**LITE0, "embed_dim": 384},
    "cfa": {**LITE0, "gamma_c": 4},
    "efficientad": {},  # EfficientAD-S at 256 px, the paper's setting
    "prn": dict(LITE0),
    "mlff": dict(LITE0),
}
MTD_TRAIN_FEATURES = 630 * 28 * 28  # good training images x stride-8 grid at 224 px


def fitted_like(name: str) -> torch.nn.Module:
    """A model with random weights whose learned buffers have the sizes an MTD fit gives."""
    method = get_method(name)
    config = method.config_class.from_dict(SETTINGS.get(name, dict(LITE0)))
    model = method.model_class(config, pretrained=False).eval()
    generator = torch.Generator().manual_seed(0)
    if name == "patchcore":
        bank = int(MTD_TRAIN_FEATURES * config.coreset_ratio)
        model.memory_bank = torch.randn(bank, config.target_embed_dim, generator=generator)
        model.bank_neighbors = torch.randint(0, bank, (bank, config.num_neighbors), generator=generator)
    if name == "cfa":
        grid = config.image_size // config.strides[0]
        model.memory_bank = torch.randn(grid * grid // config.gamma_c, model.descriptor_dim, generator=generator)
    model.fitted.fill_(True)
    model.set_calibration(1.0, 0.0)
    return model


def top_operators(model: torch.nn.Module, size: int, count: int = 6) -> list[tuple[str, float]]:
    """(operator, share of self CPU time) of the most expensive operators over 3 batch-1 calls."""
    images = torch.rand(1, 3, size, size)
    with torch.inference_mode():
        model(images)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model(images)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [(e.key, e.self_cpu_time_total / total) for e in events[:count]]


def measure(name: str, threads: int, repeats: int) -> dict:
    model = fitted_like(name)
    size = model.config.image_size
    with tempfile.TemporaryDirectory() as folder:
        path = export_model(model, Path(folder) / "model.onnx")
        onnx_speed = time_inference(OnnxInferencer(path, "cpu", threads), size, repeats)
    flops = count_flops(model, size)
    torch_speed = time_inference(TorchInferencer(model), size, repeats)
    return {
        "name": name,
        "options": model.config.to_dict(),
        "torch": torch_speed,
        "onnxruntime": onnx_speed,
        "gflop_per_image": flops["total"] / 1e9,
        "backbone_flop_share": flops["backbone"] / flops["total"],
        "top_operators": top_operators(model, size),
    }


def render(rows: list[dict], peak: float, threads: int) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `{command()}`. Hardware: {cpu_model()}, {threads} thread(s) for torch and ONNX Runtime, shared "
        f"with other jobs. Peak fp32 matrix product (2048x2048, best of 10, measured in each run; latest): {peak:.1f} "
        "GFLOP/s; % of peak uses the peak of the row's own run. Random weights, "
        "learned buffers of the size an MTD fit gives; random float32 inputs (no decoding).",
        "",
        "| model | input | GFLOP/img | torch b1 (ms) | torch b16 (img/s) | ORT b1 (ms) | ORT b16 (img/s) "
        "| % of peak (torch / ORT) | top operators (torch, share of CPU time) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        gflop = r["gflop_per_image"]
        ops = ", ".join(f"{op.removeprefix('aten::')} {100 * share:.0f} %" for op, share in r["top_operators"][:4])
        lines.append(
            f"| {r['name']} | {r['options']['image_size']} | {gflop:.2f} | {r['torch']['latency_ms']:.1f} "
            f"| {r['torch']['images_per_second']:.1f} | {r['onnxruntime']['latency_ms']:.1f} "
            f"| {r['onnxruntime']['images_per_second']:.1f} "
            f"| {100 * gflop * r['torch']['images_per_second'] / r['peak_gflops']:.0f} / "
            f"{100 * gflop * r['onnxruntime']['images_per_second'] / r['peak_gflops']:.0f} | {ops} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="models to measure (default: every registered one)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--docs", type=Path, default=REPO / "docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = args.docs.with_name("inference_speed.json")
    results = json.loads(store.read_text()) if store.exists() else {}
    peak = matmul_peak_gflops(args.threads)
    for name in args.only or available_methods():
        print(f"measuring {name}", flush=True)
        try:
            results[name] = {**measure(name, args.threads, args.repeats), "peak_gflops": peak}
        except Exception as e:  # a model that needs a real fit to run (learned shapes) is reported, not timed
            print(f"  skipped {name}: {type(e).__name__}: {str(e)[:200]}")
        store.write_text(json.dumps(results, indent=2) + "\n")
    section = render([results[n] for n in sorted(results)], peak, args.threads)
    print(section)
    write_section(args.docs, SECTION, section)


if __name__ == "__main__":
    main()
