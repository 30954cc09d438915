"""Seeded, batched k-means in torch (k-means++ seeding, Lloyd iterations), and pairwise squared distances.

Used to compress memory banks to a fixed number of items (CFA). Distances are computed by matrix products in row
chunks, so the (N, k) distance matrix is never held at once and the same code runs on CPU or GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def pairwise_squared_distances(queries: Tensor, keys: Tensor) -> Tensor:
    """(..., N, D), (M, D) -> (..., N, M) squared Euclidean distances via one matrix product (exportable).

    Clamped at 0 because ``|q|^2 + |k|^2 - 2 q.k`` can round to a small negative number. One ``addmm`` computes
    ``|k|^2 - 2 q.k`` (the factor and the bias ride on the matrix product) and the rest is updated in place: the
    (N, M) matrix is the largest tensor of nearest-neighbour scoring, and each extra pass over it cost about 10 % of
    PatchCore's inference time.

    float16 and bfloat16 inputs are computed and returned in float32: in float16 a squared distance above 65504
    overflows, and |q|^2 and |k|^2 swamp their small difference in either.
    """
    if queries.dtype in (torch.float16, torch.bfloat16):
        return pairwise_squared_distances(queries.float(), keys.float())
    flat = queries.reshape(-1, queries.shape[-1])
    distances = torch.addmm(keys.pow(2).sum(-1), flat, keys.T, alpha=-2)
    distances = distances.add_(flat.pow(2).sum(-1, keepdim=True)).clamp_min_(0)
    return distances.reshape(*queries.shape[:-1], keys.shape[0])


class KMeansResult(NamedTuple):
    """Outcome of :func:`kmeans`."""

    centers: Tensor  # (k, D)
    labels: Tensor  # (N,) int64, index of each point's nearest centre
    inertia: float  # sum of squared distances of the points to their nearest centre
    num_iter: int  # Lloyd iterations run


def _nearest(points: Tensor, centers: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(N, D), (k, D) -> squared distance to and index of each point's nearest centre, both (N,)."""
    dist, index = [], []
    for chunk in points.split(chunk_size):
        d, i = pairwise_squared_distances(chunk, centers).min(dim=1)
        dist.append(d)
        index.append(i)
    return torch.cat(dist), torch.cat(index)


def kmeans_plus_plus(points: Tensor, num_clusters: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): each new centre is drawn with probability ~ D(x)^2.

    Args:
        points: (N, D) float.
        num_clusters: k <= N.
        generator: CPU generator that makes the draws reproducible.

    Returns:
        (k,) int64 indices of the chosen points.
    """
    num_points = points.shape[0]
    chosen = torch.empty(num_clusters, dtype=torch.long)
    pick = int(torch.randint(num_points, (1,), generator=generator))
    chosen[0] = pick
    min_dist = pairwise_squared_distances(points, points[pick : pick + 1])[:, 0]
    for step in range(1, num_clusters):
        weights = min_dist.double().cpu()  # drawn on the CPU, so a CPU generator seeds GPU runs too
        if float(weights.sum()) <= 0:  # every point coincides with a centre: any point is as good as another
            weights = torch.ones_like(weights)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        chosen[step] = pick
        torch.minimum(min_dist, pairwise_squared_distances(points, points[pick : pick + 1])[:, 0], out=min_dist)
    return chosen


def kmeans(
    points: Tensor,
    num_clusters: int,
    max_iter: int = 300,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    chunk_size: int = 4096,
    init: str = "k-means++",
) -> KMeansResult:
    """Lloyd's k-means, k-means++ (or random) seeding; stops when no label changes or the centres move < ``tol``.

    ``tol`` is relative, as in scikit-learn: the iteration stops once the summed squared centre shift is at most
    ``tol`` times the mean per-dimension variance of ``points``. A cluster that becomes empty is moved onto the
    point farthest from its centre, so exactly ``num_clusters`` distinct centres are returned whenever the points
    allow it. With ``num_clusters == N`` the points themselves are the (zero-inertia) optimum and are returned.

    Args:
        points: (N, D) float features.
        num_clusters: k, 1 <= k <= N.
        max_iter: most Lloyd iterations.
        tol: relative tolerance on the centre shift.
        generator: seeds the k-means++ draws.
        chunk_size: rows whose distances to the centres are computed at once.
        init: "k-means++", or "random": k distinct points drawn uniformly (PRN's prototypes, as in its paper).

    Returns:
        :class:`KMeansResult` with centres in ``points``' dtype and device.

    Raises:
        ValueError: ``num_clusters`` outside [1, N].
    """
    num_points = points.shape[0]
    if not 1 <= num_clusters <= num_points:
        raise ValueError(f"num_clusters must be in [1, {num_points}] (the number of points); got {num_clusters}.")
    data = points.float()
    if num_clusters == num_points:
        return KMeansResult(points.clone(), torch.arange(num_points, device=points.device), 0.0, 0)
    if init == "random":
        seeds = torch.randperm(num_points, generator=generator)[:num_clusters]
    elif init == "k-means++":
        seeds = kmeans_plus_plus(data, num_clusters, generator)
    else:
        raise ValueError(f"init must be 'k-means++' or 'random'; got {init!r}.")
    centers = data[seeds.to(data.device)]
    threshold = tol * float(data.var(dim=0, unbiased=False).mean())
    labels = None
    num_iter = 0
    for num_iter in range(1, max_iter + 1):  # noqa: B007 (returned after the loop)
        min_dist, new_labels = _nearest(data, centers, chunk_size)
        if labels is not None and torch.equal(new_labels, labels):
            break  # converged: the centres below would not move
        labels = new_labels
        sums = torch.zeros_like(centers).index_add_(0, labels, data)
        counts = torch.bincount(labels, minlength=num_clusters)
        new_centers = sums / counts.clamp_min(1)[:, None].to(data.dtype)
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty):
            # Relocate empty clusters to the worst-served points (scikit-learn does the same).
            far = min_dist.topk(len(empty)).indices
            new_centers[empty] = data[far]
        shift = float((new_centers - centers).pow(2).sum())
        centers = new_centers
        if shift <= threshold:
            break
    min_dist, labels = _nearest(data, centers, chunk_size)
    return KMeansResult(centers.to(points.dtype), labels, float(min_dist.sum()), num_iter)
