"""The `flawscope` command: fit | test | predict | export | bench | calibrate | synth | info | distill | demo."""

from __future__ import annotations

import csv
import errno
import json
import sys
import time
import warnings
from pathlib import Path

import click
from PIL import Image

from . import __version__
from .calibration import DEFAULT_TARGET_FPR
from .config import TRAIN_PRECISIONS, parse_overrides
from .data.io import set_pixel_limit_from_environment
from .errors import ConfigError, DataError, FlawscopeError, format_warning_line

DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
QUIET = click.option("--quiet", is_flag=True, help="no progress bars")


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value:
        import torch

        torch.set_num_threads(value)
    return value


def threads_option(expose: bool = False):
    """--threads N: torch's (and ONNX Runtime's) CPU threads for the whole command; passed on when ``expose``."""
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        expose_value=expose,
        callback=_set_threads,
        help="CPU threads for torch and ONNX Runtime (default: torch's, one per core); on a machine shared with "
        "other jobs fewer threads are often faster",
    )


def _fail(error: Exception | str) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(2)


def _out_of_memory(error: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (GPU) or its CPU allocator's failure."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError)
        and (type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(error))
    )


_FULL = "free space there or give --out on another disk, then run the command again (it replaces what it wrote)"
_DENIED = "check the permissions of that path (flawscope only reads --data and writes --out)"
_OS_ERROR_HINTS = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EACCES: _DENIED,
    errno.EPERM: _DENIED,
    errno.EROFS: "give --out on a writable file system",
    errno.ENAMETOOLONG: "shorten the path or file name",
}


def _os_error_text(error: OSError, command: str | None) -> str:
    where = f" ({error.filename})" if error.filename else ""
    hint = _OS_ERROR_HINTS.get(error.errno, "check that path and the disk")
    return f"`flawscope {command}` stopped: {error.strerror or error}{where}; {hint}."


class _Group(click.Group):
    """Turns flawscope's own errors into one clear line instead of a traceback, and warnings into one line each."""

    def invoke(self, ctx: click.Context):
        formatwarning = warnings.formatwarning
        warnings.formatwarning = format_warning_line
        try:
            set_pixel_limit_from_environment()
            with warnings.catch_warnings():
                # Pillow warns about images above its pixel limit before flawscope refuses them with the reason.
                warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
                return super().invoke(ctx)
        except FlawscopeError as e:
            _fail(e)
        except OSError as e:  # the file system's answer about a file: one line with the file and what to do
            if e.errno not in _OS_ERROR_HINTS and not e.filename:
                raise
            _fail(_os_error_text(e, ctx.invoked_subcommand))
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            said = " ".join(str(e).split())[:160] or type(e).__name__
            _fail(
                f"out of memory in `flawscope {ctx.invoked_subcommand}` ({said}). Use less: "
                "a smaller --batch-size (test, predict) or --set batch_size=N (fit), a smaller fit --image-size, fewer "
                "training images, and for PatchCore --set max_train_features=N (default 2,000,000 locations: about "
                "4 GiB in float16 plus 1 GiB for the coreset search); `flawscope info --model NAME` lists each "
                "model's options."
            )
        finally:
            warnings.formatwarning = formatwarning


class _UserPath(click.Path):
    """A path parameter whose leading ``~`` is expanded, also where the shell left it (``--out=~/runs``, cmd.exe)."""

    def convert(self, value: str | Path, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        return Path(super().convert(value, param, ctx)).expanduser()


PATH = _UserPath(path_type=Path)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="flawscope")
def main() -> None:
    """Visual anomaly detection for industrial inspection."""


@main.command()
@click.option("--model", "method", required=True, help="method name (see `flawscope info`)")
@click.option("--data", required=True, type=PATH, help="data set root (MVTec layout or VisA)")
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
@click.option("--layout", default="auto", type=click.Choice(["auto", "mvtec", "visa"]), show_default=True)
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
    from .api import fit as run_fit

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
    click.echo(f"  {_threshold_line(run)}")
    record = json.loads((run / "config.json").read_text(encoding="utf-8"))
    if record.get("seen_anomalies"):
        click.echo(
            f"  trained on {len(record['seen_anomalies'])} labelled defects from "
            f"{'the ' if record.get('seen_anomalies_from_test') else ''}{record['seen_anomalies_source']}; listed in "
            "config.json"
        )


def _threshold_line(run: Path) -> str:
    """The run's decision threshold and how it was set, as one line."""
    from .model_io import describe_threshold, read_model_info

    return describe_threshold(read_model_info(run))[1]


