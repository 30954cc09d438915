"""docs/deploy.md's standalone code (numpy, Pillow, ONNX Runtime; no flawscope) gives flawscope's answers.

The page's code blocks are executed as written: decoding must equal ``read_image`` exactly, the geometry must match
``preprocess`` within float rounding of the two resize implementations, and the ONNX Runtime block must reproduce
the torch model's scores and decisions on files of other sizes than the model input.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import _fit

from flawscope.data import preprocess, read_image
from flawscope.export import TorchInferencer, export_model

DEPLOY = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"
# Pillow's and torch's antialiased bilinear resizes use the same triangle filter; they differ by float rounding
# (measured at most 0.006 / 255 on random images), far below one 8-bit step.
GEOMETRY_ATOL = 1e-3


def _doc_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", DEPLOY.read_text(encoding="utf-8"), flags=re.DOTALL)
    (block,) = [b for b in blocks if marker in b]
    return block


@pytest.fixture(scope="module")
def standalone() -> dict:
    namespace: dict = {}
    exec(_doc_block("def model_input("), namespace)  # noqa: S102 - the documented code itself is under test
    return namespace


def _write_odd_images(folder: Path) -> list[Path]:
    """Files in every decoding case of flawscope.data.io, at sizes other than the model input."""
    rng = np.random.default_rng(0)
    colour = (rng.random((45, 70, 3)) * 255).astype(np.uint8)
    grey = (rng.random((70, 45)) * 255).astype(np.uint8)
    files = {
        "rgb.jpg": Image.fromarray(colour),
        "grey.png": Image.fromarray(grey),
        "sixteen.png": Image.fromarray((rng.random((50, 60)) * 65535).astype(np.uint16)),
        "rgba.png": Image.fromarray(np.dstack([colour, (rng.random((45, 70)) * 255).astype(np.uint8)])),
        "palette.png": Image.fromarray(colour).convert("P"),
        "strip.png": Image.fromarray((rng.random((6, 130, 3)) * 255).astype(np.uint8)),  # trimmed before a crop
        "tiny.bmp": Image.fromarray(colour[:20, :30]),  # upscaled
        # 45 x 71 at resize 72: 113 columns, crop offset (113 - 64) / 2 = 24.5, which half-to-even rounds to 24
        "half.png": Image.fromarray((rng.random((45, 71, 3)) * 255).astype(np.uint8)),
    }
    paths = []
    for name, image in files.items():
        if name == "palette.png":
            image.info["transparency"] = 0
        image.save(folder / name)
        paths.append(folder / name)
    rotated = Image.fromarray(colour)
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
    rotated.save(folder / "exif.jpg", exif=exif)
    return [*paths, folder / "exif.jpg"]


def test_documented_decoding_equals_read_image(standalone, tmp_path):
    for path in _write_odd_images(tmp_path):
        np.testing.assert_array_equal(standalone["read_rgb"](path), read_image(path), err_msg=path.name)


@pytest.mark.parametrize(("image_size", "resize_size"), [(64, 0), (64, 72), (48, 64), (64, 64)])
def test_documented_geometry_matches_preprocess(standalone, tmp_path, image_size, resize_size):
    for path in _write_odd_images(tmp_path):
        rgb = read_image(path)
        ours = standalone["model_input"](rgb, image_size, resize_size)
        theirs = preprocess(rgb, image_size, resize_size).numpy()
        assert ours.shape == theirs.shape == (3, image_size, image_size), path.name
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=GEOMETRY_ATOL, err_msg=path.name)


def test_documented_onnx_run_gives_the_torch_models_answers(standalone, tiny_dataset, tmp_path):
    model, _ = _fit("patchcore", tiny_dataset, resize_size=72)  # the crop path
    paths = _write_odd_images(tmp_path)
    images = torch.stack([preprocess(read_image(p), 64, 72) for p in paths])
    with torch.inference_mode():
        scores = np.sort(model(images).pred_score.double().numpy())
    model.set_calibration(threshold=float(scores[-5] + scores[-4]) / 2, score_low=float(scores[0]) - 1.0)
    model_path = export_model(model, tmp_path / "model.onnx", "onnx")
    namespace = {**standalone, "model_path": model_path, "paths": paths}
    exec(_doc_block("onnxruntime"), namespace)  # noqa: S102
    expected = TorchInferencer(model).run(images)
    outputs = namespace["outputs"]
    assert list(outputs) == ["anomaly_map", "pred_score", "norm_map", "norm_score"]
    spread = float(np.ptp(expected["anomaly_map"]))
    for name in ("anomaly_map", "pred_score"):
        np.testing.assert_allclose(outputs[name], expected[name], rtol=0, atol=1e-3 * spread)
    np.testing.assert_allclose(outputs["norm_score"], expected["norm_score"], rtol=0, atol=1e-3)
    np.testing.assert_array_equal(namespace["defective"], expected["norm_score"] > 0.5)
    assert namespace["defective"].sum() == 4  # the threshold sits between the 4th and 5th highest score
