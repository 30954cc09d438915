"""`flawscope bench`: accuracy, fit time, latency, throughput and memory of several models on one data set.

Each setting runs in its own spawned process (so its peak memory is its own): fit, test (image AUROC, pixel AUROC,
AUPRO), ONNX export with a parity check, then inference timing in torch and ONNX Runtime at batch 1 (latency, median
of ``repeats`` calls) and batch 16 (throughput), with the same thread count for both runtimes. The machine's peak
fp32 throughput is measured once with a square matrix product, and each model's FLOPs per image (convolutions and
matrix products, counted by ``torch.utils.flop_counter``) turn its throughput into a fraction of that peak.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import parse_overrides
from .errors import ConfigError, DataError, use_one_line_warnings
from .fitting import torch_threads
from .registry import get_method

if TYPE_CHECKING:  # the export code loads only when a benchmark runs
    from .export import Inferencer

THROUGHPUT_BATCH = 16
TABLE_FILES = ("bench.json", "bench.md")  # written into --out beside one run folder per setting


@dataclass(frozen=True)
class BenchSetting:
    """One row of the table: a name, a method and its options."""

    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_settings(
    models: str | None, overrides: Sequence[str] = (), settings_file: str | Path | None = None
) -> list[BenchSetting]:
    """Settings from ``--models a,b``, ``--set key=value`` (all models) / ``--set model:key=value`` (one model), or
    a JSON file ``{"name": {"model": "patchcore", "options": {...}}, ...}``."""
    settings: list[BenchSetting] = []
    if settings_file:
        try:
            entries = json.loads(Path(settings_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"--settings {settings_file} cannot be read as JSON ({e}).") from e
        if not isinstance(entries, dict) or not all(isinstance(entry, dict) for entry in entries.values()):
            raise ConfigError(
                f'--settings {settings_file} must hold an object {{"name": {{"model": ..., "options": {{...}}}}}}.'
            )
        for name, entry in entries.items():
            # Each name becomes a folder in --out: a path in it would put a run elsewhere.
            if not name or name in (".", "..") or any(char in name for char in '/\\<>:"|?*'):
                raise ConfigError(
                    f"--settings {settings_file}: the setting name {name!r} is used as a folder name in --out; use "
                    "letters, digits, '-', '_' and '.' (no path separators)."
                )
            if name in TABLE_FILES:
                raise ConfigError(
                    f"--settings {settings_file}: the setting name {name!r} is the name of bench's own table file in "
                    "--out; give the setting another name."
                )
            if not isinstance(entry.get("options", {}), dict):
                raise ConfigError(f"--settings {settings_file}: the options of {name!r} must be a JSON object.")
            settings.append(BenchSetting(name, entry.get("model", name), dict(entry.get("options", {}))))
    for method in [m.strip() for m in (models or "").split(",") if m.strip()]:
        settings.append(BenchSetting(method, method, {}))
    names = [setting.name for setting in settings]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # each name is a run folder in --out: the second fit would replace the first
        raise ConfigError(
            f"The bench setting name(s) {', '.join(twice)} are given twice (--models and --settings together, or "
            "twice in --models); each name is a run folder in --out, so give each setting its own name."
        )
    if not settings:
        raise ConfigError("bench needs --models a,b,... or --settings FILE.")
    shared: dict[str, str] = {}
    specific: dict[str, dict[str, str]] = {}
    for key, value in parse_overrides(overrides).items():
        target, sep, option_name = key.partition(":")
        if sep:
            specific.setdefault(target, {})[option_name] = value
        else:
            shared[key] = value
    unknown = sorted(set(specific) - {s.name for s in settings})
    if unknown:
        names = ", ".join(s.name for s in settings)
        raise ConfigError(f"--set {unknown[0]}:... names no setting of this bench; the settings are {names}.")
    result = []
    for s in settings:
        options = {**shared, **s.options, **specific.get(s.name, {})}
        config_class = get_method(s.method).config_class
        lacking = sorted(set(shared) - set(config_class.field_names()))
        if lacking:  # fail before any fitting starts
            raise ConfigError(
                f"--set {lacking[0]}=... is given to every model, and {s.name} ({s.method}) has no option "
                f"{lacking[0]!r}. To set it for some models only, write --set MODEL:{lacking[0]}=VALUE (MODEL: a "
                f"setting name). Options of {s.method}: {', '.join(config_class.field_names())}."
            )
        config_class.from_dict(options)
        result.append(BenchSetting(s.name, s.method, options))
    return result


def check_ready(settings: Sequence[BenchSetting]) -> None:
    """Builds each setting's model once, so that one which cannot start (EfficientAD without a teacher, weights
    that are not on this machine) fails before the first fit, not after the rows before it.

    Raises:
        ConfigError, WeightsNotFoundError: as ``flawscope fit`` would for that setting, naming it.
    """
    from .errors import FlawscopeError

    for setting in settings:
        spec = get_method(setting.method)
        try:
            with warnings.catch_warnings():  # the fit of the row says them
                warnings.simplefilter("ignore")
                spec.model_class(spec.config_class.from_dict(setting.options), pretrained=True)
        except FlawscopeError as e:
            raise type(e)(f"bench setting {setting.name} ({setting.method}) cannot start: {e}") from e


def peak_memory_mib() -> float | None:
    """Peak resident memory of this process in MiB (fit, test, export and timing together); None on Windows."""
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def matmul_peak_gflops(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """Best-of-``repeats`` fp32 GFLOP/s of a ``size`` x ``size`` matrix product with ``threads`` threads.

    The best rather than the median: on a shared machine the slower calls measure the other jobs, not the CPU.
    """
    with torch_threads(threads):
        a, b = torch.rand(size, size), torch.rand(size, size)
        out = torch.empty(size, size)
        torch.mm(a, b, out=out)
        best = min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn) for _ in range(repeats))


def count_flops(model: torch.nn.Module, image_size: int) -> dict[str, float]:
    """FLOPs of one image through ``model`` (convolutions and matrix products), total and in the backbone."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, 3, image_size, image_size))
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    backbone = sum(v for k, v in per_module.items() if k.count(".") == 1 and k.endswith(".backbone"))
    return {"total": float(counter.get_total_flops()), "backbone": float(backbone)}


