"""Blocks shared by several methods: local-feature aggregation, Gaussian smoothing, k-means."""

from .blur import GaussianBlur2d, gaussian_kernel1d
from .kmeans import KMeansResult, kmeans, kmeans_plus_plus, pairwise_squared_distances
from .local_features import LocalFeatureAggregator
from .whitening import PositionWhitening

__all__ = [
    "GaussianBlur2d",
    "KMeansResult",
    "LocalFeatureAggregator",
    "PositionWhitening",
    "gaussian_kernel1d",
    "kmeans",
    "kmeans_plus_plus",
    "pairwise_squared_distances",
]
