"""`flawscope distill | synth | demo | bench`: teachers, synthetic defects, the demo and the benchmark."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from ..config import TRAIN_PRECISIONS
from ..errors import ConfigError, DataError
from ._common import DEVICE, LAYOUT, PATH, QUIET, main, print_metrics, threads_option


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
    from ..api import resolve_device
    from ..models.efficientad.distill import DistillSettings, distill_teacher

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
@LAYOUT
def synth(data, out, run, num_defects, image_size, resize_size, textures, foreground, seed, category, layout) -> None:
    """Write a synthetic labelled validation set (good images + simulated defects with masks) to OUT.

    Calibrate a run on it when no real defects exist: flawscope calibrate RUN --data OUT --rule f1
    """
    from ..data import load_dataset
    from ..outputs import check_outside
    from ..registry import get_method
    from ..run_data import missing_images_reason, run_category, run_record
    from ..synthesis import write_synthetic_validation_set

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
    from ..api import fit as run_fit
    from ..data.demo import make_demo_dataset
    from ..evaluation import test as run_test

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
    print_metrics(metrics)
    click.echo(f"report: {(run / 'report.html').resolve()}")
    click.echo(f"next: flawscope predict {run} {data / 'test' / 'scratch'} --out {out / 'predictions'}")
    click.echo(
        "your parts: flawscope fit --model simplenet --backbone efficientnet_lite0 --data GOOD_IMAGES/ --out RUN "
        "(a folder of good images, or an MVTec-style data set)"
    )


@main.command()
@click.option("--data", required=True, type=PATH, help="labelled data set (MVTec layout or VisA)")
@click.option("--models", default=None, help="comma-separated methods, e.g. patchcore,simplenet")
@click.option("--set", "overrides", multiple=True, metavar="[MODEL:]KEY=VALUE", help="option for all or one model")
@click.option("--settings", type=PATH, default=None, help='JSON {"name": {"model", "options"}}')
@click.option("--out", required=True, type=PATH, help="folder for runs, bench.md, bench.json")
@threads_option(expose=True)
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="timed calls at batch 1")
@click.option("--category", default=None, help="category folder inside a multi-category data root")
@LAYOUT
@click.option("--seed", type=int, default=0, show_default=True)
def bench(data, models, overrides, settings, out, threads, repeats, category, layout, seed) -> None:
    """Fit, test, export and time several models on DATA; write one table (bench.md, bench.json)."""
    from ..bench import parse_settings, run_bench

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
