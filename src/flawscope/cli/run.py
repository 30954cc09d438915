"""`flawscope fit | test | predict | export | calibrate | info`: train, evaluate, score, ship a model."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import click

from ..calibration import DEFAULT_TARGET_FPR
from ..config import parse_overrides
from ..errors import ConfigError
from ._common import DEVICE, LAYOUT, PATH, QUIET, main, print_metrics, threads_option, threshold_line


@main.command()
@click.option("--model", "method", required=True, help="method name (see `flawscope info`)")
@click.option(
    "--data", required=True, type=PATH, help="data set root (MVTec layout, VisA, or a plain folder of good images)"
)
@click.option("--out", required=True, type=PATH, help="run folder to write")
@click.option("--backbone", default=None, help="feature extractor, e.g. efficientnet_lite0")
@click.option("--image-size", type=int, default=None, help="model input side in pixels")
@click.option("--resize-size", type=int, default=None, help="shorter side before the centre crop; 0 = no crop")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="any model option, repeatable")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-ratio", type=float, default=0.1, show_default=True, help="good images held out to calibrate")
@click.option(
    "--target-fpr",
    type=float,
    default=DEFAULT_TARGET_FPR,
    show_default=True,
    help="tolerated false-positive rate of the threshold on held-out good images",
)
@click.option("--category", default=None, help="category folder inside a multi-category data root")
@LAYOUT
@click.option(
    "--weights",
    type=PATH,
    default=None,
    help="explicit backbone weights file (efficientad: the distilled teacher file, in place of teacher_path)",
)
@click.option(
    "--seen-anomalies",
    type=click.IntRange(min=0),
    default=None,
    help="few-shot methods (prn): labelled defects to train on, drawn from the test split (or --anomaly-dir) "
    "stratified by type; `flawscope test` excludes them. Default 10 (all of --anomaly-dir)",
)
@click.option(
    "--anomaly-dir",
    type=PATH,
    default=None,
    help="few-shot methods: a separate folder of labelled defects (<type>/ + ground_truth/<type>/)",
)
@threads_option()
@DEVICE
@QUIET
def fit(
    method,
    data,
    out,
    backbone,
    image_size,
    resize_size,
    overrides,
    seed,
    val_ratio,
    target_fpr,
    category,
    layout,
    weights,
    seen_anomalies,
    anomaly_dir,
    device,
    quiet,
) -> None:
    """Train a model on the good images of DATA and write the run folder OUT."""
    from ..api import fit as run_fit

    options = parse_overrides(overrides)
    for key, value in (("backbone", backbone), ("image_size", image_size), ("resize_size", resize_size)):
        if value is not None:
            if key in options and options[key].lstrip("0") != str(value).lstrip("0"):  # 064 is 64
                raise ConfigError(
                    f"--{key.replace('_', '-')} {value} and --set {key}={options[key]} disagree; give {key} once."
                )
            options[key] = value
    run = run_fit(
        method,
        data,
        out,
        options=options,
        seed=seed,
        device=device,
        val_ratio=val_ratio,
        target_fpr=target_fpr,
        layout=layout,
        category=category,
        weights_path=weights,
        quiet=quiet,
        seen_anomalies=seen_anomalies,
        anomaly_dir=anomaly_dir,
    )
    click.echo(f"model written to {run / 'model'}")
    click.echo(f"  {threshold_line(run)}")
    record = json.loads((run / "config.json").read_text(encoding="utf-8"))
    if record.get("seen_anomalies"):
        click.echo(
            f"  trained on {len(record['seen_anomalies'])} labelled defects from "
            f"{'the ' if record.get('seen_anomalies_from_test') else ''}{record['seen_anomalies_source']}; listed in "
            "config.json"
        )


@main.command()
@click.argument("run", type=PATH)
@click.option("--data", required=True, type=PATH)
@click.option("--out", type=PATH, default=None, help="default: the run folder")
@click.option("--category", default=None, help="category of a multi-category root; default: the run's own")
@LAYOUT
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--no-report", is_flag=True, help="skip report.html")
@click.option(
    "--exclude-seen-of",
    type=PATH,
    default=None,
    help="also leave out the defects another (few-shot) run trained on, to compare on the same images",
)
@click.option(
    "--eval-resolution",
    type=click.Choice(["input", "native"]),
    default="input",
    show_default=True,
    help="pixel metrics on the model's input grid, or at each image's own size (needs a run that saw the whole "
    "image, e.g. fitted with --resize-size 0)",
)
@threads_option()
@DEVICE
@QUIET
def test(
    run, data, out, category, layout, batch_size, no_report, exclude_seen_of, eval_resolution, device, quiet
) -> None:
    """Evaluate RUN on the labelled test split of DATA."""
    from ..evaluation import test as run_test

    metrics = run_test(
        run,
        data,
        out=out,
        layout=layout,
        category=category,
        device=device,
        batch_size=batch_size,
        quiet=quiet,
        report=not no_report,
        exclude_seen_of=exclude_seen_of,
        eval_resolution=eval_resolution,
    )
    if metrics.get("num_excluded_seen"):
        click.echo(f"  {metrics['num_excluded_seen']} seen defects used in training were left out of the test set")
    print_metrics(metrics)
    click.echo(f"report: {(out or run) / 'report.html'}" if not no_report else f"metrics: {(out or run)}")


@main.command()
@click.argument("run", type=PATH)
@click.argument("paths", nargs=-1, required=True)
@click.option("--out", required=True, type=PATH)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--no-overlays", is_flag=True, help="no heat-map overlays (CSV and JSON lines only)")
@click.option("--masks", is_flag=True, help="also write binary defect masks (masks/*.png, 255 = defect)")
@click.option(
    "--min-area", type=click.IntRange(min=0), default=0, show_default=True, help="drop defect regions under N pixels"
)
@click.option("--strict", is_flag=True, help="stop at the first unreadable image instead of skipping it")
@click.option(
    "--trust-code",
    is_flag=True,
    help="load a TorchScript RUN file: loading runs the code it holds, so only for files you made or trust",
)
@threads_option(expose=True)
@DEVICE
@QUIET
def predict(
    run, paths, out, batch_size, no_overlays, masks, min_area, strict, trust_code, threads, device, quiet
) -> None:
    """Score new images (files, folders or globs) with RUN: a run folder, or an exported .onnx / .pt file."""
    from ..prediction import predict as run_predict

    start = time.time()
    try:
        csv_path = run_predict(
            run,
            paths,
            out,
            device=device,
            batch_size=batch_size,
            overlays=not no_overlays,
            masks=masks,
            min_area=min_area,
            strict=strict,
            quiet=quiet,
            threads=threads,
            trust_code=trust_code,
        )
    except KeyboardInterrupt:
        written = Path(out) / "predictions.csv"
        started = written.is_file() and written.stat().st_mtime >= start
        click.echo(
            f"\ninterrupted: {written} holds the images scored so far (and skipped.csv the unreadable ones); run "
            "the command again to score all of them."
            if started
            else "\ninterrupted before any image was scored.",
            err=True,
        )
        sys.exit(130)
    click.echo(f"predictions: {csv_path} and {csv_path.with_suffix('.jsonl')}")
    skipped = csv_path.parent / "skipped.csv"
    if skipped.is_file():
        with open(skipped, newline="", encoding="utf-8", errors="surrogateescape") as f:
            count = sum(1 for _ in csv.reader(f)) - 1
        click.echo(f"{count} image(s) could not be read and were skipped; see {skipped}", err=True)


@main.command()
@click.argument("run", type=PATH)
@click.option(
    "--format", "export_format", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True
)
@click.option("--out", type=PATH, default=None, help="default: RUN/export/model.onnx or .pt")
@click.option("--batch", default="dynamic", show_default=True, help="'dynamic' or a fixed batch size N")
@click.option("--half", is_flag=True, help="float16 weights (inputs, outputs and threshold stay float32)")
@click.option("--no-check", is_flag=True, help="skip the parity check against the torch model")
@threads_option()
def export(run, export_format, out, batch, half, no_check) -> None:
    """Export RUN's inference graph (normalisation, calibration and threshold included) to ONNX or TorchScript."""
    from ..api import export_run

    path, report = export_run(run, out, export_format=export_format, batch=batch, half=half, check=not no_check)
    click.echo(f"{export_format} model written to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if report is not None:
        near = report["near_threshold"]
        click.echo(
            f"parity with torch on {report['images']} {report['image_source']} images: "
            f"max |difference| {report['max_abs_norm']:.1e} on the calibrated outputs (allowed "
            f"{report['norm_atol']:.1e}), {report['max_rel_raw']:.1e} of the map's range on the raw ones (allowed "
            f"{report['atol']:.0e}), decisions equal"
            + (f" ({near} image(s) within the tolerance of the threshold not compared)" if near else "")
        )


@main.command()
@click.argument("run", type=PATH)
@click.option(
    "--data",
    required=True,
    type=PATH,
    help="a labelled validation folder (its test/ split), never the data you report test metrics on; with --rule "
    "fpr also a plain folder of good images",
)
@click.option(
    "--rule",
    type=click.Choice(["f1", "fpr"]),
    default="f1",
    show_default=True,
    help="f1: F1-optimal threshold; fpr: quantile of the good images at --target-fpr",
)
@click.option("--target-fpr", type=float, default=None, help=f"with --rule fpr  [default: {DEFAULT_TARGET_FPR}]")
@click.option("--category", default=None, help="category of a multi-category root; default: the run's own")
@LAYOUT
@threads_option()
@DEVICE
@QUIET
def calibrate(run, data, rule, target_fpr, category, layout, device, quiet) -> None:
    """Set RUN's decision threshold from labelled held-out images."""
    from ..api import calibrate_run
    from ..model_io import describe_threshold, read_model_info

    info = read_model_info(run)  # also checks RUN before scoring
    before = (info.get("calibration") or {}).get("threshold") if describe_threshold(info)[0] else None
    calibrate_run(
        run, data, rule=rule, target_fpr=target_fpr, layout=layout, category=category, device=device, quiet=quiet
    )
    click.echo(f"{threshold_line(run)} written to {run}")
    click.echo(f"  previous threshold: {'none (not calibrated)' if before is None else format(before, '.6g')}")


@main.command()
@click.option("--model", "method", default=None, help="show the options of one method")
@click.option("--json", "as_json", is_flag=True)
def info(method, as_json) -> None:
    """Versions, device, methods, and which backbone weights are available offline."""
    from ..backbones import weights_status
    from ..registry import available_methods, get_method
    from ..runs import environment

    if method:
        spec = get_method(method)
        if as_json:
            options = [
                {"name": name, "default": default, "help": help_text}
                for name, default, help_text in spec.config_class.describe()
            ]
            described = {"method": spec.name, "summary": spec.summary, "supervision": spec.supervision}
            click.echo(json.dumps({**described, "options": options}, indent=2, default=str))
            return
        click.echo(f"{spec.name}: {spec.summary} (supervision: {spec.supervision})")
        for name, default, help_text in spec.config_class.describe():
            click.echo(f"  {name:<22} {default!s:<18} {help_text}")
        return
    env = environment()
    report = {"environment": env, "methods": available_methods(), "backbone_weights": weights_status()}
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    for key in ("flawscope", "python", "torch", "timm", "numpy", "cpu", "cpu_count", "torch_threads", "cuda"):
        click.echo(f"{key:<14} {env[key]}")
    click.echo(f"{'methods':<14} {', '.join(report['methods'])}")
    click.echo("backbone weights available offline:")
    for name, status in report["backbone_weights"].items():
        click.echo(f"  {name:<20} {status}")
    if any(status.startswith("missing") for status in report["backbone_weights"].values()):
        from ..backbones.weights import WEIGHTS_DIR_ENV, torch_hub_checkpoints

        click.echo(
            f"  missing files: put them into ${WEIGHTS_DIR_ENV} or {torch_hub_checkpoints()}, or give one to fit "
            "with --weights FILE"
        )
