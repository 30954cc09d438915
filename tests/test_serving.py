"""The Python API as a service uses it: in-memory images, input checks on every path, threads, global state."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flawscope
from flawscope.data import find_images
from flawscope.errors import DataError, ModelFormatError
from flawscope.export import TorchInferencer, export_model

OPTIONS = {
    "backbone": "efficientnet_lite0",
    "image_size": 64,
    "resize_size": 0,
    "coreset_ratio": 0.5,
    "target_embed_dim": 64,
    "pretrain_embed_dim": 64,
}


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def _seed_callers_streams() -> None:
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory) -> Path:
    return flawscope.fit(
        "patchcore", tiny_dataset, tmp_path_factory.mktemp("serving") / "run", options=OPTIONS, quiet=True
    )


@pytest.fixture(scope="module")
def batch(tiny_dataset) -> torch.Tensor:
    paths = find_images([tiny_dataset / "test"])
    return torch.stack([flawscope.preprocess(flawscope.read_image(p), 64, 0) for p in paths])


def test_fit_and_load_leave_the_callers_random_streams(tiny_dataset, tmp_path, run):
    _seed_callers_streams()
    expected = _draws()
    _seed_callers_streams()
    flawscope.fit("patchcore", tiny_dataset, tmp_path / "again", options=OPTIONS, seed=3, quiet=True)
    assert _draws() == expected
    _seed_callers_streams()
    flawscope.load_model(run)
    flawscope.load_inferencer(run, "cpu")
    assert _draws() == expected


def test_in_memory_sources_decode_like_the_file(tiny_dataset, tmp_path):
    path = find_images([tiny_dataset / "test"])[0]
    pixels = flawscope.read_image(path)
    np.testing.assert_array_equal(flawscope.read_image(path.read_bytes()), pixels)
    with open(path, "rb") as stream:
        np.testing.assert_array_equal(flawscope.read_image(stream), pixels)
    np.testing.assert_array_equal(flawscope.read_image(io.BytesIO(path.read_bytes())), pixels)
    # A PIL image follows flawscope's rules, not Pillow's convert: transparent pixels go to black.
    rgba = Image.fromarray(np.dstack([pixels, np.zeros(pixels.shape[:2], np.uint8)]))
    assert flawscope.read_image(rgba).max() == 0 and np.asarray(rgba.convert("RGB")).max() > 0
    # An OpenCV-style BGR array reversed to RGB is a view with a negative stride; grey arrays become RGB.
    bgr = np.ascontiguousarray(pixels[:, :, ::-1])
    torch.testing.assert_close(flawscope.preprocess(bgr[:, :, ::-1], 32, 0), flawscope.preprocess(pixels, 32, 0))
    grey = pixels[:, :, 0]
    torch.testing.assert_close(flawscope.preprocess(grey, 32, 0), flawscope.preprocess(np.dstack([grey] * 3), 32, 0))
    with pytest.raises(DataError, match="read_image"):
        flawscope.preprocess(Image.fromarray(pixels), 32, 0)
    with pytest.raises(DataError, match="preprocess"):
        flawscope.read_image(pixels)
    with pytest.raises(DataError, match="the image bytes"):
        flawscope.read_image(b"not an image")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x: x * 255, r"values from .* to .*divide by 255"),
        (lambda x: torch.cat([x[:, :, :1] * 0 + 1.02, x[:, :, 1:]], dim=2), r"values from .* to 1.02.*overshoot: clip"),
        (lambda x: (x * 255).round().to(torch.uint8), "dtype torch.uint8.*Divide uint8 images by 255"),
        (lambda x: (x - 0.45) / 0.22, "mean/std-normalised"),
        (lambda x: torch.where(torch.arange(len(x))[:, None, None, None] == 1, float("nan"), x), r"images \[1\].*NaN"),
        (lambda x: x[0], r"\(B, 3, 64, 64\)"),
    ],
)
def test_every_path_refuses_what_is_not_model_input(run, batch, tmp_path_factory, change, message):
    model = flawscope.load_model(run)
    onnx = export_model(model, tmp_path_factory.mktemp("onnx") / "model.onnx", "onnx")
    bad = change(batch[:3].clone())
    for runner in (TorchInferencer(model), flawscope.load_inferencer(onnx, "cpu")):
        with pytest.raises(DataError, match=message):
            runner.predict(bad)
    with pytest.raises(DataError, match=message):
        model.check_input(bad)  # for direct model(images) calls; forward itself never branches on values


def test_inferencers_take_any_strides_and_byte_order(run, batch):
    inferencer = flawscope.load_inferencer(run, "cpu")
    expected = inferencer.run(batch)["norm_score"]
    reversed_channels = np.ascontiguousarray(batch.numpy()[:, ::-1])[:, ::-1]  # a negatively strided view
    np.testing.assert_array_equal(inferencer.run(reversed_channels)["norm_score"], expected)
    np.testing.assert_array_equal(inferencer.run(batch.numpy().astype(">f4"))["norm_score"], expected)


def test_unusable_sources_get_a_data_error(tiny_dataset, tmp_path):
    path = find_images([tiny_dataset / "test"])[0]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="truncated or corrupt"):
        flawscope.read_image(Image.open(truncated))  # a lazy PIL image decodes inside read_image
    with open(path, "rb") as stream:
        pass
    with pytest.raises(DataError, match="closed"):
        flawscope.read_image(stream)
    with open(path, encoding="latin-1") as text, pytest.raises(DataError, match="text mode"):
        flawscope.read_image(text)


def test_the_model_names_a_dtype_it_does_not_hold(run, batch):
    with pytest.raises(DataError, match=r"torch.float32 weights.*torch.float64 images"):
        flawscope.load_model(run).check_input(batch.double())


def test_nan_scores_from_valid_input_are_an_error_not_a_good_image(run, batch, monkeypatch):
    inferencer = flawscope.load_inferencer(run, "cpu")
    real = inferencer._forward

    def broken(images):
        outputs = list(real(images))
        outputs[1] = np.full_like(outputs[1], np.nan)  # pred_score
        return tuple(outputs)

    monkeypatch.setattr(inferencer, "_forward", broken)
    with pytest.raises(ModelFormatError, match=r"NaN or infinite scores, or NaN map pixels, for images \[0, 1\]"):
        inferencer.predict(batch[:2])

    def holed(images):  # finite scores, but a NaN pixel in the second image's map (a float16 0/0)
        outputs = list(real(images))
        outputs[0][1, 0, 3, 4] = np.nan  # anomaly_map
        return tuple(outputs)

    monkeypatch.setattr(inferencer, "_forward", holed)
    with pytest.raises(ModelFormatError, match=r"NaN map pixels, for images \[1\]"):
        inferencer.predict(batch[:2])


@pytest.mark.parametrize("form", ["torch", "onnx"])
def test_two_threads_share_one_inferencer(run, batch, tmp_path, form):
    model_path = run if form == "torch" else export_model(flawscope.load_model(run), tmp_path / "m.onnx", "onnx")
    inferencer = flawscope.load_inferencer(model_path, "cpu")
    order = list(range(len(batch)))
    alone = [float(inferencer.run(batch[i : i + 1])["norm_score"][0]) for i in order]  # batch 1, as the threads

    def score(indices: list[int]) -> dict[int, float]:
        return {i: float(inferencer.run(batch[i : i + 1])["norm_score"][0]) for i in indices for _ in range(3)}

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(score, [order, order[::-1]]))
    for result in results:
        np.testing.assert_allclose([result[i] for i in order], alone, rtol=0, atol=1e-6)


def test_predict_restores_the_callers_thread_count(run, tiny_dataset, tmp_path, monkeypatch):
    import flawscope.prediction

    before = torch.get_num_threads()
    during = []
    load = flawscope.prediction.load_inferencer

    def spy(*args, **kwargs):  # the count while predict runs
        during.append(torch.get_num_threads())
        return load(*args, **kwargs)

    monkeypatch.setattr(flawscope.prediction, "load_inferencer", spy)
    flawscope.predict(run, [tiny_dataset / "test"], tmp_path / "out", overlays=False, quiet=True, threads=before + 1)
    assert during == [before + 1] and torch.get_num_threads() == before


def test_a_service_can_cap_the_pixels_of_an_upload():
    upload = io.BytesIO()
    Image.new("RGB", (300, 200)).save(upload, "PNG")
    assert flawscope.read_image(upload.getvalue(), max_pixels=60_000).shape == (200, 300, 3)
    with pytest.raises(DataError, match=r"has 60,000 pixels, above max_pixels=59,999"):
        flawscope.read_image(upload.getvalue(), max_pixels=59_999)


def test_odd_arrays_get_flawscopes_error_and_the_inferencer_goes_on(run, batch):
    inferencer = flawscope.load_inferencer(run, "cpu")
    reference = inferencer.predict(batch[:1])[0]
    for bad in (np.full(batch[:1].shape, 0.5, dtype=object), np.full(batch[:1].shape, "a")):
        with pytest.raises(DataError, match="expects float images"):
            inferencer.predict(bad)
    with pytest.raises(DataError, match=r"H, W >= 1"):
        flawscope.preprocess(np.zeros((0, 5, 3), np.uint8), 64)
    bf16 = inferencer.predict(batch[:1].to(torch.bfloat16))[0]  # numpy has no bfloat16; it is read as float32
    assert bf16.raw_score == pytest.approx(reference.raw_score, rel=0.05)
    again = inferencer.predict(batch[:1])[0]
    assert again.raw_score == reference.raw_score


def test_a_prediction_owns_its_maps_and_converts_to_json(run, batch):
    first = flawscope.load_inferencer(run, "cpu").predict(batch[:2])[0]
    assert first.anomaly_map.base is None and first.norm_map.base is None  # not views that keep the whole batch
    record = first.to_dict()
    assert json.loads(json.dumps(record)) == record
    assert record["decision"] == first.decision and len(record["regions"]) == len(first.regions)


def test_threads_for_a_torch_model_warn_that_torch_sets_them(run):
    with pytest.warns(UserWarning, match=r"torch's process-wide \d+ threads. Call torch.set_num_threads"):
        flawscope.load_inferencer(run, "cpu", threads=torch.get_num_threads() + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0 and None leave the count alone, and the count in effect is no news
        for threads in (0, None, torch.get_num_threads()):
            flawscope.load_inferencer(run, "cpu", threads=threads)


def test_an_onnx_service_does_not_load_the_training_code(run, batch, tmp_path):
    onnx = export_model(flawscope.load_model(run), tmp_path / "m.onnx", "onnx")
    np.save(tmp_path / "batch.npy", batch[:1].numpy())
    script = (
        "import sys, numpy, flawscope\n"
        "assert not [m for m in sys.modules if m.startswith('flawscope.models.') and m != 'flawscope.models.base']\n"
        f"inferencer = flawscope.load_inferencer({str(onnx)!r}, 'cpu')\n"
        f"inferencer.predict(numpy.load({str(tmp_path / 'batch.npy')!r}))\n"
        "heavy = ('timm', 'torchvision', 'skimage', 'flawscope.models.patchcore')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_python_api_calibrates_and_exports_a_run(run, tmp_path, validation_data):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    validation = validation_data
    result = flawscope.calibrate_run(copy, validation, quiet=True)
    assert result["rule"].startswith("F1-optimal")
    assert float(flawscope.load_model(copy).threshold) == pytest.approx(result["threshold"])
    path, report = flawscope.export_run(copy, threads=1)
    assert path == copy / "export" / "model.onnx" and report["ok"] and report["image_source"] == "held-out"
    exported = flawscope.load_inferencer(path)
    assert exported.metadata["threshold"] == pytest.approx(result["threshold"])
    with pytest.raises(flawscope.errors.ConfigError, match="Unknown export format 'tflite'"):
        flawscope.export_run(copy, export_format="tflite")
