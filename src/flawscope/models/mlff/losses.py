"""MLFF's three losses (spec 2.7): feature constraint, score constraint, feature-score consistency.

All take maps (B, 1, H, W) or features (B, C, h, w) and a bool mask of pseudo-anomalous pixels at the same grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FCDD_EPS = 1e-31  # inside the log, as FCDD's loss (python/fcdd/training/fcdd.py)


def feature_loss(distance: Tensor, anomalous: Tensor, counts: str = "batch") -> Tensor:
    """Eq. 4, class-balanced hypersphere loss: mean A over normal pixels / 2 - mean log(1 - exp(-A)) over anomalous / 2.

    ``counts="batch"`` (M8's proposal) takes both means over the batch's pixels and drops the second term in a batch
    without anomalous pixels; ``"image"`` takes them per image (a term of an image without such pixels is 0) and
    returns the mean of the images' losses.

    Args:
        distance: (B, 1, H, W) pseudo-Huber distances A >= 0.
        anomalous: (B, 1, H, W) bool, True where the pseudo-anomaly mask is set.
        counts: ``"batch"`` or ``"image"``.
    """
    if counts not in ("batch", "image"):
        raise ValueError(f"counts must be 'batch' or 'image'; got {counts!r}.")
    if counts == "image":
        dims = tuple(range(1, distance.dim()))
        normal = (~anomalous).to(distance.dtype)
        abnormal = anomalous.to(distance.dtype)
        # Normal pixels get A = 1 inside the log, so that its gradient is finite where the mask multiplies it by 0.
        log_term = torch.log(1 - torch.exp(-torch.where(anomalous, distance, 1.0)) + FCDD_EPS)
        normal_term = (distance * normal).sum(dims) / normal.sum(dims).clamp(min=1)
        abnormal_term = (log_term * abnormal).sum(dims) / abnormal.sum(dims).clamp(min=1)
        return (normal_term / 2 - abnormal_term / 2).mean()
    normal = distance[~anomalous]
    loss = normal.mean() / 2 if normal.numel() else distance.sum() * 0
    abnormal = distance[anomalous]
    if abnormal.numel():
        loss = loss - torch.log(1 - torch.exp(-abnormal) + FCDD_EPS).mean() / 2
    return loss


def score_loss(
    scores: Tensor,
    anomalous: Tensor,
    gamma: float = 2.5,
    lam: float = 5.0,
    pairing: str = "image_mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Eq. 5: mean max(0, S_n - gamma) over normal pixels + mean max(0, lam - (S_a - S_ref)) over anomalous ones.

    The normal score S_ref paired with an anomalous pixel (M9): the mean normal score of its image
    (``"image_mean"``; the batch mean for an image without normal pixels), the batch's mean normal score
    (``"batch_mean"``), or a random normal pixel of the batch (``"random_pair"``). Not detached.

    Args:
        scores: (B, 1, H, W) scores S.
        anomalous: (B, 1, H, W) bool.
    """
    normal_mask = ~anomalous
    normal = scores[normal_mask]
    loss = (normal - gamma).clamp_min(0).mean() if normal.numel() else scores.sum() * 0
    if not anomalous.any() or not normal.numel():
        return loss
    if pairing == "random_pair":
        pick = torch.randint(normal.numel(), (int(anomalous.sum()),), generator=generator).to(scores.device)
        reference = normal[pick]
    else:
        batch_mean = normal.mean()
        if pairing == "batch_mean":
            reference = batch_mean
        else:
            count = normal_mask.flatten(1).sum(1)
            image_mean = (scores * normal_mask).flatten(1).sum(1) / count.clamp_min(1)
            image_mean = torch.where(count > 0, image_mean, batch_mean)  # (B,)
            reference = image_mean[:, None, None, None].expand_as(scores)[anomalous]
    return loss + (lam - (scores[anomalous] - reference)).clamp_min(0).mean()


def consistency_loss(
    features: Tensor,
    scores: Tensor,
    normal_patches: Tensor,
    sign: str = "neg",
    tau: float = 1.0,
) -> Tensor:
    """Eqs. 6-7: mean over rows of KL(softmax(Q_a) || softmax(P_a)) among the normal patches of each image.

    P_ab = |F_a - F_b|_2 and Q_ab = |Z_a - Z_b|; rows are softmax-normalised over b != a after negation
    (``sign="neg"``, similarities, M10) or as they are (``"raw"``), with temperature ``tau``. Images with fewer
    than two normal patches are skipped; the loss is the mean over the remaining images.

    Args:
        features: (B, C, h, w) patch features F.
        scores: (B, 1, h, w) patch scores Z.
        normal_patches: (B, h, w) bool, patches whose pseudo-anomaly mask is all zero.
    """
    flat_f = features.flatten(2).transpose(1, 2)  # (B, K, C)
    flat_z = scores.flatten(2).transpose(1, 2)  # (B, K, 1)
    factor = -1.0 / tau if sign == "neg" else 1.0 / tau
    p_logits = factor * torch.cdist(flat_f, flat_f)  # (B, K, K)
    q_logits = factor * (flat_z - flat_z.transpose(1, 2)).abs()
    keep = normal_patches.flatten(1)  # (B, K)
    eye = torch.eye(keep.shape[1], dtype=torch.bool, device=keep.device)
    valid = keep[:, :, None] & keep[:, None, :] & ~eye  # (B, K, K): pairs of distinct normal patches
    rows = valid.any(-1)  # (B, K): rows with at least one other normal patch
    log_p = torch.log_softmax(p_logits.masked_fill(~valid, -1e9), dim=-1)
    log_q = torch.log_softmax(q_logits.masked_fill(~valid, -1e9), dim=-1)
    kl = torch.where(valid, log_q.exp() * (log_q - log_p), torch.zeros_like(log_q)).sum(-1)  # (B, K)
    per_image = (kl * rows).sum(1) / rows.sum(1).clamp_min(1)
    used = rows.any(1)
    if not used.any():
        return features.sum() * 0
    return per_image[used].mean()


def normal_patch_mask(anomalous: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, 1, H, W) bool pixel mask -> (B, h, w) bool: True where no pixel of the patch's footprint is anomalous."""
    return F.adaptive_max_pool2d(anomalous.float(), grid)[:, 0] == 0
