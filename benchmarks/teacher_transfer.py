"""EfficientAD teacher distillation in segments, with the teacher's loss on images of the target domain.

Distils a PDN teacher with ``flawscope.models.efficientad.distill.distill_teacher`` up to each step count of
``--segments`` in turn (each segment resumes the previous checkpoint: the same data order and grayscale decisions as
one uninterrupted run; the first segment starts from scratch), keeps a copy of the teacher after each segment, and
measures its normalised loss (the distillation loss: mean squared difference to Psi's features standardised with the
run's own statistics; 1.0 = predicting the channel means) on two image sets: the first ``--limit`` distillation
images, and the first ``--limit`` images of ``--transfer``, a folder of *training* images of the data the teacher
will be used on (never test images). The second shows whether the teacher still imitates Psi where it will be used,
or has started to fit the distillation images alone. ``--budget-s`` shortens a later segment (never the first, whose
speed is not yet known) to what the speed measured so far allows, and stops there.

    python benchmarks/teacher_transfer.py --images ../shared/datasets/bsds500 \
        --transfer ../shared/datasets/mtd/train/good --segments 5000,15000,30000,60000 --image-size 128 \
        --precision bfloat16 --device cuda --out teachers

Writes ``OUT/teacher-<steps>.safetensors`` per segment and ``OUT/teacher_transfer.json``; ``--publish JSON`` writes
the table of a finished run into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from _common import REPO, command, cpu_model, publish
from flawscope.backbones.named import IMAGENET_MEAN, IMAGENET_STD
from flawscope.data import find_images, preprocess, read_image
from flawscope.models.efficientad.distill import DistillSettings, PatchCoreTarget, distill_teacher
from flawscope.models.efficientad.model import PDN

SECTION = "## EfficientAD: the teacher's loss on the target domain during distillation"


@torch.no_grad()
def normalised_loss(
    teacher: PDN,
    psi: PatchCoreTarget,
    stats: dict[str, torch.Tensor],
    paths: list[Path],
    size: int,
    device: torch.device,
) -> float:
    """Mean over ``paths`` (in colour) of the squared difference between the teacher's output (C, s/4, s/4) for the
    image at ``size`` and Psi's for it at 2 * ``size``, standardised with ``stats`` (psi_mean, psi_std: (C,))."""
    mean, std = stats["psi_mean"].to(device).view(1, -1, 1, 1), stats["psi_std"].to(device).view(1, -1, 1, 1)
    image_mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    image_std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    total = 0.0
    for first in range(0, len(paths), 16):
        images = [read_image(p) for p in paths[first : first + 16]]
        big = torch.stack([preprocess(i, 2 * size, 0) for i in images]).to(device)
        small = torch.stack([preprocess(i, size, 0) for i in images]).to(device)
        target = (psi(big) - mean) / std
        prediction = teacher((small - image_mean) / image_std)
        total += float((prediction - target).pow(2).mean(dim=(1, 2, 3)).sum())
    return total / len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="distillation images (natural photographs)")
    parser.add_argument("--transfer", type=Path, help="training images of the target data (never test images)")
    parser.add_argument("--segments", default="5000,15000,30000,60000", help="step counts at which to measure")
    parser.add_argument("--limit", type=int, default=150, help="images of each set for the loss")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", type=Path, default=None, help="explicit backbone weight file")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="seconds for all segments: a later one is shortened to fit, then the run stops; 0 = no limit",
    )
    parser.add_argument("--out", type=Path, default=Path("teachers"))
    parser.add_argument("--publish", type=Path, default=None, help="a finished run's JSON: write its docs table")
    args = parser.parse_args()
    if args.publish:
        return publish_table(json.loads(args.publish.read_text()))
    segments = [int(s) for s in args.segments.split(",")]
    if any(b <= a for a, b in zip([0, *segments], segments, strict=False)):
        parser.error(f"--segments must be positive and strictly increasing; got {args.segments}")

    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    teacher_file = args.out / "teacher.safetensors"
    settings = DistillSettings(image_size=args.image_size)
    psi = PatchCoreTarget(args.backbone, True, args.weights, settings.pretrain_dim, settings.out_channels).to(device)
    own = find_images([args.images])[: args.limit]
    transfer = find_images([args.transfer])[: args.limit]
    started, rows, rate = time.perf_counter(), [], None
    for target in segments:
        done_before, steps = (rows[-1]["steps"] if rows else 0), target
        if args.budget_s and rate:
            left = args.budget_s - (time.perf_counter() - started) - 20  # the cache rebuild and the loss
            steps = min(target, done_before + int(left / rate) // 1000 * 1000)
            if steps <= done_before:
                break
        t0 = time.perf_counter()
        report = distill_teacher(
            args.backbone,
            args.images,
            teacher_file,
            DistillSettings(image_size=args.image_size, steps=steps, backbone=args.backbone),
            weights_path=args.weights,
            device=device,
            num_workers=args.num_workers,
            checkpoint_every=1000,
            restart=not rows,  # a fresh run, also when OUT holds an earlier one
            precision=args.precision,
            quiet=True,
        )
        seconds = time.perf_counter() - t0
        rate = seconds / report["steps_this_run"]
        kept = args.out / f"teacher-{steps}.safetensors"
        shutil.copyfile(teacher_file, kept)
        teacher = PDN(settings.size, settings.out_channels, padded=True).to(device).eval()
        teacher.load_state_dict(load_file(str(kept)))
        stats = load_file(report["checkpoint"])
        row = {
            "steps": steps,
            "seconds": round(seconds, 1),
            "last_batch_loss": report["final_loss"],
            "loss_distillation_images": normalised_loss(teacher, psi, stats, own, args.image_size, device),
            "loss_transfer_images": normalised_loss(teacher, psi, stats, transfer, args.image_size, device),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if steps < target:  # the budget is spent
            break
    result = {
        "command": command(),
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "images": str(args.images),
        "num_images": len(find_images([args.images])),
        "transfer": str(args.transfer),
        "limit": args.limit,
        "image_size": args.image_size,
        "precision": args.precision,
        "rows": rows,
    }
    (args.out / "teacher_transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    publish_table(result, write=False)


def publish_table(result: dict, write: bool = True) -> None:
    """The section for docs/benchmarks.md (printed; written when ``write``)."""
    lines = [
        SECTION,
        "",
        f"Command: `{result['command']}`. Hardware: {result['hardware']}, torch {result['torch']}, "
        f"{result['precision']} autocast. Distillation images: {result['num_images']} from `{result['images']}`; the "
        f"loss columns are over the first {result['limit']} images of each set (colour, teacher input "
        f"{result['image_size']} px), standardised with the run's own statistics (1.0 = predicting the channel means).",
        "",
        "| steps | seconds (segment) | loss, last batch | loss, distillation images | loss, target training images |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['steps']} | {row['seconds']:.0f} | {row['last_batch_loss']:.3f} | "
            f"{row['loss_distillation_images']:.3f} | {row['loss_transfer_images']:.3f} |"
        )
    if write:
        publish(REPO / "docs" / "benchmarks.md", SECTION, lines)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
