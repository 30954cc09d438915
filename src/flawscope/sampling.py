"""Memory-bank reduction: the greedy (k-center) coreset of PatchCore, with a random projection to speed it up."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def greedy_coreset(
    features: Tensor,
    num_samples: int,
    projection_dim: int = 128,
    generator: torch.Generator | None = None,
    progress: Callable[[Iterator[int], str, int], Iterator[int]] | None = None,
    chunk_size: int = 1 << 16,
) -> Tensor:
    """Selects ``num_samples`` rows that approximately minimise the largest distance of any row to the selection.

    Each step adds the row farthest from everything selected so far (Sener & Savarese; PatchCore Alg. 1).
    Distances are measured after a Gaussian random projection to ``projection_dim`` dimensions
    (Johnson-Lindenstrauss), which PatchCore uses to make the search cheap.

    Args:
        features: (N, D) features, any float dtype, on any device (the selection runs there).
        num_samples: rows to keep, 1 <= num_samples <= N.
        projection_dim: 0 keeps the original dimension.
        generator: seeds the projection and the first pick.
        progress: optional wrapper ``progress(iterable, description, total)`` for a progress bar.
        chunk_size: rows processed at once when projecting (bounds the float32 copy).

    Returns:
        (num_samples,) int64 indices into ``features`` on its device, in selection order.
    """
    num_rows, dim = features.shape
    if not 1 <= num_samples <= num_rows:
        raise ValueError(f"num_samples must be in [1, {num_rows}]; got {num_samples}.")
    if 0 < projection_dim < dim:
        # Drawn on the CPU (the generator's device), so a GPU run selects the same rows.
        projection = torch.randn(dim, projection_dim, generator=generator).to(features.device) / projection_dim**0.5
        reduced = torch.cat([chunk.float() @ projection for chunk in features.split(chunk_size)])
    else:
        reduced = features.float()
    sq_norms = reduced.pow(2).sum(1)  # (N,)
    selected = torch.empty(num_samples, dtype=torch.long, device=features.device)
    selected[0] = int(torch.randint(num_rows, (1,), generator=generator))
    min_dist = torch.full((num_rows,), float("inf"), device=features.device)
    steps = range(1, num_samples)
    for step in progress(steps, "coreset", num_samples - 1) if progress else steps:
        last = reduced.index_select(0, selected[step - 1 : step])[0]  # no sync with a GPU per step
        dist = torch.addmv(sq_norms, reduced, last, alpha=-2).add_(last.pow(2).sum())  # one pass over the rows
        torch.minimum(min_dist, dist, out=min_dist)
        selected[step] = torch.argmax(min_dist)
    return selected


def nearest_in_bank(bank: Tensor, num_neighbors: int, chunk_size: int = 4096) -> Tensor:
    """Each bank row's ``num_neighbors`` nearest rows (itself first), computed in chunks.

    Args:
        bank: (M, D).
        num_neighbors: b <= M.

    Returns:
        (M, b) int64 indices.
    """
    sq_norms = bank.pow(2).sum(1)
    result = []
    for start in range(0, bank.shape[0], chunk_size):
        rows = bank[start : start + chunk_size]
        dist = sq_norms[start : start + chunk_size, None] - 2 * rows @ bank.T + sq_norms[None]
        # Force each row's own index first even when duplicates tie at distance 0.
        dist[torch.arange(rows.shape[0]), torch.arange(start, start + rows.shape[0])] = -1.0
        result.append(dist.topk(num_neighbors, dim=1, largest=False).indices)
    return torch.cat(result)
