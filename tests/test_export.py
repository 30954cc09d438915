"""Export parity for every registered model, exported-file metadata, fixed batches, float16, defect regions.

Each model gets the contract suite's short fit on the tiny set, a threshold placed between the scores of the
test images (so both decisions occur), and is exported to ONNX and TorchScript. Torch, ONNX Runtime and TorchScript
must agree within 1e-4 on the calibrated maps and scores and on every decision; a model that cannot be exported
fails here.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from test_models_contract import BASE_OPTIONS, QUICK_OPTIONS

from flawscope.data import load_dataset
from flawscope.errors import ModelFormatError, NotFittedError
from flawscope.export import (
    OUTPUT_NAMES,
    OnnxInferencer,
    TorchInferencer,
    TorchScriptInferencer,
    check_parity,
    export_checked,
    export_model,
    find_regions,
    load_inferencer,
    open_exported,
    parity_report,
)
from flawscope.fitting import FitContext
from flawscope.registry import available_methods, get_method

ATOL = 1e-4
# MLFF at 64 px: its scale-8 co-occurrence branch gets 1-pixel regions with no diagonal neighbour pairs (their
# co-occurrence is all zeros, without an empty reshape ONNX could not express); one pass over the training images
# (instead of the contract's 4) keeps the fits short.
EXPORT_OPTIONS = {"mlff": {"repeat_factor": 1}}


def _fit(name: str, tiny_dataset, **changes):
    torch.manual_seed(0)
    method = get_method(name)
    options = {**BASE_OPTIONS, **QUICK_OPTIONS.get(name, {}), **EXPORT_OPTIONS.get(name, {}), **changes}
    config = method.config_class.from_dict(options)
    model = method.model_class(config, pretrained=False)
    split = load_dataset(tiny_dataset)
    method.fit(model, split.train, FitContext(quiet=True))
    return model.eval(), split


def _test_images(split, size: int = 64, count: int = 5) -> torch.Tensor:
    from flawscope.data import make_loader

    batch = next(iter(make_loader(split.test, size, 0, batch_size=count)))
    return batch["image"]


def _calibrate(model, images: torch.Tensor) -> None:
    with torch.inference_mode():
        out = model(images)
    raw = np.sort(out.pred_score.double().numpy())
    spread = float(out.anomaly_map.max() - out.anomaly_map.min())
    # Threshold between the 2nd and 3rd highest score, never on one: both decisions occur, none is a tie. The
    # calibrated scale spans at least the maps' spread: after one training step some models score every image
    # within 1e-4 (PRN: 0.50684-0.50689), and a scale that narrow would blow float32 rounding up past 1e-4.
    threshold = float(raw[-3] + raw[-2]) / 2
    model.set_calibration(threshold=threshold, score_low=threshold - max(threshold - float(raw[0]), spread))


@pytest.fixture(scope="module", params=available_methods())
def exported(request, tiny_dataset, tmp_path_factory):
    model, split = _fit(request.param, tiny_dataset)
    images = _test_images(split, model.config.image_size)
    _calibrate(model, images)
    folder = tmp_path_factory.mktemp(request.param)
    paths = {fmt: export_model(model, folder / f"model.{fmt}", fmt) for fmt in ("onnx", "torchscript")}
    return model, images, paths


def test_exported_files_agree_with_torch(exported):
    model, images, paths = exported
    reference = TorchInferencer(model)
    runners = [OnnxInferencer(paths["onnx"], "cpu"), TorchScriptInferencer(paths["torchscript"], trust_code=True)]
    for batch in (images[:1], images):  # one graph, any batch size
        expected = reference.run(batch)
        decisions = expected["norm_score"] > 0.5
        assert decisions.any() or batch.shape[0] == 1
        for runner in runners:
            got = runner.run(batch)
            assert set(got) == set(OUTPUT_NAMES)
            for name in ("norm_map", "norm_score"):
                assert got[name].shape == expected[name].shape
                np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=ATOL, err_msg=f"{runner} {name}")
            spread = float(np.ptp(expected["anomaly_map"])) or 1.0
            for name in ("anomaly_map", "pred_score"):
                np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=ATOL * spread, err_msg=name)
            np.testing.assert_array_equal(got["norm_score"] > 0.5, decisions)


def _assert_no_fixed_device(path) -> None:
    # A traced tensor factory keeps the tracing device as a constant: a file exported on the CPU would then build
    # that tensor on the CPU when loaded on a GPU and fail at the next operation with a GPU tensor.
    module = torch.jit.load(str(path))
    fixed = [
        line.strip()
        for line in str(module.inlined_graph).splitlines()
        if 'Device = prim::Constant[value="cpu"]' in line
    ]
    assert not fixed, f"{path}: device constants in the traced graph: {fixed[:3]}"


def test_torchscript_graph_follows_the_device_it_is_loaded_on(exported):
    _assert_no_fixed_device(exported[2]["torchscript"])


def test_predictions_are_the_same_objects_from_every_path(exported):
    model, images, paths = exported
    predictions = [
        runner.predict(images)
        for runner in (
            TorchInferencer(model),
            load_inferencer(paths["onnx"], "cpu"),
            load_inferencer(paths["torchscript"], trust_code=True),
        )
    ]
    for other in predictions[1:]:
        for a, b in zip(predictions[0], other, strict=True):
            assert (a.is_defective, a.decision) == (b.is_defective, b.decision)
            assert a.norm_score == pytest.approx(b.norm_score, abs=ATOL)
            np.testing.assert_allclose(a.norm_map, b.norm_map, rtol=0, atol=ATOL)
            if not (np.abs(a.norm_map - 0.5) <= ATOL).any():  # no pixel on the edge: the same regions exactly
                assert [(r.x0, r.y0, r.x1, r.y1, r.area) for r in a.regions] == [
                    (r.x0, r.y0, r.x1, r.y1, r.area) for r in b.regions
                ]
                np.testing.assert_array_equal(a.mask, b.mask)


def test_exported_metadata_says_what_a_deployer_needs(exported):
    model, _, paths = exported
    for fmt, path in paths.items():
        meta = load_inferencer(path, "cpu", trust_code=True).metadata
        assert meta["export_format"] == fmt
        assert meta["method"] == model.method
        size = model.config.image_size
        assert meta["input"]["shape"] == ["B", 3, size, size]
        assert meta["input"]["channel_order"] == "RGB"
        assert meta["input"]["range"] == [0.0, 1.0]
        assert meta["threshold"] == pytest.approx(float(model.threshold))
        assert meta["library_version"] and meta["precision"] == "float32"
        assert meta["config"] == json.loads(json.dumps(model.config.to_dict()))
        assert meta["output_order"] == list(OUTPUT_NAMES)
        assert f"{size}x{size}" in meta["input"]["preprocessing"]
    flat = {p.key: p.value for p in onnx.load(paths["onnx"], load_external_data=False).metadata_props}
    assert (flat["image_size"], flat["resize_size"]) == (str(size), str(model.config.resize_size))


def test_fixed_batch_and_half_precision(tiny_dataset, tmp_path):
    model, split = _fit("simplenet", tiny_dataset)
    images = _test_images(split)
    onnx_path = export_model(model, tmp_path / "b2.onnx", "onnx", batch=2)
    runner = OnnxInferencer(onnx_path, "cpu")
    assert runner.metadata["input"]["shape"][0] == 2
    assert runner.run(images)["norm_score"].shape == (5,)  # padded to 2 + 2 + 2, padding dropped
    check_parity(model, onnx_path, images, trust_code=True)
    for fmt in ("onnx", "torchscript"):
        path = export_model(model, tmp_path / f"half.{fmt}", fmt, half=True)
        report = check_parity(model, path, images, trust_code=True)  # float16 tolerance, documented in docs/deploy.md
        assert report["atol"] > ATOL and report["decisions_equal"]
    # The weights are float16 in the files, not only labelled so (the label sets the tolerance above).
    initializers = onnx.load(tmp_path / "half.onnx").graph.initializer
    weight_bytes = {}
    for tensor in initializers:
        kind = onnx.TensorProto.DataType.Name(tensor.data_type)
        weight_bytes[kind] = weight_bytes.get(kind, 0) + len(tensor.raw_data)
    assert weight_bytes.get("FLOAT16", 0) > weight_bytes.get("FLOAT", 0)
    traced = torch.jit.load(tmp_path / "half.torchscript")  # the test's own file
    dtypes = [t.dtype for t in [*traced.parameters(), *traced.buffers()] if t.is_floating_point() and t.numel() > 1]
    assert dtypes.count(torch.float16) > len(dtypes) / 2


def test_half_precision_mlff_stays_finite_on_flat_images(tiny_dataset, tmp_path):
    # Flat areas give texture regions with no counts; float16 once divided their 0 by 0 there. The parity check
    # scores a black and a white frame besides the given images, so such an export is refused, not shipped.
    model, split = _fit("mlff", tiny_dataset)
    images = _test_images(split)
    _calibrate(model, images)
    path = export_model(model, tmp_path / "half.onnx", "onnx", half=True)
    frames = torch.stack([torch.zeros_like(images[0]), torch.ones_like(images[0]), torch.full_like(images[0], 0.5)])
    assert all(np.isfinite(output).all() for output in OnnxInferencer(path, "cpu").run(frames).values())
    # (this tiny model's float16 maps are off by a few % of their range on the real images, so only the frames'
    # finiteness is asserted here)
    assert parity_report(model, open_exported(path, trust_code=True), images)["frames_finite"]


def test_half_precision_onnx_runs_on_cpu_with_smoothing(tiny_dataset, tmp_path):
    # ONNX Runtime's CPU provider has no float16 ScatterElements 'add'; the smoothing matrix is built in float32.
    model, split = _fit("patchcore", tiny_dataset, image_size=96)
    assert model.blur.radius > 0
    path = export_model(model, tmp_path / "half.onnx", "onnx", half=True)
    report = check_parity(model, path, _test_images(split, 96), trust_code=True)
    assert report["decisions_equal"]


@pytest.mark.parametrize("name", ["patchcore", "simplenet"])
def test_image_context_exports_with_parity(name, tiny_dataset, tmp_path):
    # w = 1 on this random-weight model; the MTD PatchCore with w = 3 exported at 5.8e-6 of its map's range.
    model, split = _fit(name, tiny_dataset, context_weight=1.0)
    images = _test_images(split)
    _calibrate(model, images)
    for fmt in ("onnx", "torchscript"):
        assert check_parity(model, export_model(model, tmp_path / f"context.{fmt}", fmt), images, trust_code=True)["ok"]
    _assert_no_fixed_device(tmp_path / "context.torchscript")


@pytest.mark.parametrize("name", ["simplenet", "cfa", "mlff", "prn"])
def test_position_whitening_exports_with_parity(name, tiny_dataset, tmp_path):
    # The MTD CFA with feature_norm=position exported to ONNX at 6.5e-6 of its map's range.
    from flawscope.layers import PositionWhitening

    model, split = _fit(name, tiny_dataset, feature_norm="position")
    whitenings = [m for m in model.modules() if isinstance(m, PositionWhitening)]
    assert whitenings and all(m.fitted for m in whitenings)
    images = _test_images(split, model.config.image_size)
    _calibrate(model, images)
    for fmt in ("onnx", "torchscript"):
        assert check_parity(model, export_model(model, tmp_path / f"position.{fmt}", fmt), images, trust_code=True)[
            "ok"
        ]
    _assert_no_fixed_device(tmp_path / "position.torchscript")


def test_several_blocks_per_stage_export_with_parity(tiny_dataset, tmp_path):
    # CFA's backbone_blocks: the concatenated block outputs of a stage are traced like any other feature map.
    model, split = _fit("cfa", tiny_dataset, backbone_blocks=(2, 2, 1))
    assert model.backbone.feature_info.channels[:2] == (128, 256)  # resnet18's layer1 and layer2, two blocks each
    images = _test_images(split, model.config.image_size)
    _calibrate(model, images)
    for fmt in ("onnx", "torchscript"):
        assert check_parity(model, export_model(model, tmp_path / f"blocks.{fmt}", fmt), images, trust_code=True)["ok"]


def test_mlff_on_the_stride_4_grid_exports_with_parity(tiny_dataset, tmp_path):
    # texture_stride=4, out_stride=4: stage 2 upsampled for the texture branch, psi on stage 1's grid.
    model, split = _fit("mlff", tiny_dataset, texture_stride=4, out_stride=4)
    images = _test_images(split, model.config.image_size)
    with torch.no_grad():
        assert model.features(images[:1]).shape[-1] == model.config.image_size // 4
    _calibrate(model, images)
    for fmt in ("onnx", "torchscript"):
        assert check_parity(model, export_model(model, tmp_path / f"stride4.{fmt}", fmt), images, trust_code=True)["ok"]


def test_tight_calibration_scales_the_calibrated_tolerance(tiny_dataset, tmp_path):
    # A threshold just above the typical normal score (as `calibrate` on a few images can give) multiplies float
    # rounding on the calibrated scale by 0.5 / (threshold - score_low); the check carries atol through that slope.
    model, split = _fit("simplenet", tiny_dataset)
    images = _test_images(split)
    _calibrate(model, images)
    with torch.inference_mode():
        spread = float(np.ptp(model(images).anomaly_map.numpy()))
    model.set_calibration(float(model.threshold), float(model.threshold) - spread * 1e-3)
    path, report = export_checked(model, tmp_path / "tight.onnx", "onnx", images=images)
    assert path.is_file() and report["ok"] and report["max_rel_raw"] <= ATOL
    gap = float(model.threshold - model.score_low)
    assert report["norm_atol"] == pytest.approx(ATOL * 0.5 * spread / gap, rel=1e-4) and report["norm_atol"] > ATOL


def test_a_file_that_fails_the_check_is_not_left_in_place(tiny_dataset, tmp_path, monkeypatch):
    import flawscope.export.parity as parity

    model, split = _fit("patchcore", tiny_dataset)
    path = tmp_path / "model.onnx"
    export_checked(model, path, "onnx", check=False)  # an older export, which the failed one must not replace
    older = path.read_bytes()

    def disagree(*args, **kwargs):
        return {
            "ok": False,
            "max_abs_norm": 0.1,
            "norm_atol": 1e-4,
            "max_rel_raw": 0.1,
            "atol": 1e-4,
            "decisions_equal": False,
            "frames_finite": True,
        }

    monkeypatch.setattr(parity, "parity_report", disagree)
    with pytest.raises(ModelFormatError, match=f"exported {path} \\(not written\\) does not reproduce"):
        export_checked(model, path, "onnx")
    assert path.read_bytes() == older and sorted(tmp_path.iterdir()) == [path]  # no partial file


def test_unfitted_model_is_not_exported(tmp_path):
    method = get_method("patchcore")
    model = method.model_class(method.config_class.from_dict({**BASE_OPTIONS, **QUICK_OPTIONS["patchcore"]}), False)
    with pytest.raises(NotFittedError):
        export_model(model, tmp_path / "m.onnx")


def test_unknown_files_are_refused_with_a_message(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ModelFormatError, match="Cannot tell what"):
        load_inferencer(tmp_path / "weights.bin")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFormatError):
        load_inferencer(tmp_path / "broken.onnx", "cpu")


@pytest.mark.parametrize(
    "change",
    [
        {"input": {"image_size": 200_000, "resize_size": 0}},  # would allocate 480 GB per image
        {"input": {"image_size": "64", "resize_size": 0}},
        {"batch": 0},
        {"input": None},
    ],
)
def test_crafted_export_metadata_is_refused(exported, tmp_path, change):
    import onnx

    _, _, paths = exported
    proto = onnx.load(str(paths["onnx"]), load_external_data=False)
    prop = next(p for p in proto.metadata_props if p.key == "flawscope")
    prop.value = json.dumps({**json.loads(prop.value), **change})
    onnx.save(proto, str(tmp_path / "crafted.onnx"))
    with pytest.raises(ModelFormatError, match="without a usable input size or batch"):
        load_inferencer(tmp_path / "crafted.onnx", "cpu")
    prop.value = "[" * 100_000
    onnx.save(proto, str(tmp_path / "crafted.onnx"))
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_inferencer(tmp_path / "crafted.onnx", "cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 99}, r"has export format 99; this flawscope .* reads format 1\. Upgrade"),
        ({"format_version": "1"}, r"has export format '1'"),
        ({"input": {"image_size": 32, "resize_size": 0}}, r"graph takes inputs of shape .* says 32 x 32 images"),
    ],
)
def test_export_metadata_of_a_newer_format_or_another_input_size_is_refused(exported, tmp_path, change, message):
    import onnx

    _, _, paths = exported
    proto = onnx.load(str(paths["onnx"]), load_external_data=False)
    prop = next(p for p in proto.metadata_props if p.key == "flawscope")
    prop.value = json.dumps({**json.loads(prop.value), **change})
    onnx.save(proto, str(tmp_path / "edited.onnx"))
    with pytest.raises(ModelFormatError, match=message):
        load_inferencer(tmp_path / "edited.onnx", "cpu")


def test_regions_are_connected_components_with_box_area_and_peak():
    norm = np.zeros((10, 12), np.float32)
    norm[1:4, 2:5] = 0.7  # 3x3 square
    norm[2, 3] = 0.9
    norm[6, 6] = norm[7, 7] = 0.8  # diagonal pair: one 8-connected region of 2 pixels
    norm[9, 11] = 0.6  # a single pixel in the corner
    norm[5, 0] = 0.5  # at the threshold: not defective
    regions, mask = find_regions(norm, norm * 10)
    assert [(r.x0, r.y0, r.x1, r.y1, r.area) for r in regions] == [(2, 1, 5, 4, 9), (6, 6, 8, 8, 2), (11, 9, 12, 10, 1)]
    assert regions[0].peak_score == pytest.approx(0.9) and regions[0].peak_raw == pytest.approx(9.0)
    assert mask.sum() == 12 and not mask[5, 0]
    kept, kept_mask = find_regions(norm, min_area=2)
    assert [r.area for r in kept] == [9, 2] and kept_mask.sum() == 11 and not kept_mask[9, 11]
    none, empty = find_regions(np.zeros((4, 4), np.float32))
    assert none == [] and empty.shape == (4, 4) and not empty.any()


def test_prediction_peak_is_the_highest_raw_map_pixel_also_without_regions_or_when_clipped():
    from flawscope.export import Prediction

    raw = np.full((6, 8), 10.0, np.float32)
    raw[4, 5] = 14.0  # below the threshold (20): no region, although the image score says defective
    raw[1, 7] = 13.0
    raw[0, 0] = np.nan  # passed over
    norm = np.clip((raw - 10.0) / 20.0, 0, 1)
    regions, mask = find_regions(norm, raw)
    prediction = Prediction(25.0, 0.625, True, raw, norm, regions, mask)
    assert prediction.decision == "defective" and prediction.regions == []
    assert prediction.peak == (5, 4, pytest.approx(0.2))
    # A saturated map ties at 1.0 in the calibrated values; the raw map still has one highest pixel.
    raw[2, 2], raw[3, 6] = 40.0, 45.0
    norm = np.clip((raw - 10.0) / 20.0, 0, 1)
    regions, mask = find_regions(norm, raw)
    assert Prediction(45.0, 1.0, True, raw, norm, regions, mask).peak == (6, 3, 1.0)
    # Below the typical normal score the calibrated map is all 0; the location still comes from the raw map.
    low = np.full((6, 8), 1.0, np.float32)
    low[5, 1] = 2.0
    nothing = Prediction(2.0, 0.0, False, low, np.zeros_like(low), [], np.zeros(low.shape, bool))
    assert nothing.peak == (1, 5, 0.0)


def test_inferencers_name_a_wrong_shape_or_an_empty_batch(exported):
    from flawscope.errors import DataError

    model, images, paths = exported
    size = model.config.image_size
    exported_runners = [
        OnnxInferencer(paths["onnx"], "cpu"),
        TorchScriptInferencer(paths["torchscript"], trust_code=True),
    ]
    for runner in [TorchInferencer(model), *exported_runners]:
        with pytest.raises(DataError, match=rf"\(B, 3, {size}, {size}\).*preprocess"):
            runner.run(images[:, :, :-1])
        with pytest.raises(DataError, match="no images.*find_images"):
            runner.predict(np.zeros((0, 3, size, size), np.float32))
