"""CFA (Lee, Lee, Song, IEEE Access 2022): coupled-hypersphere-based feature adaptation."""

from ...registry import register
from .fit import fit
from .model import CFA, CFAConfig

register(
    "cfa",
    CFA,
    fit,
    summary="patch descriptor adapted by a coupled-hypersphere loss to a compressed memory bank; softmin scoring",
)

__all__ = ["CFA", "CFAConfig", "fit"]
