"""``arange`` and ``linspace`` built from an existing tensor, so that a traced graph does not fix their device.

``torch.jit.trace`` records ``torch.arange(n, device=x.device)`` with the tracing device as a constant: a
TorchScript file exported on the CPU then builds these tensors on the CPU even when loaded on a GPU, and the next
operation with a GPU tensor fails. ``Tensor.new_ones`` is recorded without a device and follows its tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


def arange_like(like: Tensor, n: int, dtype: torch.dtype | None = None) -> Tensor:
    """(n,) the values 0, 1, ..., n - 1 on ``like``'s device, in ``dtype`` (default ``like``'s); exact for n up to
    2^24 in float32."""
    return like.new_ones(n, dtype=dtype).cumsum(0) - 1


def linspace_like(like: Tensor, start: float, end: float, n: int) -> Tensor:
    """(n,) ``torch.linspace(start, end, n)`` on ``like``'s device in its dtype, within one rounding of it (the
    first half counted from ``start``, the second from ``end``; torch's vectorised CPU kernel counts per block, so
    some values differ from its by half a unit in the last place)."""
    index = arange_like(like, n)
    if n == 1:
        return index + start
    step = (end - start) / (n - 1)
    return torch.where(index < n // 2, start + step * index, end - step * (n - 1 - index))
