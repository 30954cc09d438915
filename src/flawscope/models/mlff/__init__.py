"""MLFF (Tang et al., J. NUDT 2025): multi-level feature fusion trained on pseudo-anomalies."""

from ...registry import register
from .fit import fit
from .model import MLFF, MLFFConfig

register(
    "mlff",
    MLFF,
    fit,
    summary="texture (QCO) + self-calibrated branches, trained on confetti/CutPaste pseudo-anomalies with "
    "hypersphere, score and consistency losses",
)

__all__ = ["MLFF", "MLFFConfig", "fit"]
