"""PatchCore (Roth et al., CVPR 2022): the baseline every method is compared with."""

from ...registry import register
from .fit import fit
from .model import PatchCore, PatchCoreConfig

register("patchcore", PatchCore, fit, summary="memory bank of local features, greedy coreset, nearest neighbour")

__all__ = ["PatchCore", "PatchCoreConfig", "fit"]