@main.command()
@click.argument("run", type=PATH)
@click.option("--data", required=True, type=PATH)
@click.option("--out", type=PATH, default=None, help="default: the run folder")
@click.option("--category", default=None, help="category of a multi-category root; default: the run's own")
@click.option("--layout", default="auto", type=click.Choice(["auto", "mvtec", "visa"]), show_default=True)
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
    from .evaluation import test as run_test

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
    _print_metrics(metrics)
    click.echo(f"report: {(out or run) / 'report.html'}" if not no_report else f"metrics: {(out or run)}")


def _print_metrics(metrics: dict) -> None:
    from .evaluation import METRIC_KEYS

    for key in METRIC_KEYS:
        value = metrics.get(key)
        click.echo(f"  {key:<12} {'n/a' if value is None else f'{100 * value:.1f} %'}")


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
    from .prediction import predict as run_predict

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
    from .api import export_run

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
    help="a labelled validation folder (its test/ split), never the data you report test metrics on",
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
@click.option("--layout", default="auto", type=click.Choice(["auto", "mvtec", "visa"]), show_default=True)
@threads_option()
@DEVICE
@QUIET
def calibrate(run, data, rule, target_fpr, category, layout, device, quiet) -> None:
    """Set RUN's decision threshold from labelled held-out images."""
    from .api import calibrate_run
    from .model_io import describe_threshold, read_model_info

    info = read_model_info(run)  # also checks RUN before scoring
    before = (info.get("calibration") or {}).get("threshold") if describe_threshold(info)[0] else None
    calibrate_run(
        run, data, rule=rule, target_fpr=target_fpr, layout=layout, category=category, device=device, quiet=quiet
    )
    click.echo(f"{_threshold_line(run)} written to {run}")
    click.echo(f"  previous threshold: {'none (not calibrated)' if before is None else format(before, '.6g')}")


@main.command()
@click.option("--model", "method", default=None, help="show the options of one method")
@click.option("--json", "as_json", is_flag=True)
def info(method, as_json) -> None:
    """Versions, device, methods, and which backbone weights are available offline."""
    from .backbones import weights_status
    from .registry import available_methods, get_method
    from .runs import environment

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
        from .backbones.weights import WEIGHTS_DIR_ENV, torch_hub_checkpoints

        click.echo(
            f"  missing files: put them into ${WEIGHTS_DIR_ENV} or {torch_hub_checkpoints()}, or give one to fit "
            "with --weights FILE"
        )


@main.command()
@click.option("--backbone", default="wide_resnet101_2", show_default=True, help="network whose features are distilled")
@click.option(
    "--images",
    required=True,
    type=PATH,
    help="folder of natural images (ImageNet train in the paper); searched recursively, never written to",
)
@click.option("--size", type=click.Choice(["small", "medium"]), default="small", show_default=True)
@click.option("--out", required=True, type=PATH, help="teacher file to write (.safetensors)")
@click.option("--steps", type=int, default=60_000, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--weight-decay", type=float, default=1e-5, show_default=True)
@click.option("--gray-prob", type=float, default=0.1, show_default=True, help="grayscale probability per image")
@click.option("--stats-images", type=int, default=10_000, show_default=True, help="images for the feature statistics")
@click.option("--image-size", type=int, default=256, show_default=True, help="teacher input; the backbone sees 2x")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True, help="steps between checkpoints"
)
@click.option("--restart", is_flag=True, help="ignore an existing checkpoint and start from step 0")
@click.option(
    "--num-workers", type=click.IntRange(min=0), default=4, show_default=True, help="image decoding processes"
)
@click.option("--weights", type=PATH, default=None, help="explicit backbone weights file")
@click.option(
    "--cache-gib",
    type=click.FloatRange(min=0),
    default=8.0,
    show_default=True,
    help="keep the backbone's targets of every image (colour and grayscale) and the decoded images in memory (the "
    "GPU's with --device cuda, at most 3/4 of its free memory) when they fit; 0 = never",
)
@click.option(
    "--precision",
    type=click.Choice(TRAIN_PRECISIONS),
    default="float32",
    show_default=True,
    help="the PDN's forward pass; bfloat16 autocast is about 2x faster on CPUs with AMX or AVX512-BF16",
)
@threads_option()
@DEVICE
@QUIET
def distill(
    backbone,
    images,
    size,
    out,
    steps,
    batch_size,
    lr,
    weight_decay,
    gray_prob,
    stats_images,
    image_size,
    seed,
    checkpoint_every,
    restart,
    num_workers,
    weights,
    cache_gib,
    precision,
    device,
    quiet,
) -> None:
    """Distil an EfficientAD teacher (PDN) from BACKBONE's features on a folder of natural images.

    Resumable: rerun the same command after an interruption and it continues from the last checkpoint.
    """
    from .api import resolve_device
    from .models.efficientad.distill import DistillSettings, distill_teacher

    settings = DistillSettings(
        backbone=backbone,
        size=size,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        gray_prob=gray_prob,
        stats_images=stats_images,
        image_size=image_size,
        seed=seed,
    )
    try:
        report = distill_teacher(
            backbone,
            images,
            out,
            settings,
            weights_path=weights,
            device=resolve_device(device),
            num_workers=num_workers,
            checkpoint_every=checkpoint_every,
            restart=restart,
            max_cache_bytes=int(cache_gib * (1 << 30)),
            precision=precision,
            quiet=quiet,
        )
    except KeyboardInterrupt as interrupt:
        click.echo(f"\n{interrupt.args[0] if interrupt.args else 'Interrupted.'}", err=True)
        sys.exit(130)
    click.echo(
        f"teacher written to {report['out']} ({report['steps']} steps, {report['num_images']} images from "
        f"{report['images']}, {report['seconds']:.0f} s, final loss {report['final_loss']})"
    )
    click.echo(
        f"next: flawscope fit --model efficientad --image-size {image_size} --set size={size} "
        f"--set teacher_path={report['out']} ..."
    )


