"""Synthetic defects: random shapes and painting them into good images with exact masks."""

from flawscope.synthesis.defects import (
    BLOB_AREA_RATIO,
    SCRATCH_AREA_RATIO,
    STAIN_AREA_RATIO,
    paint_defect,
    random_blob_mask,
    random_scratch_mask,
    random_stain,
)

__all__ = [
    "BLOB_AREA_RATIO",
    "SCRATCH_AREA_RATIO",
    "STAIN_AREA_RATIO",
    "paint_defect",
    "random_blob_mask",
    "random_scratch_mask",
    "random_stain",
]
