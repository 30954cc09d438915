"""PRN (Zhang et al., CVPR 2023)."""

from ...registry import register
from .fit import fit
from .model import PRN, PRNConfig

register(
    "prn",
    PRN,
    fit,
    supervision="few-shot",
    summary="prototype residuals, multi-size self-attention, segmentation decoder; few seen + synthetic defects",
)

__all__ = ["PRN", "PRNConfig", "fit"]
