"""Teacher distillation (spec 2.7): a padded PDN learns to reproduce a backbone's PatchCore features.

Psi: backbone stages at strides 8 and 16 (layer2 + layer3 of a ResNet) at twice the teacher's input size, through
``LocalFeatureAggregator`` (3x3 neighbourhoods, per-stage pooling to 1024, then to 384), normalised per channel
with statistics of ``stats_images`` images. The PDN sees the same image at the teacher size (256 -> 64x64 output,
matching Psi's 512 / 8). Loss: mean squared difference; Adam lr 1e-4, weight decay 1e-5, 60,000 steps of 16 images,
grayscale with p = 0.1 (one decision for both views), no learning-rate schedule. Psi and its target cache are in
``psi.py``.

Resumable: every ``checkpoint_every`` steps the teacher, Adam's state and Psi's statistics go to one safetensors
file next to the output (``<out>.ckpt.safetensors``; ``<out>.ckpt.json`` is a readable copy of its progress).
The data order and the grayscale decisions are functions of (seed, step), so a resumed run continues exactly
where the interrupted one stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from ...backbones.named import IMAGENET_MEAN, IMAGENET_STD
from ...data import find_images
from ...errors import ConfigError, DataError
from ...fitting import autocast, check_precision
from ...outputs import refuse_inside
from ...runs import save_safetensors
from .fit import grayscale_decisions, grayscale_where
from .model import CHECKPOINT_KEY, PDN, TEACHER_METADATA_KEY
from .psi import PatchCoreTarget, PsiTargets

DEFAULT_CACHE_BYTES = 8 << 30


@dataclass(frozen=True)
class DistillSettings:
    """What defines a distillation run; a checkpoint resumes only under the same settings (``steps`` may grow)."""

    backbone: str = "wide_resnet101_2"
    size: str = "small"
    steps: int = 60_000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-5
    gray_prob: float = 0.1
    stats_images: int = 10_000
    image_size: int = 256  # teacher input; Psi sees twice this
    pretrain_dim: int = 1024
    out_channels: int = 384
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size not in ("small", "medium"):
            raise ConfigError(f"--size must be 'small' or 'medium'; got {self.size!r}.")
        positive = ("steps", "batch_size", "stats_images", "image_size", "pretrain_dim", "out_channels")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"The distillation's {name} must be at least 1; got {getattr(self, name)}.")
        if self.image_size < 64 or self.image_size % 32:
            raise ConfigError(
                f"The teacher's image_size must be a multiple of 32 and at least 64, the input sizes EfficientAD can "
                f"be fitted at; got {self.image_size}."
            )
        # written so that NaN fails every test
        if not (0 <= self.gray_prob <= 1 and 0 < self.lr < math.inf and 0 <= self.weight_decay < math.inf):
            raise ConfigError(
                "gray_prob must be in [0, 1], lr a finite number > 0 and weight_decay a finite number >= 0; got "
                f"gray_prob={self.gray_prob}, lr={self.lr}, weight_decay={self.weight_decay}."
            )


class _StepBatches(Sampler[list[int]]):
    """The image indices of steps [start, stop): an endless stream of seeded per-epoch permutations."""

    def __init__(self, num_images: int, batch_size: int, seed: int, start: int, stop: int) -> None:
        self.num_images, self.batch_size, self.seed, self.start, self.stop = num_images, batch_size, seed, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = -1, None
        for step in range(self.start, self.stop):
            batch = []
            for position in range(step * self.batch_size, (step + 1) * self.batch_size):
                if position // self.num_images != epoch:
                    epoch = position // self.num_images
                    order = torch.randperm(self.num_images, generator=torch.Generator().manual_seed(self.seed + epoch))
                batch.append(int(order[position % self.num_images]))
            yield batch


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


@torch.no_grad()
def feature_statistics(targets: PsiTargets, settings: DistillSettings, quiet: bool) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and population std of Psi over ``stats_images`` images (at most all), grayscale p=0.1.

    Returns:
        mean (C,), std (C,), number of images used.
    """
    count = min(settings.stats_images, len(targets.paths))
    chosen = torch.randperm(len(targets.paths), generator=torch.Generator().manual_seed(settings.seed - 1))[:count]
    generator = torch.Generator().manual_seed(settings.seed - 2)
    total = total_sq = 0.0
    positions = 0
    batches = [b.tolist() for b in chosen.split(settings.batch_size)]
    views = zip(batches, targets.loader(batches, small=False), strict=True)
    for indices, big in tqdm(views, "feature statistics", len(batches), disable=quiet, leave=False, dynamic_ncols=True):
        gray = grayscale_decisions(len(indices), settings.gray_prob, generator)
        features = targets(indices, gray, *big).double()
        total = total + features.sum(dim=(0, 2, 3))
        total_sq = total_sq + features.pow(2).sum(dim=(0, 2, 3))
        positions += features.numel() // features.shape[1]
    mean = total / positions
    std = (total_sq / positions - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float(), count


def _checkpoint_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".ckpt.safetensors"), out.with_name(out.name + ".ckpt.json")


