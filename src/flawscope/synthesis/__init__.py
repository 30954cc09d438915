"""Synthetic defects with exact masks: drawn shapes, CutPaste, confetti, Perlin blends, extended real defects."""

from flawscope.synthesis.anomalies import (
    blend,
    extended_anomaly,
    grid_shuffle,
    homologous_source,
    match_grey,
    simulated_anomaly,
)
from flawscope.synthesis.augment import COLOUR_OPS, colour_augment, random_affine
from flawscope.synthesis.confetti import confetti_noise
from flawscope.synthesis.cutpaste import CUTPASTE_VARIANTS, cutpaste
from flawscope.synthesis.defects import (
    BLOB_AREA_RATIO,
    SCRATCH_AREA_RATIO,
    STAIN_AREA_RATIO,
    paint_defect,
    random_blob_mask,
    random_scratch_mask,
    random_stain,
)
from flawscope.synthesis.perlin import (
    FolderTextures,
    ProceduralTextures,
    TextureSource,
    perlin_mask,
    perlin_noise,
    texture_source,
)
from flawscope.synthesis.regions import TARGET_SHAPES, foreground_mask, target_area
from flawscope.synthesis.validation_set import synthetic_defect, write_synthetic_validation_set

__all__ = [
    "BLOB_AREA_RATIO",
    "COLOUR_OPS",
    "CUTPASTE_VARIANTS",
    "SCRATCH_AREA_RATIO",
    "STAIN_AREA_RATIO",
    "TARGET_SHAPES",
    "FolderTextures",
    "ProceduralTextures",
    "TextureSource",
    "blend",
    "colour_augment",
    "confetti_noise",
    "cutpaste",
    "extended_anomaly",
    "foreground_mask",
    "grid_shuffle",
    "homologous_source",
    "match_grey",
    "paint_defect",
    "perlin_mask",
    "perlin_noise",
    "random_affine",
    "random_blob_mask",
    "random_scratch_mask",
    "random_stain",
    "simulated_anomaly",
    "synthetic_defect",
    "target_area",
    "texture_source",
    "write_synthetic_validation_set",
]
