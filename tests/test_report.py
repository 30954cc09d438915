"""Tests for flawscope.report: colormap, overlays, PNG output and the HTML report."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from flawscope.errors import DataError
from flawscope.report import (
    OUTLINE_COLOR,
    Curve,
    GalleryItem,
    colorize,
    heatmap_overlay,
    png_data_uri,
    save_png,
    write_report,
)
from flawscope.report._svg import downsample, line_plot


def _luminance(rgb: np.ndarray) -> np.ndarray:
    srgb = rgb.astype(np.float64) / 255.0
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    return linear @ np.array([0.2126, 0.7152, 0.0722])


def test_colorize_endpoints_and_monotonic_luminance():
    ramp = colorize(np.linspace(0.0, 1.0, 256)[None, :])[0]  # (256, 3)
    assert ramp.dtype == np.uint8
    np.testing.assert_array_equal(ramp[0], [0, 0, 4])
    np.testing.assert_array_equal(ramp[-1], [252, 255, 164])
    assert np.all(np.diff(_luminance(ramp)) > 0)


def test_colorize_clips_out_of_range_and_nan():
    out = colorize(np.array([[-1.0, np.nan, 2.0]]))
    np.testing.assert_array_equal(out[0, :2], [[0, 0, 4], [0, 0, 4]])  # the colour of 0
    np.testing.assert_array_equal(out[0, 2], colorize(np.ones((1, 1)))[0, 0])


def test_overlay_blends_with_alpha():
    image = np.full((8, 8, 3), 200, np.uint8)
    out = heatmap_overlay(image, np.zeros((8, 8)), alpha=0.5)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [100, 100, 102])  # halfway between 200 and inferno(0) = (0, 0, 4)
    np.testing.assert_array_equal(heatmap_overlay(image, np.ones((8, 8)), alpha=0.0), image)


def test_overlay_outline_follows_mask_boundary_exactly():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    anomaly_map = rng.random((40, 50))
    mask = np.zeros((40, 50), bool)
    mask[10:25, 5:30] = True
    mask[0:6, 40:50] = True  # touches the image border, which must close the outline
    boundary = mask & ~ndimage.binary_erosion(mask, border_value=0)

    out = heatmap_overlay(image, anomaly_map, mask)
    plain = heatmap_overlay(image, anomaly_map)

    assert np.all(out[boundary] == OUTLINE_COLOR)
    np.testing.assert_array_equal(out[~boundary], plain[~boundary])
    assert boundary[0, 45] and boundary[3, 49]  # the border rows/columns of the second region are outlined
    assert not boundary[15, 15]  # the inside stays a heat map


def test_overlay_outline_is_two_pixels_on_large_images():
    image = np.zeros((256, 256, 3), np.uint8)
    mask = np.zeros((256, 256), bool)
    mask[50:150, 50:150] = True
    out = heatmap_overlay(image, np.zeros((256, 256)), mask)
    is_outline = np.all(out == OUTLINE_COLOR, axis=2)
    assert is_outline[50:52, 100].all() and not is_outline[52, 100] and not is_outline[49, 100]


def test_overlay_resizes_map_bilinearly():
    image = np.zeros((64, 64, 3), np.uint8)
    small = np.zeros((8, 8))
    small[:, 4:] = 1.0
    out = heatmap_overlay(image, small, alpha=1.0)
    expected = colorize(np.asarray(Image.fromarray(small.astype(np.float32)).resize((64, 64), Image.BILINEAR)))
    np.testing.assert_array_equal(out, expected)
    assert np.all(out[:, 0] == colorize(np.zeros((1, 1)))[0, 0])
    assert np.all(out[:, -1] == colorize(np.ones((1, 1)))[0, 0])
    assert len(np.unique(out[0], axis=0)) > 2  # a gradient, not a nearest-neighbour step


def test_overlay_accepts_grayscale_image():
    gray = np.full((6, 7), 120, np.uint8)
    np.testing.assert_array_equal(
        heatmap_overlay(gray, np.zeros((6, 7))), heatmap_overlay(np.dstack([gray] * 3), np.zeros((6, 7)))
    )


@pytest.mark.parametrize(
    ("image", "anomaly_map", "mask", "match"),
    [
        (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4)), None, "uint8"),
        (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4)), None, r"\(H, W, 3\)"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 4)), None, "anomaly map"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4)), np.zeros((3, 3), bool), "mask"),
    ],
)
def test_overlay_rejects_bad_input(image, anomaly_map, mask, match):
    with pytest.raises(DataError, match=match):
        heatmap_overlay(image, anomaly_map, mask)


def test_png_round_trip(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "overlay.png"
    save_png(path, image)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    uri = png_data_uri(image)
    assert uri.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    np.testing.assert_array_equal(np.asarray(decoded), image)


def test_downsample_keeps_endpoints_and_shape():
    x = np.linspace(0.0, 1.0, 1_000_001) ** 40  # most points crowd near x = 0, like a pixel ROC
    y = np.sqrt(x)
    keep = downsample(x, y, max_points=500)
    assert len(keep) <= 500
    assert keep[0] == 0 and keep[-1] == len(x) - 1
    assert np.all(np.diff(keep) > 0)
    # Evenly spread along the path: no gap between kept points spans more than a few percent of the plot.
    assert np.max(np.hypot(np.diff(x[keep]), np.diff(y[keep]))) < 0.02


def test_downsample_leaves_short_curves_alone():
    np.testing.assert_array_equal(downsample(np.arange(5.0), np.arange(5.0), max_points=10), np.arange(5))


def test_curve_file_points_are_capped_along_the_curve_with_both_ends():
    x = np.linspace(0.0, 0.3, 100_000) ** 2 / 0.3  # dense near 0, as a pixel PRO curve
    y = np.sqrt(x / 0.3)
    stored = Curve("PRO", x, y, "FPR", "PRO", 0.5, xmax=0.3).to_dict(max_points=300)
    assert 2 < len(stored["x"]) <= 300 and len(stored["x"]) == len(stored["y"])
    assert stored["x"][0] == x[0] and stored["x"][-1] == x[-1] and stored["y"][-1] == y[-1]
    assert np.all(np.diff(stored["x"]) > 0)
    short = Curve("ROC", np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.9, 1.0]), "FPR", "TPR").to_dict()
    assert short == {"x": [0.0, 0.5, 1.0], "y": [0.0, 0.9, 1.0]}


def test_line_plot_cuts_at_xmax():
    svg = line_plot(np.linspace(0, 1, 11), np.linspace(0, 1, 11), xlabel="FPR", ylabel="PRO", xmax=0.3)
    xs = [float(p.split(",")[0]) for p in re.search(r'polyline class="line" points="([^"]+)"', svg).group(1).split()]
    assert max(xs) == pytest.approx(346.0)  # the right edge of the axes: 360 px wide minus the 14 px margin
    assert ">0.3<" in svg and ">0.05<" in svg


@pytest.fixture
def report_text(tmp_path):
    overlay = heatmap_overlay(np.zeros((16, 16, 3), np.uint8), np.random.default_rng(2).random((4, 4)))
    curves = [
        Curve("ROC (image)", np.array([0.0, 0.2, 1.0]), np.array([0.0, 0.8, 1.0]), "FPR", "TPR", area=0.9),
        Curve("PR (pixel)", np.linspace(0, 1, 3000), np.linspace(1, 0, 3000), "Recall", "Precision"),
        Curve("PRO (pixel)", np.linspace(0, 1, 50), np.linspace(0, 1, 50), "FPR", "PRO", area=0.5, xmax=0.3),
    ]
    path = write_report(
        tmp_path / "out" / "report.html",
        title="Run <script>alert(1)</script>",
        info={"model": "simplenet", "threshold": "0.5 & up"},
        metrics={"image_auroc": 0.95341, "image_ap": 1.0, "pixel_auroc": None, "pixel_aupro": 0.8766},
        per_type={"crack": {"count": 7, "image_auroc": 0.8127}, "hole": {"count": 3, "image_auroc": None}},
        curves=curves,
        gallery={
            "Highest-scored good": [GalleryItem("a.png", "good · score 0.41", overlay)] * 2,
            "Lowest-scored defective": [GalleryItem("b<i>.png", "crack · score 0.3", overlay)],
        },
        reasons={"pixel_auroc": "no masks were found"},
    )
    assert path.is_file()
    return path.read_text(encoding="utf-8")


def test_report_formats_metrics(report_text):
    for shown in ("95.3%", "100.0%", "87.7%", "81.3%", "90.0%", "50.0%"):
        assert shown in report_text
    assert "n/a" in report_text and "no masks were found" in report_text
    assert "needs good test images" in report_text  # the per-type None


def test_report_has_one_svg_per_curve_and_one_image_per_item(report_text):
    assert report_text.count("<svg") == 3
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', report_text)) == 3
    assert "http" not in report_text


def test_report_escapes_text(report_text):
    assert "<script>" not in report_text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report_text
    assert "b&lt;i&gt;.png" in report_text and "0.5 &amp; up" in report_text


def test_report_shrinks_large_gallery_images(tmp_path):
    item = GalleryItem("big.png", "", np.zeros((1024, 768, 3), np.uint8))
    text = write_report(
        tmp_path / "r.html", title="t", info={}, metrics={}, per_type={}, curves=[], gallery={"g": [item]}
    ).read_text()
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(uri))).size == (384, 512)
