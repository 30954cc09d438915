"""SimpleNet (Liu et al., CVPR 2023)."""

from ...registry import register
from .fit import fit
from .model import SimpleNet, SimpleNetConfig

register("simplenet", SimpleNet, fit, summary="linear feature adaptor, Gaussian-noise fake features, MLP discriminator")

__all__ = ["SimpleNet", "SimpleNetConfig", "fit"]
