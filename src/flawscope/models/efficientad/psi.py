"""Psi, the targets of teacher distillation (spec 2.7): a frozen backbone's PatchCore features of each image.

``PatchCoreTarget`` computes them; ``PsiTargets`` serves them to the training loop by image index and grayscale
decision, computed on the fly or, when they fit in memory, once for every image in colour and in grayscale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from ...backbones import local_feature_extractor
from ...data import preprocess, read_image
from ...data.io import ImageReadingDataset, check_image_header
from ...errors import DataError
from .fit import grayscale_where


class PatchCoreTarget(nn.Module):
    """Psi: images (B, 3, 2s, 2s) in [0, 1] -> (B, out_channels, s/4, s/4) PatchCore features of a frozen backbone."""

    def __init__(
        self,
        backbone: str,
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        pretrain_dim: int = 1024,
        out_channels: int = 384,
    ) -> None:
        super().__init__()
        self.backbone, self.aggregator = local_feature_extractor(
            backbone, (8, 16), 3, pretrain_dim, out_channels, pretrained=pretrained, weights_path=weights_path
        )

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.aggregator(self.backbone(images))


class _Views(ImageReadingDataset):
    """An image resized whole to each of ``sizes`` (2s: Psi's view, s: the PDN's view), each (3, ., .) in [0, 1].

    With ``report_errors`` each item ends with the reason the image could not be read ("" when it could; its views
    are then zeros), so one pass over a folder can list every unreadable file, from worker processes too.
    """

    def __init__(self, paths: Sequence[Path], sizes: Sequence[int], report_errors: bool = False) -> None:
        self.paths, self.sizes, self.report_errors = list(paths), tuple(sizes), report_errors

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor | str, ...]:
        try:
            image = read_image(self.paths[index])
        except DataError as error:
            if not self.report_errors:
                raise
            return (*(torch.zeros(3, size, size) for size in self.sizes), str(error))
        views = tuple(preprocess(image, size, 0) for size in self.sizes)
        return (*views, "") if self.report_errors else views


def _refuse_unreadable(unreadable: Sequence[str], count: int) -> None:
    """One error listing (up to 10 of) the distillation images that cannot be read, before any training."""
    if unreadable:
        more = f" | ... ({len(unreadable)} in all)" if len(unreadable) > 10 else ""
        listed = " | ".join(unreadable[:10]) + more
        raise DataError(
            f"{len(unreadable)} of {count} distillation images cannot be read; nothing was trained. Fix or remove "
            f"them and run the command again: {listed}"
        )


class PsiTargets:
    """Psi's features of the images, by index and grayscale decision: on the fly, or from a cache.

    The distillation's only augmentation is the grayscale decision, so on a small image folder (the 500 BSDS500
    photographs here, not ImageNet) Psi's output of every image in colour and in grayscale can be computed once and
    kept (float16, ``max_cache_bytes`` at most), with the PDN's view of each image (float32, exact); each step then
    costs only the PDN's forward and backward pass, with no image decoding. Both caches live on the training device.
    """

    def __init__(
        self,
        psi: PatchCoreTarget,
        paths: Sequence[Path],
        image_size: int,
        device: torch.device,
        num_workers: int,
        max_cache_bytes: int,
        quiet: bool,
    ) -> None:
        self.psi, self.paths, self.image_size, self.device = psi, list(paths), image_size, device
        self.num_workers = num_workers
        side = image_size // 4
        per_image = 2 * psi.aggregator.target_dim * side * side * 2 + 3 * image_size * image_size * 4
        if device.type == "cuda":  # the caches live in the GPU's memory: leave a quarter of what is free for training
            max_cache_bytes = min(max_cache_bytes, torch.cuda.mem_get_info(device)[0] * 3 // 4)
        self.cache: Tensor | None = None
        self.small_cache: Tensor | None = None
        if len(self.paths) * per_image <= max_cache_bytes:
            self._build_cache(quiet)
        else:  # read on the fly every step: check the headers now, not at step 5,000
            unreadable = []
            for path in tqdm(self.paths, "checking images", disable=quiet, leave=False, dynamic_ncols=True):
                try:
                    check_image_header(path)
                except DataError as error:
                    unreadable.append(str(error))
            _refuse_unreadable(unreadable, len(self.paths))

    @torch.no_grad()
    def _build_cache(self, quiet: bool) -> None:
        """``cache`` (N, 2, C, s/4, s/4) float16: Psi of each image in colour (0) and grayscale (1);
        ``small_cache`` (N, 3, s, s) float32: the PDN's view of each image, in colour."""
        side, count = self.image_size // 4, len(self.paths)
        channels = self.psi.aggregator.target_dim
        cache = torch.empty(count, 2, channels, side, side, dtype=torch.float16, device=self.device)
        small_cache = torch.empty(count, 3, self.image_size, self.image_size, device=self.device)
        sizes = [2 * self.image_size, self.image_size]
        loader = DataLoader(_Views(self.paths, sizes, report_errors=True), batch_size=8, num_workers=self.num_workers)
        first, unreadable = 0, []
        for big, small, errors in tqdm(loader, "Psi targets (cached)", disable=quiet, leave=False, dynamic_ncols=True):
            unreadable += [error for error in errors if error]
            views = torch.stack([big, TF.rgb_to_grayscale(big, 3)], dim=1).to(self.device)  # (B, 2, 3, 2s, 2s)
            cache[first : first + len(big)] = self.psi(views.flatten(0, 1)).unflatten(0, (len(big), 2)).half()
            small_cache[first : first + len(big)] = small.to(self.device)
            first += len(big)
        _refuse_unreadable(unreadable, count)
        self.cache, self.small_cache = cache, small_cache

    def loader(self, batches: Sequence[Sequence[int]], small: bool) -> Iterator[tuple[Tensor, ...]]:
        """Per batch of indices: (Psi's view (B, 3, 2s, 2s) unless cached, then the PDN's view if ``small``)."""
        if self.small_cache is not None:
            cached = self.small_cache
            yield from (((cached[torch.as_tensor(b, device=cached.device)],) if small else ()) for b in batches)
            return
        sizes = [2 * self.image_size] + ([self.image_size] if small else [])
        loader = DataLoader(
            _Views(self.paths, sizes, report_errors=True), batch_sampler=batches, num_workers=self.num_workers
        )
        for *views, errors in loader:  # read in a worker: its error comes back as a reason, not a traceback
            unreadable = [error for error in errors if error]
            if unreadable:
                raise DataError(unreadable[0])
            yield tuple(views)

    @torch.no_grad()
    def __call__(self, indices: Sequence[int], gray: Tensor, big: Tensor | None = None) -> Tensor:
        """Psi of the images ``indices``, grayscale where ``gray`` (B,) is True: (B, C, s/4, s/4) float32.

        ``big`` holds the images at Psi's size (B, 3, 2s, 2s); it is needed only when nothing is cached.
        """
        if self.cache is not None:
            rows = torch.as_tensor(indices, device=self.cache.device)
            return self.cache[rows, gray.long().to(self.cache.device)].float()
        return self.psi(grayscale_where(big.to(self.device), gray.to(self.device)))
