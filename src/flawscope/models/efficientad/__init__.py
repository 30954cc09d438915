"""EfficientAD (Batzner et al., WACV 2024): PDN student-teacher pair plus an autoencoder, millisecond latency."""

from ...registry import register
from .distill import distill_teacher
from .fit import fit
from .model import PDN, AutoEncoder, EfficientAD, EfficientADConfig

register(
    "efficientad",
    EfficientAD,
    fit,
    summary="distilled PDN teacher, student with hard-feature loss, autoencoder for logical anomalies",
)

__all__ = ["PDN", "AutoEncoder", "EfficientAD", "EfficientADConfig", "distill_teacher", "fit"]