def time_inference(inferencer: Inferencer, image_size: int, repeats: int) -> dict[str, float]:
    """Latency at batch 1 (median of ``repeats`` calls) and images/s at batch 16 of an inferencer, random inputs."""
    one = torch.rand(1, 3, image_size, image_size).numpy()
    batch = torch.rand(THROUGHPUT_BATCH, 3, image_size, image_size).numpy()
    latency = _median_seconds(lambda: inferencer.run(one), repeats, warmup=2)
    per_batch = _median_seconds(lambda: inferencer.run(batch), max(2, repeats // 4))
    return {"latency_ms": 1000 * latency, "images_per_second": THROUGHPUT_BATCH / per_batch}


def bench_setting(
    setting: BenchSetting,
    data: str,
    out: str,
    threads: int,
    repeats: int,
    seed: int = 0,
    layout: str = "auto",
    category: str | None = None,
) -> dict[str, Any]:
    """Fit, test, export and time one setting in this process; returns its row of the table."""
    from .api import fit
    from .evaluation import test
    from .export import OnnxInferencer, TorchInferencer, export_checked
    from .model_io import load_model

    torch.set_num_threads(threads)
    run = Path(out) / setting.name
    start = time.perf_counter()
    fit(
        setting.method,
        data,
        run,
        options=setting.options,
        seed=seed,
        device="cpu",
        layout=layout,
        category=category,
        quiet=True,
    )
    fit_seconds = time.perf_counter() - start
    metrics = test(run, data, layout=layout, category=category, device="cpu", quiet=True, report=False)
    model = load_model(run / "model")
    onnx_path, parity = export_checked(model, run / "export" / "model.onnx", "onnx")
    size = model.config.image_size
    torch_speed = time_inference(TorchInferencer(model, "cpu"), size, repeats)
    onnx_speed = time_inference(OnnxInferencer(onnx_path, "cpu", threads), size, repeats)
    flops = count_flops(model, size)
    return {
        "name": setting.name,
        "method": setting.method,
        "options": model.config.to_dict(),
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "pixel_aupro": metrics["pixel_aupro"],
        "test_images": metrics["num_images"],
        "excluded_seen": metrics["num_excluded_seen"],
        "fit_seconds": fit_seconds,
        "torch": torch_speed,
        "onnxruntime": onnx_speed,
        "parity_max_abs_norm": parity["max_abs_norm"],
        "gflop_per_image": flops["total"] / 1e9,
        "backbone_flop_share": flops["backbone"] / flops["total"] if flops["total"] else None,
        "peak_mib": peak_memory_mib(),
    }


def run_bench(
    data: str | Path,
    settings: Sequence[BenchSetting],
    out: str | Path,
    *,
    threads: int | None = None,
    repeats: int = 20,
    seed: int = 0,
    layout: str = "auto",
    category: str | None = None,
    isolate: bool = True,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Benchmarks every setting on ``data`` and writes ``out/bench.json`` and ``out/bench.md``.

    Every setting's model is built once before the first fit (``check_ready``), and the two files are rewritten
    after each row, so a setting that fails later leaves the rows before it.

    Args:
        threads: torch and ONNX Runtime threads (default: torch's current count).
        repeats: timed calls at batch 1 (batch 16 uses a quarter of them, at least 2).
        isolate: run each setting in a fresh spawned process (peak memory per setting); False runs them here.

    Returns:
        The contents of bench.json.
    """
    import onnx
    import onnxruntime

    from .data import load_dataset
    from .outputs import check_outside, claim_out_folder
    from .runs import environment

    out = Path(out)
    dataset = load_dataset(data, layout=layout, category=category)  # a wrong path or category fails before any work
    if not dataset.test:
        raise DataError(
            f"No labelled test images in {dataset.root} ({dataset.layout} layout): bench fits each model on the good "
            "training images and tests it on test/good and test/<defect type> (masks in ground_truth/<defect type>). "
            "Give a data set with a test split."
        )
    category = dataset.category
    writes = [*TABLE_FILES, *(setting.name for setting in settings)]
    check_outside(out, dataset.root, writes)
    check_ready(settings)
    claim_out_folder(out, writes)
    threads = threads or torch.get_num_threads()
    peak = matmul_peak_gflops(threads)
    env = environment(seed)
    cpu = env["cpu"]
    env.update({"threads": threads, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__})
    rows: list[dict[str, Any]] = []
    result = {
        "data": str(dataset.root.resolve()),
        "category": category,
        "layout": dataset.layout,
        "seed": seed,
        "environment": env,
        "matmul_peak_gflops": peak,
        "throughput_batch": THROUGHPUT_BATCH,
        "repeats": repeats,
        "rows": rows,
        "settings": [asdict(s) for s in settings],
    }
    for setting in settings:
        progress(f"bench: {setting.name} ({setting.method})")
        args = (setting, str(data), str(out), threads, repeats, seed, layout, category)
        if isolate:
            with multiprocessing.get_context("spawn").Pool(1, initializer=use_one_line_warnings) as pool:
                row = pool.apply(bench_setting, args)
        else:
            row = bench_setting(*args)
        achieved = row["gflop_per_image"] * row["torch"]["images_per_second"]
        rows.append(
            {
                **row,
                "cpu": cpu,
                "threads": threads,
                "matmul_peak_gflops": peak,
                "achieved_gflops": achieved,
                "peak_fraction": achieved / peak,
            }
        )
        # Written after every row: a later setting that fails (out of memory, interrupted) keeps the rows before it.
        (out / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        (out / "bench.md").write_text(render_markdown(result), encoding="utf-8")
    return result


def _number(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, or "n/a" when it was not measured."""
    return "n/a" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def render_markdown(result: Mapping[str, Any], heading: str = "## flawscope bench") -> str:
    """The bench table with the hardware and software it was measured on."""
    env = result["environment"]
    # Rows kept from earlier runs (benchmarks/bench_mtd.py --only ...) carry their own CPU, thread count and peak.
    threads = {r.get("threads", env["threads"]) for r in result["rows"]}
    cpus: dict[str, list[str]] = {}
    for r in result["rows"]:
        cpus.setdefault(r.get("cpu", env["cpu"]), []).append(r["name"])
    cpu = env["cpu"] if len(cpus) == 1 else "; ".join(f"{c} ({', '.join(names)})" for c, names in cpus.items())
    if len(threads) == 1:
        hardware = (
            f"{env['threads']} threads for torch and ONNX Runtime; GPU: {env.get('cuda') or 'none used'}. Peak fp32 "
            f"matrix product ({env['threads']} threads, 2048x2048, best of 10): {result['matmul_peak_gflops']:.1f} "
            "GFLOP/s."
        )
    else:
        hardware = (
            f"threads for torch and ONNX Runtime as in the threads column (rows from separate runs); GPU: "
            f"{env.get('cuda') or 'none used'}. Peak fp32 matrix product measured in each run with its thread count "
            "(2048x2048, best of 10); each row's % of peak uses its own run's peak."
        )
    lines = [
        heading,
        "",
        f"Data: `{result['data']}`"
        + (f" (category {result['category']})" if result.get("category") else "")
        + (f", seed {env['seed']}" if env.get("seed") is not None else "")
        + f". Command: `{env.get('command', '')}`.",
        "",
        f"- Hardware: {cpu}, {env['cpu_count']} logical CPUs, {hardware}",
        f"- Software: flawscope {env['flawscope']}, Python {env['python']}, torch {env['torch']}, onnxruntime "
        f"{env['onnxruntime']}, onnx {env['onnx']}, timm {env['timm']}, numpy {env['numpy']}.",
        f"- Latency: median of {result['repeats']} calls at batch 1. Throughput: batch {result['throughput_batch']}, "
        "median of a quarter as many calls. Inputs are float32 tensors already resized (decoding not included). "
        "GFLOP/img counts convolutions and matrix products of one image; % of peak = GFLOP/img x torch images/s / "
        "peak. Peak MiB: resident set of the process that fitted, tested, exported and timed the model.",
        "",
        "| model | image AUROC | pixel AUROC | AUPRO | fit (s) | torch b1 (ms) | torch b16 (img/s) "
        "| ORT b1 (ms) | ORT b16 (img/s) | GFLOP/img | % of peak | peak MiB | threads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {_pct(r['image_auroc'])} | {_pct(r['pixel_auroc'])} | {_pct(r['pixel_aupro'])} "
            f"| {r['fit_seconds']:.1f} | {r['torch']['latency_ms']:.1f} | {r['torch']['images_per_second']:.1f} "
            f"| {r['onnxruntime']['latency_ms']:.1f} | {r['onnxruntime']['images_per_second']:.1f} "
            f"| {r['gflop_per_image']:.2f} | {100 * r['peak_fraction']:.0f} | {_number(r['peak_mib'], '.0f')} "
            f"| {r.get('threads', env['threads'])} |"
        )
    # Rows kept from runs before the counts were recorded have none and are left out of the comparison.
    rows = [r for r in result["rows"] if r.get("test_images")]
    counts = {r["name"]: (r["test_images"], r.get("excluded_seen") or 0) for r in rows}
    if len({count for count, _ in counts.values()}) > 1:  # a few-shot model (PRN) left its seen defects out
        listed = ", ".join(
            f"{name} {count}" + (f" ({seen} seen defects left out)" if seen else "")
            for name, (count, seen) in counts.items()
        )
        lines += [
            "",
            f"Test images differ between rows: {listed}. To compare on one split, test the other runs again with "
            "`flawscope test RUN --data DATA --exclude-seen-of FEW_SHOT_RUN`.",
        ]
    lines += ["", "Settings:", ""]
    lines += [f"- {s['name']}: `{s['method']}` {json.dumps(s['options'], sort_keys=True)}" for s in result["settings"]]
    return "\n".join(lines) + "\n"