@main.command()
@click.option("--data", required=True, type=PATH, help="data set root whose good images to use")
@click.option("--out", required=True, type=PATH, help="new folder for the validation set")
@click.option(
    "--run",
    type=PATH,
    default=None,
    help="use this run's held-out good images and input geometry (recommended: the model never saw them)",
)
@click.option("--num-defects", type=int, default=None, help="images that get a defect (default: half)")
@click.option(
    "--image-size", type=click.IntRange(min=32), default=256, show_default=True, help="side of the written images"
)
@click.option(
    "--resize-size", type=click.IntRange(min=0), default=0, show_default=True, help="0: resize the whole image"
)
@click.option("--textures", type=PATH, default=None, help="texture folder (e.g. DTD)")
@click.option("--foreground", is_flag=True, help="place defects on the Otsu foreground (object categories)")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--category", default=None, help="category of a multi-category --data (default with --run: the run's)")
@click.option("--layout", default="auto", type=click.Choice(["auto", "mvtec", "visa"]), show_default=True)
def synth(data, out, run, num_defects, image_size, resize_size, textures, foreground, seed, category, layout) -> None:
    """Write a synthetic labelled validation set (good images + simulated defects with masks) to OUT.

    Calibrate a run on it when no real defects exist: flawscope calibrate RUN --data OUT --rule f1
    """
    from .api import missing_images_reason, run_category, run_record
    from .data import load_dataset
    from .outputs import check_outside
    from .registry import get_method
    from .synthesis import write_synthetic_validation_set

    if run is not None and not (Path(run) / "config.json").is_file():
        raise ConfigError(
            f"--run {run} is not a run folder (no config.json in it); give the folder that `flawscope fit --out` "
            "wrote, or leave --run out to use the data set's training images."
        )
    if run is not None:  # a multi-category root: the run's own category, as test and calibrate take it
        category = run_category(run, data, layout, category)
    dataset = load_dataset(data, layout=layout, category=category)
    check_outside(Path(out), dataset.root)
    images = [sample.path for sample in dataset.train]
    if run is not None:
        config_path = Path(run) / "config.json"
        config = run_record(run)
        held_out = [Path(p) for p in config.get("val_images", [])]
        gone = [p for p in held_out if not p.is_file()]
        if gone:
            raise DataError(
                f"{len(gone)} of the {len(held_out)} held-out images listed in {Path(run) / 'config.json'} "
                f"(val_images) are gone, e.g. {gone[0]}: {missing_images_reason(held_out)}. Restore the data there, "
                "or leave --run out to use the training images of --data."
            )
        root = dataset.root.resolve()
        outside = [p for p in held_out if root not in p.resolve().parents]
        if outside:  # synth copies them into OUT: a received run must not choose files from elsewhere
            raise DataError(
                f"{len(outside)} of the held-out images listed in {config_path} (val_images) are not in --data "
                f"{dataset.root}, e.g. {outside[0]}. Give the data folder the run was trained on, or leave --run out."
            )
        if not held_out:  # the training images would be ones the model was fitted on
            raise ConfigError(
                f"--run {run} held out no good images (fitted with --val-ratio 0), so there are none the model never "
                "saw to draw defects on. Leave --run out and give --data a folder of good images it was not trained "
                "on, or fit with --val-ratio 0.1."
            )
        images = held_out
        try:
            options = get_method(config["method"]).config_class.from_dict(config["options"])  # checks the sizes
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{config_path} lacks the run's method or options ({e}); fit the run again.") from e
        image_size, resize_size = options.image_size, options.resize_size
    summary = write_synthetic_validation_set(
        images,
        out,
        num_defects=num_defects,
        image_size=image_size,
        resize_size=resize_size,
        texture_dir=textures,
        use_foreground=foreground,
        seed=seed,
    )
    click.echo(f"{summary['num_good']} good and {summary['num_defects']} synthetic defective images written to {out}")
    click.echo(f"next: flawscope calibrate RUN --data {out} --rule f1")


# The demo's short schedule: SimpleNet on EfficientNet-Lite0 (real weights ship with flawscope's dependencies).
DEMO_OPTIONS = {
    "backbone": "efficientnet_lite0",
    "image_size": 224,
    "resize_size": 0,
    "embed_dim": 384,
    "num_epochs": 40,
}


@main.command()
@click.option(
    "--out",
    type=PATH,
    default=Path("flawscope-demo"),
    show_default=True,
    help="folder for the generated data set and the run",
)
@click.option(
    "--texture",
    type=click.Choice(["brick", "grass", "gravel"]),
    default="grass",
    show_default=True,
    help="which generated category to train and test on",
)
@click.option("--epochs", type=click.IntRange(min=1), default=DEMO_OPTIONS["num_epochs"], show_default=True)
@threads_option()
@DEVICE
@QUIET
def demo(out, texture, epochs, device, quiet) -> None:
    """Generate a small textured data set with drawn-in defects, train SimpleNet on it, test, write a report."""
    from .api import fit as run_fit
    from .data.demo import make_demo_dataset
    from .evaluation import test as run_test

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the demo's data set and run (it is created).")
    click.echo(f"1/3 generating the demo data set in {out / 'data'} (scikit-image texture photos, drawn defects)")
    make_demo_dataset(out / "data", progress=not quiet)
    data = out / "data" / texture
    click.echo(f"2/3 training SimpleNet ({DEMO_OPTIONS['backbone']}, {epochs} epochs) on {data / 'train' / 'good'}")
    with warnings.catch_warnings():
        # A demo run again replaces its own run folder: the warnings that protect a user's runs say nothing here.
        warnings.filterwarnings("ignore", message=".*already holds a run: its model will be replaced")
        warnings.filterwarnings("ignore", message=".*holds the results of another model")
        run = run_fit(
            "simplenet", data, out / "run", options={**DEMO_OPTIONS, "num_epochs": epochs}, device=device, quiet=quiet
        )
        click.echo(f"3/3 testing on {data / 'test'}")
        metrics = run_test(run, data, device=device, quiet=quiet)
    _print_metrics(metrics)
    click.echo(f"report: {(run / 'report.html').resolve()}")
    click.echo(f"next: flawscope predict {run} {data / 'test' / 'scratch'} --out {out / 'predictions'}")


@main.command()
@click.option("--data", required=True, type=PATH, help="labelled data set (MVTec layout or VisA)")
@click.option("--models", default=None, help="comma-separated methods, e.g. patchcore,simplenet")
@click.option("--set", "overrides", multiple=True, metavar="[MODEL:]KEY=VALUE", help="option for all or one model")
@click.option("--settings", type=PATH, default=None, help='JSON {"name": {"model", "options"}}')
@click.option("--out", required=True, type=PATH, help="folder for runs, bench.md, bench.json")
@threads_option(expose=True)
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="timed calls at batch 1")
@click.option("--category", default=None, help="category folder inside a multi-category data root")
@click.option("--layout", default="auto", type=click.Choice(["auto", "mvtec", "visa"]), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def bench(data, models, overrides, settings, out, threads, repeats, category, layout, seed) -> None:
    """Fit, test, export and time several models on DATA; write one table (bench.md, bench.json)."""
    from .bench import parse_settings, run_bench

    result = run_bench(
        data,
        parse_settings(models, overrides, settings),
        out,
        threads=threads,
        repeats=repeats,
        seed=seed,
        layout=layout,
        category=category,
        progress=lambda line: click.echo(line, err=True),
    )
    click.echo((Path(out) / "bench.md").read_text(encoding="utf-8"))
    click.echo(f"written: {Path(out) / 'bench.md'}, {Path(out) / 'bench.json'} ({len(result['rows'])} rows)")


if __name__ == "__main__":
    main()
