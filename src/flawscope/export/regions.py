"""Defect regions: the 8-connected components of a thresholded anomaly map, with box, area and peak score."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Region:
    """One connected defect region, in pixels of the model input (``image_size`` x ``image_size``).

    Attributes:
        x0, y0: top-left corner of the bounding box (inclusive).
        x1, y1: bottom-right corner of the bounding box (exclusive), so the box is ``x1 - x0`` pixels wide.
        area: number of pixels in the region (not the box).
        peak_score: highest calibrated map value inside the region, in (0.5, 1].
        peak_raw: highest raw map value inside the region.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    peak_score: float
    peak_raw: float

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


def find_regions(
    norm_map: np.ndarray, raw_map: np.ndarray | None = None, threshold: float = 0.5, min_area: int = 0
) -> tuple[list[Region], np.ndarray]:
    """Connected components of ``norm_map > threshold``, largest first.

    Args:
        norm_map: (H, W) calibrated anomaly map (threshold at 0.5).
        raw_map: (H, W) raw map for ``peak_raw``; ``norm_map`` when None.
        threshold: pixels above it are defective.
        min_area: components with fewer pixels are dropped (and left out of the returned mask).

    Returns:
        (regions sorted by area then peak, descending; (H, W) bool mask of the kept regions).
    """
    raw_map = norm_map if raw_map is None else raw_map
    labels, count = ndimage.label(norm_map > threshold, structure=EIGHT_CONNECTED)
    if count == 0:
        return [], np.zeros(norm_map.shape, bool)
    index = np.arange(1, count + 1)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    peaks = ndimage.maximum(norm_map, labels, index)
    peaks_raw = ndimage.maximum(raw_map, labels, index)
    boxes = ndimage.find_objects(labels)
    keep = areas >= max(min_area, 1)
    regions = [
        Region(
            x0=int(box[1].start),
            y0=int(box[0].start),
            x1=int(box[1].stop),
            y1=int(box[0].stop),
            area=int(area),
            peak_score=float(peak),
            peak_raw=float(peak_raw),
        )
        for box, area, peak, peak_raw, kept in zip(boxes, areas, peaks, peaks_raw, keep, strict=True)
        if kept
    ]
    regions.sort(key=lambda r: (r.area, r.peak_score), reverse=True)
    mask = np.concatenate([[False], keep])[labels]  # label 0 (background) maps to False
    return regions, mask
