"""Blocks shared by several methods: local-feature aggregation and Gaussian smoothing."""

from .blur import GaussianBlur2d, gaussian_kernel1d
from .local_features import LocalFeatureAggregator

__all__ = ["GaussianBlur2d", "LocalFeatureAggregator", "gaussian_kernel1d"]
