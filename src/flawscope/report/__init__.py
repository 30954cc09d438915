"""Heat-map overlays, PNG output and the self-contained HTML test report."""

from flawscope.report.html import Curve, GalleryItem, format_percent, write_report
from flawscope.report.overlay import OUTLINE_COLOR, colorize, heatmap_overlay, png_data_uri, save_png

__all__ = [
    "OUTLINE_COLOR",
    "Curve",
    "GalleryItem",
    "colorize",
    "format_percent",
    "heatmap_overlay",
    "png_data_uri",
    "save_png",
    "write_report",
]
