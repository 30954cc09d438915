"""Blocks shared by several methods: local-feature aggregation, Gaussian smoothing, k-means, whitening, and
device-following ranges for traced graphs."""

from .blur import GaussianBlur2d, gaussian_kernel1d
from .kmeans import KMeansResult, kmeans, kmeans_plus_plus, pairwise_squared_distances
from .local_features import LocalFeatureAggregator
from .ranges import arange_like, linspace_like
from .whitening import PositionWhitening

__all__ = [
    "GaussianBlur2d",
    "KMeansResult",
    "LocalFeatureAggregator",
    "PositionWhitening",
    "arange_like",
    "gaussian_kernel1d",
    "kmeans",
    "kmeans_plus_plus",
    "linspace_like",
    "pairwise_squared_distances",
]
