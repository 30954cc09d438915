"""What a method's fit routine receives besides the model and the training images."""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import TRAIN_PRECISIONS, ModelConfig
from .data import Sample, make_loader
from .errors import ConfigError

T = TypeVar("T")


@dataclass
class FitContext:
    """Device, seed and progress settings shared by every fit routine.

    Attributes:
        device: where training runs.
        seed: seeds torch, numpy and the data order; recorded in the run folder.
        quiet: hide progress bars.
        num_workers: DataLoader worker processes.
        log: free-form per-epoch records a fit routine appends (losses), saved in the run folder.
        seen_anomalies: labelled defective samples (with masks) for few-shot methods; empty for the others.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    quiet: bool = False
    num_workers: int = 0
    log: list[dict] = field(default_factory=list)
    seen_anomalies: Sequence[Sample] = ()

    def loader(
        self, samples: Sequence[Sample], config: ModelConfig, batch_size: int, shuffle: bool = False
    ) -> DataLoader:
        """Batches of images at the model's input geometry (dicts with 'image', 'mask', 'label', 'index')."""
        return make_loader(
            samples,
            config.image_size,
            config.resize_size,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
        )

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None) -> tqdm:
        """Wraps ``iterable`` in a progress bar (hidden when quiet); ``set_postfix`` shows live values."""
        return tqdm(iterable, desc=desc, total=total, disable=self.quiet, leave=False, dynamic_ncols=True)

    def progress_images(self, loader: DataLoader, desc: str) -> Iterator[Any]:
        """The batches of ``loader`` (not shuffled), with a progress bar that counts images, not batches."""
        total = len(loader.dataset)
        with tqdm(total=total, desc=desc, unit="img", disable=self.quiet, leave=False, dynamic_ncols=True) as bar:
            for batch in loader:
                yield batch
                bar.update(min(loader.batch_size or 1, total - bar.n))

    def generator(self, offset: int = 0) -> torch.Generator:
        """A torch RNG seeded from the run's seed (``offset`` separates independent streams)."""
        return torch.Generator().manual_seed(self.seed + offset)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Sets torch's CPU thread count inside the block (None or 0: unchanged) and restores the caller's count after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restores Python's, numpy's and torch's global random generators (CPU, and CUDA once initialised) after the
    block, so seeding inside it does not change the caller's random streams."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # The GPUs' generators too once the caller has used them (forking them would otherwise start CUDA).
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def check_precision(precision: str, option: str = "train_precision") -> str:
    """Returns ``precision`` if it is one of ``TRAIN_PRECISIONS``; otherwise raises ConfigError naming ``option``."""
    if precision not in TRAIN_PRECISIONS:
        raise ConfigError(f"{option} must be one of {', '.join(TRAIN_PRECISIONS)}; got {precision!r}.")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The number format of a training forward pass (the ``train_precision`` option).

    "float32" changes nothing. "bfloat16" runs convolutions and matrix products under ``torch.autocast`` in
    bfloat16; the weights, their gradients and the optimiser state stay float32, and callers compute their
    losses on ``.float()`` outputs. Inference and the saved model are float32 either way.

    Raises:
        ConfigError (a ValueError): for any other name.
    """
    enabled = check_precision(precision) == "bfloat16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor], forward: Callable[[Tensor], object]) -> int:
    """Replaces the running statistics of every trainable BatchNorm layer by exact averages over ``batches``.

    PyTorch's running statistics are an exponential average (momentum 0.1) of per-batch statistics taken while the
    weights were still moving, so they need not match the final weights (PRN's short schedule is a measured case,
    docs/benchmarks.md; "precise BN": Wu & Johnson, Rethinking "Batch" in BatchNorm, 2021). This pass keeps the
    weights and recomputes the statistics with them: cumulative means (``momentum=None``) of the batch statistics,
    as the layer normalised with in training. Frozen BatchNorm layers (a frozen backbone's) are left as they are.

    Args:
        model: the trained module; left in eval mode.
        batches: training-like inputs (B, ...), drawn as in training.
        forward: runs ``model``'s training-time forward pass on one batch (its output is discarded).

    Returns:
        The number of BatchNorm layers recalibrated.
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.weight is None or m.weight.requires_grad)
    ]
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("recalibrate_batchnorm needs at least one batch; with none the statistics would be lost.")
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for batch in itertools.chain([first], batches):
            forward(batch)
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
        m.eval()
    return len(layers)