def _save_checkpoint(path: Path, teacher: PDN, optimizer: torch.optim.Optimizer, stats: dict[str, Tensor], state: dict):
    tensors = {f"teacher.{k}": v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in stats.items()})
    for index, param_state in optimizer.state_dict()["state"].items():
        for name, value in param_state.items():
            tensors[f"adam.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    partial = path.with_name(path.name + ".partial")
    save_safetensors(tensors, partial, {CHECKPOINT_KEY: json.dumps(state, sort_keys=True)})
    os.replace(partial, path)  # atomic: an interrupted save leaves the previous checkpoint intact
    path.with_suffix(".json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def _load_checkpoint(path: Path, teacher: PDN, optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        state = json.loads(handle.metadata()[CHECKPOINT_KEY])
    tensors = load_file(str(path))
    teacher.load_state_dict({k[len("teacher.") :]: v for k, v in tensors.items() if k.startswith("teacher.")})
    adam_state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, name = key.split(".", 2)
            adam_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": adam_state, "param_groups": optimizer.state_dict()["param_groups"]})
    return state, {k: tensors[k] for k in ("psi_mean", "psi_std")}


def _is_teacher_file(path: Path) -> bool:
    """Whether ``path`` is a teacher that ``flawscope distill`` wrote (so a run may replace it)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return TEACHER_METADATA_KEY in (handle.metadata() or {})
    except Exception:  # a folder, another format, unreadable: not ours
        return False


def _image_list_digest(paths: Sequence[Path], root: Path) -> str:
    names = "\n".join(str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths)
    return hashlib.sha256(names.encode()).hexdigest()[:16]


def _check_out(out: Path, root: Path) -> list[Path]:
    """Refuses a teacher file that is not ours or lies among the images; returns the images under ``root``."""
    if out.suffix != ".safetensors":
        raise ConfigError(f"The teacher file must end in .safetensors; got {out}.")
    if out.exists() and not _is_teacher_file(out):
        raise ConfigError(
            f"{out} exists and is not a teacher written by flawscope distill; flawscope does not overwrite it. "
            "Choose another --out."
        )
    paths = find_images([root])
    # A folder is searched whole; a glob or a file names images in the folders that hold them.
    for folder in sorted({root} if root.is_dir() else {path.resolve().parent for path in paths}):
        refuse_inside(out, folder, "--out")
    return paths


class _Progress:
    """Where a distillation stands, over every run of one checkpoint: steps, seconds and steps per precision."""

    def __init__(self, settings: DistillSettings, root: Path, num_images: int, digest: str, precision: str) -> None:
        self.settings, self.root, self.num_images, self.digest = settings, root, num_images, digest
        self.precision = precision
        self.start_step, self.seconds_before, self.stats_count = 0, 0.0, 0
        self.steps_before: dict[str, int] = {}
        self.loss: float | None = None
        self.started = time.perf_counter()

    def resume(self, checkpoint: Path, teacher: PDN, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
        """Loads ``checkpoint`` into ``teacher`` and ``optimizer`` after checking it matches; returns Psi's stats."""
        state, stats = _load_checkpoint(checkpoint, teacher, optimizer)
        steps = self.settings.steps
        saved = {**state["settings"], "steps": steps}
        wanted = dataclasses.asdict(self.settings)
        changed = [f"{k}: {saved.get(k)} -> {v}" for k, v in wanted.items() if saved.get(k) != v]
        if state["images_digest"] != self.digest:
            changed.append(f"image list: {state['num_images']} -> {self.num_images} images, or other names")
        if changed:
            raise ConfigError(
                f"The checkpoint {checkpoint} was written with other settings ({'; '.join(changed)}). Use the same "
                "options and images to resume, or --restart to start over."
            )
        if state["step"] > steps:
            raise ConfigError(
                f"The checkpoint {checkpoint} is already at step {state['step']}, beyond --steps {steps}. "
                "Ask for at least as many steps, or --restart."
            )
        self.start_step, self.seconds_before = state["step"], state["seconds"]
        self.stats_count, self.loss = state["stats_images_used"], state["loss"]
        self.steps_before = state.get("precision_steps", {"float32": self.start_step})  # older: all float32
        return stats

    def state(self, step: int, loss: float | None) -> dict[str, Any]:
        """The checkpoint's record at ``step``: settings, images, seconds and steps per precision so far."""
        done = self.steps_before.get(self.precision, 0) + step - self.start_step
        return {
            "settings": dataclasses.asdict(self.settings),
            "step": step,
            "images": str(self.root),
            "num_images": self.num_images,
            "images_digest": self.digest,
            "stats_images_used": self.stats_count,
            "loss": loss,
            "seconds": round(self.seconds_before + time.perf_counter() - self.started, 2),
            "precision_steps": {k: v for k, v in {**self.steps_before, self.precision: done}.items() if v},
        }


def _stopped(
    stop: BaseException,
    completed: int,
    steps: int,
    checkpoint: Path,
    saved_step: int | None,
    checkpoint_every: int,
    restart: bool,
) -> BaseException:
    """The error that ends an interrupted run or one whose image became unreadable: what is kept, how to go on."""
    kept = (
        f"the checkpoint {checkpoint} holds step {saved_step}"
        if saved_step is not None
        else f"this run wrote no checkpoint yet (one every {checkpoint_every} steps)"
    )
    if isinstance(stop, DataError):  # an image that became unreadable, or a damaged one the check let through
        return DataError(
            f"{stop} (at step {completed + 1} of {steps}; {kept}). Replace the file with a readable one "
            "of the same name and run the same command to resume, or remove it and start again with --restart."
        )
    again = "run the command again without --restart" if restart else "run the same command again"
    resume = f": {again} to resume from there" if saved_step is not None else ""
    return KeyboardInterrupt(f"Distillation interrupted after {completed} of {steps} steps; {kept}{resume}.")


def distill_teacher(
    backbone: str,
    images: str | Path,
    out: str | Path,
    settings: DistillSettings | None = None,
    *,
    weights_path: str | Path | None = None,
    pretrained_backbone: bool = True,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    checkpoint_every: int = 1000,
    restart: bool = False,
    max_cache_bytes: int = DEFAULT_CACHE_BYTES,
    precision: str = "float32",
    quiet: bool = False,
) -> dict[str, Any]:
    """Distils a PDN teacher from ``backbone`` on the images under ``images`` and writes ``out`` (.safetensors).

    Args:
        backbone: Psi's network (``wide_resnet101_2`` in the paper; any flawscope backbone with a stride-8 stage).
        images: a folder of natural images (ImageNet train in the paper), searched recursively; never written to.
        out: the teacher file; its metadata records size, backbone, steps, image folder and image count.
        settings: the schedule (defaults: the paper's); ``settings.backbone`` is replaced by ``backbone``.
        weights_path: an explicit weight file for the backbone.
        pretrained_backbone: False uses random backbone weights (tests only).
        checkpoint_every: steps between checkpoints.
        restart: ignore an existing checkpoint and start from step 0.
        max_cache_bytes: Psi's targets of every image (colour and grayscale) are computed once and kept when they
            fit in this many bytes, with the PDN's views (500 images at s = 256 need 3.3 GiB); 0 never caches.
        precision: the PDN's forward pass in "float32" or under "bfloat16" autocast (weights, Adam state and the
            loss stay float32; see ``fitting.autocast``). Not a setting: a run may be resumed in the other
            precision, and the teacher's metadata counts the steps done in each (``precision_steps``).

    Returns:
        A summary: steps done in this call, total steps, final loss, seconds, paths.
    """
    settings = dataclasses.replace(settings or DistillSettings(), backbone=backbone)
    check_precision(precision, "--precision")  # before the minutes of target caching
    out, root = Path(out), Path(images)
    paths = _check_out(out, root)
    device = torch.device(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint, progress_json = _checkpoint_paths(out)
    torch.manual_seed(settings.seed)  # the teacher's initialisation (and a random test backbone) follow the seed
    psi = PatchCoreTarget(backbone, pretrained_backbone, weights_path, settings.pretrain_dim, settings.out_channels)
    psi.to(device)
    teacher = PDN(settings.size, settings.out_channels, padded=True).to(device)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    progress = _Progress(settings, root, len(paths), _image_list_digest(paths, root), precision)
    resumed = checkpoint.is_file() and not restart
    if resumed:
        stats = progress.resume(checkpoint, teacher, optimizer)
    # Only after the checkpoint checks: filling the target cache can take minutes.
    targets = PsiTargets(psi, paths, settings.image_size, device, num_workers, max_cache_bytes, quiet)
    if not resumed:
        mean, std, progress.stats_count = feature_statistics(targets, settings, quiet)
        stats = {"psi_mean": mean, "psi_std": std}
    stats = {k: v.to(device) for k, v in stats.items()}
    image_mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    image_std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    mean_map, std_map = stats["psi_mean"].view(1, -1, 1, 1), stats["psi_std"].view(1, -1, 1, 1)
    start_step = progress.start_step
    sampler = _StepBatches(len(paths), settings.batch_size, settings.seed, start_step, settings.steps)
    views = targets.loader(sampler, small=True)
    teacher.train()
    loss_value = progress.loss  # a resumed run that has no step left keeps its last loss
    if resumed and not quiet:
        print(f"resuming from {checkpoint} at step {start_step} of {settings.steps}", file=sys.stderr)
    bar = tqdm(total=settings.steps, initial=start_step, desc="distilling", disable=quiet, dynamic_ncols=True)
    saved_step, completed = (start_step if resumed else None), start_step
    try:
        for step, indices, (*big, small) in zip(range(start_step, settings.steps), sampler, views, strict=True):
            # One grayscale decision per image for both views, drawn from (seed, step) so a resumed run repeats it.
            gray = grayscale_decisions(len(indices), settings.gray_prob, _step_generator(settings.seed, step))
            small = grayscale_where(small.to(device), gray.to(device))
            target = (targets(indices, gray, *big) - mean_map) / std_map
            with autocast(precision, device):
                prediction = teacher((small - image_mean) / image_std)
            loss = (prediction.float() - target).pow(2).mean()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):  # a NaN teacher would be written and fail only in fit, unexplained
                bar.close()
                raise ConfigError(
                    f"Distillation diverged: the loss is {loss_value} at step {step + 1}, so no teacher was written. "
                    f"Lower --lr (now {settings.lr:g}) and start again with --restart."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            completed = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if completed % checkpoint_every == 0 and completed < settings.steps:
                _save_checkpoint(checkpoint, teacher, optimizer, stats, progress.state(completed, loss_value))
                saved_step = completed
    except (KeyboardInterrupt, DataError) as stop:
        bar.close()
        raise _stopped(stop, completed, settings.steps, checkpoint, saved_step, checkpoint_every, restart) from None
    bar.close()
    final = progress.state(settings.steps, loss_value)
    _save_checkpoint(checkpoint, teacher, optimizer, stats, final)
    _write_teacher(out, teacher, settings, final, weights_path or psi.backbone.weights_file)
    return {
        "out": str(out),
        "checkpoint": str(checkpoint),
        "progress": str(progress_json),
        "steps": settings.steps,
        "steps_this_run": settings.steps - start_step,
        "images": str(root),
        "num_images": len(paths),
        "stats_images_used": progress.stats_count,
        "final_loss": loss_value,
        "seconds": final["seconds"],
    }


def _write_teacher(out: Path, teacher: PDN, settings: DistillSettings, state: dict, backbone_weights: Any) -> None:
    """The teacher's state dict with one metadata entry (JSON) saying how it was made."""
    info = {
        "format": 1,
        "size": settings.size,
        "out_channels": settings.out_channels,
        "padding": "paper",
        "image_size": settings.image_size,
        "backbone": settings.backbone,
        "backbone_weights": None if backbone_weights is None else Path(str(backbone_weights)).name,
        "steps": state["step"],
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "weight_decay": settings.weight_decay,
        "gray_prob": settings.gray_prob,
        "seed": settings.seed,
        "images": state["images"],
        "num_images": state["num_images"],
        "stats_images": state["stats_images_used"],
        "final_loss": state["loss"],
        "seconds": state["seconds"],
        "precision_steps": state["precision_steps"],
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
    partial = out.with_name(out.name + ".partial")
    save_safetensors(tensors, partial, {TEACHER_METADATA_KEY: json.dumps(info, sort_keys=True)})
    os.replace(partial, out)
