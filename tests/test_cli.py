"""End-to-end tests of the `flawscope` command: fit -> test -> predict -> reload, and its bad-input messages.

One PatchCore run (EfficientNet-Lite0, 64 px, small embeddings) is fitted per module and reused; every error case
fails before any training starts, so they cost little.
"""

from __future__ import annotations

import base64
import csv
import errno
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from flawscope import __version__
from flawscope.api import score_images
from flawscope.calibration import threshold_from_normals
from flawscope.cli import main
from flawscope.data import Sample, load_dataset, preprocess, read_image
from flawscope.errors import DataError
from flawscope.export import load_inferencer
from flawscope.fitting import FitContext
from flawscope.model_io import load_model, save_model
from flawscope.report import heatmap_overlay

FAST = [
    "--backbone",
    "efficientnet_lite0",
    "--image-size",
    "64",
    "--resize-size",
    "0",
    "--set",
    "coreset_ratio=0.5",
    "--set",
    "target_embed_dim=64",
    "--set",
    "pretrain_embed_dim=64",
    "--quiet",
    # 3 held-out good images, so the normalised score is not squeezed to 0 or 1 by a one-image calibration
    "--val-ratio",
    "0.25",
]
METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def fit_args(data: Path, out: Path, *extra: str) -> list[str | Path]:
    return ["fit", "--model", "patchcore", *FAST, "--data", data, "--out", out, *extra]


def assert_clean_error(result: Result, *fragments: str) -> str:
    """Exit code != 0, no traceback, one line on stderr naming each fragment; returns that line."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` (folders too) with its size and mtime, to prove nothing was written there."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def read_csv(path: Path, errors: str = "strict") -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors=errors) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data_snapshot(tiny_dataset) -> dict[str, tuple[int, int]]:
    return snapshot(tiny_dataset)


@pytest.fixture(scope="module")
def run(tiny_dataset, data_snapshot, tmp_path_factory) -> Path:
    """A fitted and tested run folder (report included)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = invoke(*fit_args(tiny_dataset, out))
    assert result.exit_code == 0, result.output
    assert str(out / "model") in result.stdout
    result = invoke("test", out, "--data", tiny_dataset, "--quiet")
    assert result.exit_code == 0, result.output
    assert "image_auroc" in result.stdout and "report.html" in result.stdout
    return out


@pytest.fixture(scope="module")
def images(tiny_dataset, tmp_path_factory) -> Path:
    """A folder of three readable test images (one good, two defective)."""
    folder = tmp_path_factory.mktemp("images")
    for name in ("good/000.png", "scratch/000.png", "stain/001.png"):
        shutil.copy(tiny_dataset / "test" / name, folder / name.replace("/", "_"))
    return folder


# ---------------------------------------------------------------------------------------------------- the happy path


def test_fit_writes_the_run_folder(run):
    info = json.loads((run / "model" / "model.json").read_text())
    assert info["format"] == 1 and info["method"] == "patchcore" and info["library_version"] == __version__
    assert info["config"]["backbone"] == "efficientnet_lite0"
    assert info["config"]["image_size"] == 64 and info["config"]["resize_size"] == 0
    assert info["config"]["coreset_ratio"] == 0.5 and info["config"]["target_embed_dim"] == 64
    assert info["input"]["shape"] == ["B", 3, 64, 64]
    assert info["calibration"]["threshold"] > info["calibration"]["score_low"]
    assert len(info["weights_sha256"]) == 64
    assert (run / "model" / "weights.safetensors").stat().st_size > 0

    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "patchcore" and config["seed"] == 0
    assert config["options"] == info["config"]
    assert (config["num_train"], config["num_val"]) == (9, 3) and config["val_ratio"] == 0.25

    env = json.loads((run / "environment.json").read_text())
    assert env["seed"] == 0 and env["flawscope"] == __version__ and env["torch"] == torch.__version__
    assert env["python"] == sys.version.split()[0]
    assert env["device"] == "cpu"


def test_test_writes_metrics(run):
    metrics = json.loads((run / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, key
    # The defects of the demo set are plain to see; a working pipeline ranks most of them above the good images.
    assert metrics["image_auroc"] >= 0.6 and metrics["pixel_auroc"] >= 0.7
    assert (metrics["num_images"], metrics["num_good"], metrics["num_defective"]) == (10, 4, 6)
    assert metrics["method"] == "patchcore"
    assert (metrics["category"], metrics["layout"], metrics["seed"]) == ("grass", "mvtec", 0)
    assert json.loads((run / "config.json").read_text())["category"] == "grass"  # chosen by the layout, recorded
    for key in ("inference_seconds", "images_per_second", "metrics_seconds"):
        assert metrics[key] >= 0
    assert set(metrics["per_type"]) == {"scratch", "blob", "stain"}
    assert all(row["count"] == 2 for row in metrics["per_type"].values())
    assert all(0 <= row["pixel_auroc"] <= 1 and 0 <= row["pixel_aupro"] <= 1 for row in metrics["per_type"].values())
    assert metrics["unmarked_defective"] == [] and metrics["nearly_full_masks"] == []


def _as_mvtec_loco(root: Path) -> None:
    """MVTec LOCO's masks: a folder per defective image, here each mask cut into two defects' files."""
    for mask_file in sorted((root / "ground_truth").glob("*/*_mask.png")):
        mask = np.asarray(Image.open(mask_file))
        left, right = mask.copy(), mask.copy()
        left[:, mask.shape[1] // 2 :], right[:, : mask.shape[1] // 2] = 0, 0
        folder = mask_file.parent / mask_file.name.removesuffix("_mask.png")
        folder.mkdir()
        Image.fromarray(left).save(folder / "000.png")
        Image.fromarray(right).save(folder / "001.png")
        mask_file.unlink()


def _as_mvtec_ad_2(root: Path) -> None:
    """MVTec AD 2's test split: test_public/ with its ground_truth/ inside it."""
    (root / "test").rename(root / "test_public")
    (root / "ground_truth").rename(root / "test_public" / "ground_truth")


@pytest.mark.parametrize("relayout", [_as_mvtec_loco, _as_mvtec_ad_2])
def test_the_test_set_laid_out_as_loco_or_mvtec_ad_2_gives_the_same_metrics(run, tiny_dataset, tmp_path, relayout):
    copy = tmp_path / "grass"
    shutil.copytree(tiny_dataset, copy)
    relayout(copy)
    result = invoke("test", run, "--data", copy, "--out", tmp_path / "out", "--quiet", "--no-report")
    assert result.exit_code == 0, result.output
    other = json.loads((tmp_path / "out" / "metrics.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert {key: other[key] for key in METRIC_KEYS} == {key: metrics[key] for key in METRIC_KEYS}


def test_test_warns_about_defective_images_with_an_empty_mask(run, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    mask_path = sorted((data / "ground_truth" / "scratch").glob("*.png"))[0]
    Image.fromarray(np.zeros_like(np.asarray(Image.open(mask_path)))).save(mask_path)
    image = data / "test" / "scratch" / mask_path.name.replace("_mask", "")
    with pytest.warns(UserWarning, match="1 defective test image.*no defect pixel"):
        result = invoke("test", run, "--data", data, "--out", tmp_path / "eval", "--no-report", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["unmarked_defective"] == [str(image)]


def test_test_warns_about_a_mask_that_marks_nearly_the_whole_image(run, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    mask_path = sorted((data / "ground_truth" / "blob").glob("*.png"))[0]
    Image.fromarray(255 - np.asarray(Image.open(mask_path).convert("L"))).save(mask_path)  # inverted
    image = data / "test" / "blob" / mask_path.name.replace("_mask", "")
    with pytest.warns(UserWarning, match="1 defective test image.*more than 95 %.*inverted"):
        result = invoke("test", run, "--data", data, "--out", tmp_path / "eval", "--no-report", "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["nearly_full_masks"] == [str(image)] and metrics["unmarked_defective"] == []


def test_test_finds_the_runs_category_and_warns_about_another_or_a_replaced_result(
    whole_run_copy, tiny_dataset, tmp_path
):
    root = tmp_path / "categories"
    for name in ("brick", "grass"):
        shutil.copytree(tiny_dataset, root / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run's own category (grass) without --category, and no other warning
        result = invoke("test", whole_run_copy, "--data", root, "--out", tmp_path / "eval", "--quiet", "--no-report")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["category"] == "grass"
    with (
        pytest.warns(
            UserWarning, match="trained on the category 'grass' and is evaluated on 'brick'.*pass --category grass"
        ),
        pytest.warns(UserWarning, match=r"holds the results on .*grass.* Give each test its own --out"),
    ):
        result = invoke(
            "test",
            whole_run_copy,
            "--data",
            root,
            "--category",
            "brick",
            "--out",
            tmp_path / "eval",
            "--quiet",
            "--no-report",
        )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["category"] == "brick"
    heldout = tmp_path / "heldout"  # a test-only folder, or one category folder of another name: no warning
    for part in ("test", "ground_truth"):
        shutil.copytree(tiny_dataset / part, heldout / part)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for run, data in (
            (whole_run_copy / "model", root),
            (whole_run_copy, heldout),
            (whole_run_copy, root / "brick"),
        ):
            result = invoke(
                "test", run, "--data", data, "--out", tmp_path / f"eval-{data.name}", "--quiet", "--no-report"
            )
            assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval-categories" / "metrics.json").read_text())["seed"] == 0


def test_test_warns_about_another_models_results_and_a_report_it_does_not_replace(
    whole_run_copy, tiny_dataset, tmp_path, validation_data
):
    # The copied run's own metrics.json (the same weights) is replaced without a warning ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert invoke("test", whole_run_copy, "--data", tiny_dataset, "--quiet").exit_code == 0
    metrics_path = whole_run_copy / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    info = json.loads((whole_run_copy / "model" / "model.json").read_text())
    assert metrics["model_id"] == info["model_id"] == info["weights_sha256"]  # as fitted
    # A recalibrated run is the same model, although the threshold in its weights changed.
    validation = validation_data
    with pytest.warns(UserWarning, match="previous threshold"):
        assert invoke("calibrate", whole_run_copy, "--data", validation, "--quiet").exit_code == 0
    recalibrated = json.loads((whole_run_copy / "model" / "model.json").read_text())
    assert recalibrated["model_id"] == info["model_id"] != recalibrated["weights_sha256"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert invoke("test", whole_run_copy, "--data", tiny_dataset, "--quiet").exit_code == 0
    # ... one of another model is named, and so is the report.html that --no-report leaves.
    metrics_path.write_text(json.dumps({**metrics, "model_id": "0123456789abcdef", "method": "cfa"}))
    with (
        pytest.warns(UserWarning, match=r"holds the results of another model \(cfa, model_id 0123456789ab\)"),
        pytest.warns(UserWarning, match=r"report\.html stays from an earlier test .*--no-report"),
    ):
        result = invoke("test", whole_run_copy, "--data", tiny_dataset, "--quiet", "--no-report")
    assert result.exit_code == 0, result.output


def test_test_without_masks_gives_the_image_metrics(run, tiny_dataset, tmp_path):
    data = tmp_path / "labels-only"
    shutil.copytree(tiny_dataset / "test", data / "test")  # no ground_truth/ folder: OK/NOK labels only
    with pytest.warns(UserWarning, match=r"6 defective test image\(s\) have no mask .*no ground_truth/ folder"):
        result = invoke("test", run, "--data", data, "--out", tmp_path / "eval", "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    reference = json.loads((run / "metrics.json").read_text())
    assert metrics["image_auroc"] == reference["image_auroc"] and metrics["pixel_auroc"] is None
    assert len(metrics["defective_without_mask"]) == 6 and metrics["unmarked_defective"] == []
    assert all("pixel_auroc" not in row for row in metrics["per_type"].values())
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "needs masks" in html and "<dt>masks</dt><dd>none (no ground_<wbr>truth/<wbr> folder)" in html


def test_report_counts_the_decisions_and_shows_each_image_once(run):
    metrics = json.loads((run / "metrics.json").read_text())
    rows = read_csv(run / "per_image.csv")
    flagged = sum(r["decision"] == "defective" and r["label"] == "0" for r in rows)
    missed = sum(r["decision"] == "good" and r["label"] == "1" for r in rows)
    assert (metrics["num_false_alarms"], metrics["num_missed"]) == (flagged, missed)
    assert metrics["threshold_calibrated"] is True and metrics["threshold_rule"].startswith("threshold ")
    html = (run / "report.html").read_text()
    assert f"{flagged} of 4 good images flagged, {missed} of 6 defective missed" in html
    assert html.count("<figure><img") == 4 + 6  # 6 defective: all among the highest, so no "lowest" list repeats them


def test_test_and_predict_write_file_names_that_are_not_utf8(run, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    os.rename(bytes(data / "test" / "good" / "000.png"), bytes(data / "test" / "good") + b"/caf\xe9.png")
    result = invoke("test", run, "--data", data, "--out", tmp_path / "eval", "--quiet")
    assert result.exit_code == 0, result.output
    names = [Path(r["path"]).name for r in read_csv(tmp_path / "eval" / "per_image.csv", errors="surrogateescape")]
    assert os.fsencode(next(n for n in names if n.startswith("caf"))) == b"caf\xe9.png"
    assert (tmp_path / "eval" / "report.html").read_bytes().decode("utf-8")  # valid UTF-8 ("?" for the byte)


def test_per_image_csv(run, tiny_dataset):
    rows = read_csv(run / "per_image.csv")
    assert list(rows[0]) == ["path", "defect_type", "label", "raw_score", "norm_score", "decision"]
    expected = {str(p.relative_to(tiny_dataset)) for p in (tiny_dataset / "test").rglob("*.png")}
    assert sorted(str(Path(r["path"]).relative_to(tiny_dataset)) for r in rows) == sorted(expected)
    threshold = json.loads((run / "metrics.json").read_text())["threshold"]
    for row in rows:
        defect_type = Path(row["path"]).parent.name
        assert row["defect_type"] == defect_type
        assert row["label"] == ("0" if defect_type == "good" else "1")
        norm = float(row["norm_score"])
        assert 0.0 <= norm <= 1.0
        assert row["decision"] == ("defective" if norm > 0.5 else "good"), row
        assert row["decision"] == ("defective" if float(row["raw_score"]) > threshold else "good"), row
    # Not a degenerate calibration: both decisions occur and the normalised scale is not all 0s and 1s.
    assert {row["decision"] for row in rows} == {"good", "defective"}
    assert any(0.0 < float(row["norm_score"]) < 1.0 for row in rows)


def test_report_is_self_contained(run):
    html = (run / "report.html").read_text()
    assert "<svg" in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html
    assert "patchcore" in html
    captions = re.findall(r"score (\d\.\d{3}) → (defective|good)", html)
    assert captions  # a rounded 0.500 can go either way; every other caption's decision follows from its score
    assert all(
        decision == ("defective" if float(score) > 0.5 else "good") for score, decision in captions if score != "0.500"
    )
    # The gallery shows maps drawn on the images, not the plain inputs.
    gallery = [read_image(base64.b64decode(data)) for data in re.findall(r"data:image/png;base64,([^\"']+)", html)]
    inputs = [preprocess(read_image(r["path"]), 64, 0) for r in read_csv(run / "per_image.csv")]
    plain = [(image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for image in inputs]
    assert gallery and not any(np.array_equal(g, p) for g in gallery for p in plain if g.shape == p.shape)
    curves = json.loads((run / "curves.json").read_text())
    assert set(curves) == {"ROC (image)", "PR (image)", "PRO (pixel)"}
    assert all(len(c["x"]) == len(c["y"]) > 1 for c in curves.values()) and curves["PRO (pixel)"]["x"][-1] <= 0.3


def test_predict_writes_csv_and_overlays(run, images, tmp_path):
    before = snapshot(images)
    out = tmp_path / "pred"
    result = invoke("predict", run, images, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "predictions.csv")
    assert list(rows[0])[:4] == ["path", "raw_score", "norm_score", "decision"]
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in images.iterdir())
    for row in rows:
        assert row["decision"] == ("defective" if float(row["norm_score"]) > 0.5 else "good")
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 3
    assert read_image(overlays[0]).shape[:2] == (64, 64)
    # Each overlay is the input with the model's calibrated map and mask drawn on it.
    inferencer = load_inferencer(run, "cpu")
    for line in map(json.loads, (out / "predictions.jsonl").read_text().splitlines()):
        image = preprocess(read_image(line["path"]), 64, 0)
        (prediction,) = inferencer.predict(image[None])
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        expected = heatmap_overlay(pixels, prediction.norm_map, prediction.mask)
        np.testing.assert_array_equal(read_image(out / line["overlay"]), expected)
        assert not np.array_equal(expected, pixels)
    assert not (out / "skipped.csv").exists()
    assert snapshot(images) == before

    # The same image scores the same in `test` and in `predict`.
    per_image = {Path(r["path"]).parent.name + "_" + Path(r["path"]).name: r for r in read_csv(run / "per_image.csv")}
    for row in rows:
        assert float(row["raw_score"]) == pytest.approx(float(per_image[Path(row["path"]).name]["raw_score"]), rel=1e-5)


def test_model_json_names_the_pretrained_weights_by_content(run):
    from flawscope.runs import file_sha256

    (weights,) = json.loads((run / "model" / "model.json").read_text())["pretrained_weights"]
    assert weights["name"] == "efficientnet_lite0" and Path(weights["file"]).is_file()
    assert weights["sha256"] == file_sha256(weights["file"])


def test_reloaded_model_reproduces_per_image_scores(run):
    model = load_model(run / "model")
    model.check_fitted()
    rows = read_csv(run / "per_image.csv")[::3]  # a few images, good and defective
    batch = torch.stack([preprocess(read_image(r["path"]), 64, 0) for r in rows])
    with torch.inference_mode():
        scores = model(batch).pred_score.double().numpy()
    expected = np.array([float(r["raw_score"]) for r in rows])
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_nothing_is_written_into_the_data_folder(run, tiny_dataset, data_snapshot, images, tmp_path):
    # `run` has fitted and tested; predict on the data folder's own test images too.
    result = invoke("predict", run, tiny_dataset / "test" / "good", "--out", tmp_path / "pred", "--quiet")
    assert result.exit_code == 0, result.output
    assert snapshot(tiny_dataset) == data_snapshot


def test_fit_refuses_out_inside_the_data_folder(tiny_dataset, data_snapshot):
    result = invoke(*fit_args(tiny_dataset, tiny_dataset / "runs" / "x"))
    assert_clean_error(result, "inside the data folder", "--out")
    assert snapshot(tiny_dataset) == data_snapshot


def test_test_refuses_out_inside_the_data_folder(run, tiny_dataset, data_snapshot):
    result = invoke("test", run, "--data", tiny_dataset, "--out", tiny_dataset / "eval", "--quiet")
    assert_clean_error(result, "inside the data folder", "--out")
    assert snapshot(tiny_dataset) == data_snapshot


def test_predict_refuses_out_inside_the_image_folder(run, images):
    before = snapshot(images)
    result = invoke("predict", run, images, "--out", images / "pred", "--quiet")
    assert_clean_error(result, "inside the data folder", "--out")
    assert snapshot(images) == before


def test_predict_writes_next_to_files_given_by_name(run, images, tmp_path):
    # The folder of a file given by name (often the working folder) is not a data folder: --out may sit beside it.
    work = tmp_path / "work"
    shutil.copytree(images, work)
    one = sorted(work.glob("*.png"))[0]
    result = invoke("predict", run, one, "--out", work / "pred", "--quiet")
    assert result.exit_code == 0, result.output
    assert len(read_csv(work / "pred" / "predictions.csv")) == 1


def test_synth_and_bench_refuse_out_inside_the_data_folder(tiny_dataset, data_snapshot):
    result = invoke("synth", "--data", tiny_dataset, "--out", tiny_dataset / "synth", "--image-size", "64")
    assert_clean_error(result, "inside the data folder", "--out")
    result = invoke("bench", "--data", tiny_dataset, "--models", "patchcore", "--out", tiny_dataset / "bench")
    assert_clean_error(result, "inside the data folder", "--out")
    assert snapshot(tiny_dataset) == data_snapshot


def test_out_that_is_an_existing_file_is_refused_before_any_work(run, tiny_dataset, images, tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    for args in (
        fit_args(tiny_dataset, a_file),
        ["test", run, "--data", tiny_dataset, "--out", a_file, "--quiet"],
        ["predict", run, images, "--out", a_file, "--quiet"],
    ):
        assert_clean_error(invoke(*args), "is an existing file", str(a_file))
    assert a_file.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--format", "onnx", "--out", "model.txt"], "an ONNX export must end in .onnx"),
        (["--format", "torchscript", "--out", "model.onnx"], "a TorchScript one in .pt, .ts, .torchscript"),
        (["--format", "torchscript", "--out", "model.bin"], "a TorchScript one in .pt"),  # predict could not read it
        (["--out", "."], "is a folder"),
    ],
    ids=["onnx-suffix", "torchscript-suffix", "torchscript-unknown-suffix", "folder"],
)
def test_export_checks_its_out_path_before_exporting(run, tmp_path, args, fragment):
    args = [str(tmp_path / a) if a in ("model.txt", "model.onnx", ".") else a for a in args]
    assert_clean_error(invoke("export", run, *args), fragment)
    assert not list(tmp_path.glob("model.*"))


@pytest.mark.parametrize("command", ["fit", "test", "export", "calibrate", "distill", "demo", "predict", "bench"])
def test_every_computing_command_takes_threads(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "--threads" in result.output, result.output


def test_export_threads_reach_the_parity_check(run, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: calls[-1] if calls else 2)
    import onnxruntime

    session_threads = []
    session = onnxruntime.InferenceSession

    def spy(path, options, **kwargs):
        session_threads.append(options.intra_op_num_threads)
        return session(path, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    result = invoke("export", run, "--out", tmp_path / "m.onnx", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert calls and set(calls) == {1} and "parity with torch" in result.output  # set (and restored) to 1 only
    assert session_threads == [1]  # ONNX Runtime's session of the parity check too


@pytest.mark.parametrize(
    "args",
    [
        ["test", "RUN", "--data", "DATA", "--batch-size", "0"],
        ["predict", "RUN", "IMAGES", "--out", "OUT", "--batch-size", "-1"],
        ["predict", "RUN", "IMAGES", "--out", "OUT", "--threads", "-1"],
        ["predict", "RUN", "IMAGES", "--out", "OUT", "--min-area", "-5"],
        ["bench", "--data", "DATA", "--models", "patchcore", "--out", "OUT", "--repeats", "0"],
    ],
    ids=["test-batch", "predict-batch", "threads", "min-area", "repeats"],
)
def test_counts_out_of_range_are_usage_errors(run, tiny_dataset, images, tmp_path, args):
    names = {"RUN": run, "DATA": tiny_dataset, "IMAGES": images, "OUT": tmp_path / "out"}
    result = invoke(*[names.get(a, a) for a in args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Invalid value for" in result.output and not (tmp_path / "out").exists()


def test_a_size_given_twice_with_two_values_is_refused(tiny_dataset, tmp_path):
    args = fit_args(tiny_dataset, tmp_path / "run", "--set", "image_size=128")
    assert_clean_error(invoke(*args), "--image-size 64 and --set image_size=128 disagree")
    assert not (tmp_path / "run").exists()
    result = invoke(*fit_args(tiny_dataset, tmp_path / "run", "--set", "image_size=064"))  # the same value
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to"),
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
)
def test_running_out_of_memory_names_what_uses_less(tiny_dataset, tmp_path, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("flawscope.api.fit", fail)
    line = assert_clean_error(invoke(*fit_args(tiny_dataset, tmp_path / "run")), "out of memory in `flawscope fit`")
    assert "--set max_train_features=N" in line and "--batch-size" in line
    monkeypatch.setattr("flawscope.api.fit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    assert isinstance(invoke(*fit_args(tiny_dataset, tmp_path / "run")).exception, RuntimeError)  # others stay raw


def test_other_bad_options_are_named(run, tiny_dataset, tmp_path):
    for option, value in (("--image-size", "0"), ("--image-size", "4"), ("--seed", "-1")):  # as models take 32 up
        result = invoke("synth", "--data", tiny_dataset, "--out", tmp_path / "s", option, value)
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
    result = invoke("test", run, "--data", tiny_dataset, "--out", tmp_path / "t", "--exclude-seen-of", tmp_path / "no")
    assert_clean_error(result, "--exclude-seen-of", "is not a run folder")
    for option in ("--lr", "--weight-decay"):
        args = ["distill", "--backbone", "efficientnet_lite0", "--images", tiny_dataset / "train" / "good"]
        result = invoke(*args, "--out", tmp_path / "t.safetensors", "--steps", "1", option, "nan")
        assert_clean_error(result, "finite number", "nan")
    assert not any(tmp_path.iterdir())


def test_fit_sets_the_threshold_at_the_target_fpr(run, tiny_dataset, tmp_path):
    # The run fixture holds out 3 good images at the default FPR 0.01 (none above); at 0.5, one of the 3 is above.
    out = tmp_path / "fpr"
    assert invoke(*fit_args(tiny_dataset, out, "--target-fpr", "0.5")).exit_code == 0
    for folder, fpr, above in ((run, 0.01, 0), (out, 0.5, 1)):
        held_out = [Sample(Path(p)) for p in json.loads((folder / "config.json").read_text())["val_images"]]
        model = load_model(folder / "model")
        scores = score_images(model, held_out, FitContext(device=torch.device("cpu"), quiet=True)).raw_scores
        assert len(scores) == 3 and (scores > float(model.threshold)).sum() == above
        rule = json.loads((folder / "model" / "model.json").read_text())["calibration_details"]["rule"]
        assert rule.endswith(f"target FPR {fpr}")


def test_fit_without_held_out_images_warns_that_nothing_is_calibrated(tiny_dataset, images, tmp_path, validation_data):
    args = fit_args(tiny_dataset, tmp_path / "run")
    args[args.index("--val-ratio") + 1] = "0"
    with pytest.warns(UserWarning, match="threshold is not calibrated.*flawscope calibrate"):
        result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "threshold: not calibrated (no held-out images)" in result.output
    # and so do predict and export of that run, until `flawscope calibrate` has set a threshold
    with pytest.warns(UserWarning, match="no calibrated threshold.*predictions.*flawscope calibrate"):
        assert invoke("predict", tmp_path / "run", images, "--out", tmp_path / "pred", "--quiet").exit_code == 0
    with pytest.warns(UserWarning, match="no calibrated threshold.*exported model"):
        assert invoke("export", tmp_path / "run", "--no-check").exit_code == 0
    exported = tmp_path / "run" / "export" / "model.onnx"  # the export says so too, wherever it is shipped
    with pytest.warns(UserWarning, match=r"model\.onnx was exported from a run with no calibrated threshold"):
        assert invoke("predict", exported, images, "--out", tmp_path / "pred-onnx", "--quiet").exit_code == 0
    # and test reports raw scores and AUROCs but no decisions
    result = invoke("test", tmp_path / "run", "--data", tiny_dataset, "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["threshold_calibrated"] is False and metrics["accuracy_at_threshold"] is None
    assert metrics["num_false_alarms"] is None and metrics["image_auroc"] is not None
    assert {row["decision"] for row in read_csv(tmp_path / "run" / "per_image.csv")} == {"n/a"}
    html = (tmp_path / "run" / "report.html").read_text()
    assert "not calibrated" in html and "→" not in html  # no caption names a decision
    validation = validation_data
    with pytest.warns(UserWarning, match="previous threshold"):
        result = invoke("calibrate", tmp_path / "run", "--data", validation, "--quiet")
    assert "previous threshold: none (not calibrated)" in result.output


def test_commands_never_overwrite_files_they_did_not_write(run, tiny_dataset, images, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("config.json", "report.html", "predictions.csv", "skipped.csv", "notes.txt"):
        (mine / name).write_text("the user's own file")
    (mine / "masks").mkdir()
    before = snapshot(mine)
    for args, clash in (
        (fit_args(tiny_dataset, mine), "config.json"),
        (["test", run, "--data", tiny_dataset, "--out", mine, "--quiet"], "report.html"),
        (["predict", run, images, "--out", mine, "--quiet"], "predictions.csv, skipped.csv"),
        (["predict", run, images, "--out", mine, "--masks", "--quiet"], "masks"),
    ):
        assert_clean_error(invoke(*args), str(mine), clash, "never overwrites")
    assert snapshot(mine) == before
    # What a command will not write does not clash: no report, no masks.
    result = invoke("test", run, "--data", tiny_dataset, "--out", mine, "--no-report", "--quiet")
    assert result.exit_code == 0, result.output
    (mine / "predictions.csv").unlink()
    (mine / "skipped.csv").unlink()
    for _ in range(2):  # the second run replaces the first one's files, which flawscope wrote
        assert invoke("predict", run, images, "--out", mine, "--quiet").exit_code == 0
    assert len(read_csv(mine / "predictions.csv")) == 3 and len(list((mine / "overlays").glob("*.png"))) == 3
    # A folder one command wrote into is not the others' to overwrite: the user's files stay theirs.
    assert_clean_error(invoke(*fit_args(tiny_dataset, mine)), "config.json", "never overwrites")
    assert_clean_error(invoke("test", run, "--data", tiny_dataset, "--out", mine, "--quiet"), "report.html")
    for name in ("config.json", "report.html", "notes.txt"):
        assert (mine / name).read_text() == "the user's own file"
    assert not any((mine / "masks").iterdir())


def test_a_test_stopped_half_way_can_be_run_again(run, tiny_dataset, tmp_path, monkeypatch):
    import flawscope.evaluation as evaluation

    def fail(*args, **kwargs):
        raise RuntimeError("stopped while writing the report")

    monkeypatch.setattr(evaluation, "write_report", fail)
    out = tmp_path / "eval"
    with pytest.raises(RuntimeError, match="stopped while writing"):
        evaluation.test(run, tiny_dataset, out=out, quiet=True)
    assert (out / "metrics.json").is_file() and not (out / "report.html").exists()
    monkeypatch.undo()
    assert invoke("test", run, "--data", tiny_dataset, "--out", out, "--quiet").exit_code == 0
    assert (out / "report.html").is_file()


def test_predict_replaces_only_its_own_numbered_images(run, images, tmp_path):
    out = tmp_path / "pred"
    assert invoke("predict", run, images, "--out", out, "--quiet").exit_code == 0
    (out / "overlays" / "123456_from_a_big_run.png").write_bytes(b"x")  # six digits: 100,000 images or more
    (out / "overlays" / "keep.png").write_bytes(b"x")  # not a name predict writes
    assert invoke("predict", run, images, "--out", out, "--quiet").exit_code == 0
    names = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(names) == 4 and "keep.png" in names and "123456_from_a_big_run.png" not in names


def test_folder_searches_skip_flawscope_output_folders(run, images, tmp_path):
    project = tmp_path / "project"
    line = project / "lineA"
    shutil.copytree(images, line)
    # Outputs written next to the images (predict into the images' own folder, given by name) ...
    assert invoke("predict", run, str(line / "*.png"), "--out", line, "--quiet").exit_code == 0
    assert len(list((line / "overlays").glob("*.png"))) == 3
    # ... are not read back as images by a search of that folder or of one above it, nor by a glob; the images
    # themselves still are. A warning says what was left out.
    for source in (line, project, str(project / "**" / "*.png"), str(line / "*"), str(project / "**")):
        with pytest.warns(UserWarning, match="3 image.*flawscope's own outputs.*overlays"):
            result = invoke("predict", run, source, "--out", tmp_path / "p", "--quiet")
        assert result.exit_code == 0, result.output
        assert sorted(Path(r["path"]).name for r in read_csv(tmp_path / "p" / "predictions.csv")) == sorted(
            p.name for p in images.iterdir()
        )
    # Named directly, an output folder is read, but not into the --out whose overlays it is: those are rewritten.
    result = invoke("predict", run, line / "overlays", "--out", tmp_path / "p", "--quiet")
    assert result.exit_code == 0 and len(read_csv(tmp_path / "p" / "predictions.csv")) == 3
    before = snapshot(line)
    for source in (line / "overlays", sorted((line / "overlays").iterdir())[0]):
        result = invoke("predict", run, source, "--out", line, "--no-overlays", "--quiet")
        assert_clean_error(result, "is an input", "which predict rewrites", "choose another --out")
    assert snapshot(line) == before


def test_export_refuses_out_inside_the_training_data_or_over_another_file(run, tiny_dataset, data_snapshot, tmp_path):
    for target in (run, run / "model"):  # the run, or its model folder (the run's config.json names the data)
        result = invoke("export", target, "--out", tiny_dataset / "model.onnx", "--no-check")
        assert_clean_error(result, "inside the data folder", str(tiny_dataset / "model.onnx"))
    assert snapshot(tiny_dataset) == data_snapshot
    shipped = tmp_path / "model.onnx"
    shipped.write_text("the customer's model v1")
    assert_clean_error(invoke("export", run, "--out", shipped, "--no-check"), "not written by `flawscope export`")
    assert shipped.read_text() == "the customer's model v1"
    exported = tmp_path / "ours.onnx"
    for _ in range(2):  # an earlier export is replaced
        assert invoke("export", run, "--out", exported, "--no-check").exit_code == 0


def test_fit_refuses_a_model_whose_scores_are_not_finite(tiny_dataset, tmp_path, monkeypatch):
    from flawscope.models.patchcore.model import PatchCore

    def nan_scores(self, images):
        anomaly_map = torch.full((len(images), 1, *images.shape[-2:]), float("nan"))
        return anomaly_map, anomaly_map.flatten(1).amax(1)

    monkeypatch.setattr(PatchCore, "raw_scores", nan_scores)
    assert_clean_error(invoke(*fit_args(tiny_dataset, tmp_path / "run")), "non-finite scores", "held-out good images")
    assert not (tmp_path / "run").exists()


def test_bench_names_a_settings_file_that_is_not_json(tiny_dataset, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    result = invoke("bench", "--data", tiny_dataset, "--settings", bad, "--out", tmp_path / "out")
    assert_clean_error(result, str(bad), "cannot be read as JSON")
    bad.write_text('["patchcore"]')
    result = invoke("bench", "--data", tiny_dataset, "--settings", bad, "--out", tmp_path / "out")
    assert_clean_error(result, str(bad), "must hold an object")


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (["--model", "patchcor"], ["Unknown model 'patchcor'", "patchcore", "simplenet"]),
        (["--backbone", "resnet5"], ["Unknown backbone 'resnet5'", "efficientnet_lite0", "resnet50"]),
        (["--set", "corset_ratio=0.5"], ["'corset_ratio'", "Valid options", "coreset_ratio", "num_neighbors"]),
        (["--set", "coreset_ratio=1.5"], ["'coreset_ratio'", "(0, 1]", "1.5"]),
        (["--set", "num_neighbors=many"], ["'num_neighbors'", "int", "'many'"]),
        (["--set", "coreset_ratio"], ["--set expects key=value", "'coreset_ratio'"]),
        (["--image-size", "16"], ["'image_size'", "[32, 4096]", "16"]),
        (["--set", "patch_size=4"], ["'patch_size'", "one of", "1, 3, 5, 7, 9", "4"]),
        (["--target-fpr", "nan"], ["target_fpr", "[0, 1)", "nan"]),
    ],
    ids=["model", "backbone", "set-key", "range", "type", "set-syntax", "image-size", "even-patch", "target-fpr"],
)
def test_fit_rejects_bad_options(tiny_dataset, tmp_path, monkeypatch, change, fragments):
    # The module (the package's `fit` attribute is the function), imported here so the test runs alone too.
    patchcore_fit = importlib.import_module("flawscope.models.patchcore.fit")

    def never(*args, **kwargs):
        raise AssertionError("a bad option must be refused before training")

    monkeypatch.setattr(patchcore_fit, "collect_features", never)
    args = fit_args(tiny_dataset, tmp_path / "run")
    # Later options win in click, so appending overrides the defaults above; --model is given once.
    if change[0] == "--model":
        args[args.index("--model") + 1] = change[1]
    else:
        args += change
    assert_clean_error(invoke(*args), *fragments)
    assert not (tmp_path / "run").exists()


def test_fit_rejects_an_empty_data_folder(tmp_path):
    empty = tmp_path / "empty"
    (empty / "train" / "good").mkdir(parents=True)
    (empty / "train" / "good" / "notes.txt").write_text("no images here")
    assert_clean_error(invoke(*fit_args(empty, tmp_path / "run")), str(empty / "train" / "good"), "No images", ".png")
    (tmp_path / "bare").mkdir()
    assert_clean_error(invoke(*fit_args(tmp_path / "bare", tmp_path / "run")), "No 'train/good'", "found: nothing")
    assert_clean_error(invoke(*fit_args(tmp_path / "missing", tmp_path / "run")), "missing", "does not exist")
    assert not (tmp_path / "run").exists()


def test_a_plain_folder_of_good_images_trains_and_only_labelled_data_tests(run, tiny_dataset, images, tmp_path):
    shutil.copytree(tiny_dataset, tmp_path / "copy")
    plain = tmp_path / "copy" / "train" / "good"  # a folder of images: auto reads it as a plain folder
    new_parts = plain / "next batch"  # a subfolder: never read by the fit, so it may set the threshold later
    shutil.copytree(tiny_dataset / "test" / "good", new_parts)
    before = snapshot(plain)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="next batch \\(a folder: subfolders are not searched\\)"):
        result = invoke(*fit_args(plain, out))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["layout"] == "folder" and config["category"] == "good"
    assert config["num_train"] + config["num_val"] == len(load_dataset(tiny_dataset).train)
    # The same images as the MVTec layout's train/good, in the same order: the same split, weights and threshold.
    plain_model, mvtec_model = (json.loads((folder / "model" / "model.json").read_text()) for folder in (out, run))
    assert plain_model["weights_sha256"] == mvtec_model["weights_sha256"]
    assert plain_model["calibration"] == mvtec_model["calibration"]
    assert invoke("predict", out, images, "--out", tmp_path / "pred", "--quiet").exit_code == 0
    assert len(read_csv(tmp_path / "pred" / "predictions.csv")) == 3
    assert_clean_error(invoke("test", out, "--data", plain), "plain folder of images", "flawscope predict RUN")
    assert "--out DIR`" in invoke("test", out, "--data", plain).stderr
    assert invoke("test", out, "--data", tiny_dataset, "--quiet", "--no-report").exit_code == 0  # labelled: tests
    bench = invoke("bench", "--data", plain, "--models", "patchcore", "--out", tmp_path / "bench")
    assert_clean_error(bench, "No labelled test images", "folder layout")
    assert not (tmp_path / "bench").exists()
    # New good parts set the threshold by the fpr rule; the f1 rule needs defects; the training images are refused.
    assert_clean_error(invoke("calibrate", out, "--data", new_parts), "needs labelled images", "--rule fpr")
    line = assert_clean_error(invoke("calibrate", out, "--data", plain, "--rule", "fpr"), "its training images")
    assert f"12 of the 12 images in {plain} are among the data this run was trained on" in line
    result = invoke("calibrate", out, "--data", new_parts, "--rule", "fpr", "--target-fpr", "0.25", "--quiet")
    assert result.exit_code == 0, result.output
    model = load_model(out)
    scores = score_images(model, load_dataset(new_parts).train, FitContext(quiet=True)).raw_scores
    expected = threshold_from_normals(scores, 0.25)["threshold"]
    assert json.loads((out / "model" / "model.json").read_text())["calibration"]["threshold"] == pytest.approx(expected)
    assert snapshot(plain) == before


def test_fit_explains_a_misnamed_folder(tiny_dataset, tmp_path):
    misnamed = tmp_path / "bottle"
    shutil.copytree(tiny_dataset / "train" / "good", misnamed / "training" / "good")
    line = assert_clean_error(
        invoke(*fit_args(misnamed, tmp_path / "run")), "No 'train/good'", "training/good", "MVTec AD layout"
    )
    assert str(misnamed) in line


def test_test_needs_a_run_folder(tiny_dataset, tmp_path):
    (tmp_path / "not_a_run").mkdir()
    assert_clean_error(invoke("test", tmp_path / "not_a_run", "--data", tiny_dataset), "No model.json", "flawscope fit")


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run / "model", copy / "model")
    return copy


def test_newer_model_format_asks_to_upgrade(run_copy, images, tmp_path):
    path = run_copy / "model" / "model.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "format": info["format"] + 1}))
    assert_clean_error(invoke("predict", run_copy, images, "--out", tmp_path / "p"), "format 2", "Upgrade flawscope")


def test_corrupted_weights_are_detected(run_copy, tiny_dataset, tmp_path):
    weights = run_copy / "model" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a flipped bit inside a tensor still parses as safetensors: only the hash can tell
    weights.write_bytes(bytes(data))
    assert_clean_error(
        invoke("test", run_copy, "--data", tiny_dataset, "--out", tmp_path / "e"),
        "weights.safetensors",
        "does not match the hash",
        "fit again",
    )
    assert not (tmp_path / "e").exists()


def test_predict_skips_corrupt_images_and_lists_them(run, images, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(images, folder)
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "truncated.png").write_bytes((images / "good_000.png").read_bytes()[:200])
    out = tmp_path / "pred"
    assert invoke("predict", run, images, "--out", out, "--quiet").exit_code == 0  # an earlier run into the folder
    (out / "skipped.csv").write_text("path,reason\nstale.png,from an earlier run\n")

    result = invoke("predict", run, folder, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "skipped.csv" in result.output
    assert sorted(Path(r["path"]).name for r in read_csv(out / "predictions.csv")) == sorted(
        p.name for p in images.iterdir()
    )
    skipped = read_csv(out / "skipped.csv")
    assert sorted(Path(r["path"]).name for r in skipped) == ["broken.png", "truncated.png"]
    assert all(r["reason"] for r in skipped)
    assert len(list((out / "overlays").glob("*.png"))) == 3

    # A later clean run into the same folder must not leave the old list behind.
    result = invoke("predict", run, images, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert not (out / "skipped.csv").exists()

    strict = invoke("predict", run, folder, "--out", tmp_path / "strict", "--strict", "--quiet")
    assert_clean_error(strict, str(folder / "broken.png"))


def test_predict_and_test_name_images_far_smaller_than_the_input(run, images, tiny_dataset, tmp_path):
    folder = tmp_path / "small"
    shutil.copytree(images, folder)
    Image.new("RGB", (1, 1), (90, 120, 60)).save(folder / "dot.png")  # the run's input is 64 px
    Image.new("RGB", (16, 40), (90, 120, 60)).save(folder / "edge.png")  # 4x: not named
    with pytest.warns(UserWarning, match=r"1 image\(s\) were enlarged more than 4x.*dot.png \(1 x 1 px\)") as caught:
        result = invoke("predict", run, folder, "--out", tmp_path / "pred", "--quiet")
    assert result.exit_code == 0, result.output
    assert not any("edge.png" in str(w.message) for w in caught)
    assert len(read_csv(tmp_path / "pred" / "predictions.csv")) == len(list(folder.iterdir()))  # still scored
    # test (and calibrate, and fit's held-out images: all scored by score_images) say the same.
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    Image.new("RGB", (1, 1), (90, 120, 60)).save(data / "test" / "good" / "dot.png")
    with pytest.warns(UserWarning, match=r"1 image\(s\) were enlarged more than 4x.*dot.png \(1 x 1 px\)"):
        result = invoke("test", run, "--data", data, "--out", tmp_path / "eval", "--no-report", "--quiet")
    assert result.exit_code == 0, result.output
    # fit names the training images it would enlarge (from their headers) before it trains on them.
    Image.new("RGB", (300, 2), (90, 120, 60)).save(data / "train" / "good" / "strip.png")
    with pytest.warns(UserWarning, match=r"enlarged more than 4x.*strip.png \(300 x 2 px\).*They were trained on"):
        result = invoke(*fit_args(data, tmp_path / "strip-run", "--val-ratio", "0"))
    assert result.exit_code == 0, result.output


def test_predict_on_a_folder_without_images(run, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    assert_clean_error(invoke("predict", run, folder, "--out", tmp_path / "p"), "No images found", str(folder), ".png")
    assert not (tmp_path / "p").exists()


def test_errors_reach_a_real_shell_without_traceback(tmp_path):
    executable = shutil.which("flawscope") or pytest.skip("the flawscope command is not on PATH")
    result = subprocess.run(
        [executable, "fit", "--model", "nope", "--data", tmp_path, "--out", tmp_path / "run"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: Unknown model 'nope'. Available: ") and "patchcore" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------- info


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"flawscope, version {__version__}"


def test_info_lists_versions_and_weights():
    result = invoke("info")
    assert result.exit_code == 0, result.output
    assert __version__ in result.stdout and torch.__version__ in result.stdout
    assert "patchcore" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("efficientnet_lite0 "))
    assert "missing" not in line and Path(line.split(maxsplit=1)[1]).is_file()
    assert "wide_resnet50_2" in result.stdout
    if "missing (need" in result.stdout:  # where to put the files is said once, after the list
        assert "missing files: put them into $FLAWSCOPE_WEIGHTS_DIR" in result.stdout.splitlines()[-1]

    report = json.loads(invoke("info", "--json").stdout)
    assert report["environment"]["flawscope"] == __version__
    assert "patchcore" in report["methods"]
    assert set(report["backbone_weights"]) >= {"efficientnet_lite0", "wide_resnet50_2"}


def test_info_lists_the_options_of_a_model():
    result = invoke("info", "--model", "patchcore")
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert {"backbone", "image_size", "coreset_ratio", "num_neighbors", "target_embed_dim"} <= set(names)
    assert "0.1" in next(line for line in result.stdout.splitlines() if line.split()[0] == "coreset_ratio")
    assert_clean_error(invoke("info", "--model", "patchcor"), "Unknown model 'patchcor'", "patchcore")
    described = json.loads(invoke("info", "--model", "patchcore", "--json").stdout)  # for scripts: JSON
    assert described["method"] == "patchcore" and described["supervision"] == "normal"
    options = {option["name"]: option for option in described["options"]}
    assert [option["name"] for option in described["options"]] == names
    assert options["coreset_ratio"]["default"] == 0.1 and options["strides"]["default"] == [8, 16]


# --------------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_weights(run, tiny_dataset, tmp_path):
    assert invoke(*fit_args(tiny_dataset, tmp_path / "again")).exit_code == 0
    first = json.loads((run / "model" / "model.json").read_text())
    second = json.loads((tmp_path / "again" / "model" / "model.json").read_text())
    assert second["weights_sha256"] == first["weights_sha256"]
    assert second["calibration"] == first["calibration"]

    # Saving is byte-exact too (safetensors writes its metadata map in random order; see model_io.save_model).
    model = load_model(run / "model")
    hashes = {
        json.loads((save_model(model, tmp_path / f"save{i}") / "model.json").read_text())["weights_sha256"]
        for i in range(5)
    }
    assert hashes == {first["weights_sha256"]}

    assert invoke(*fit_args(tiny_dataset, tmp_path / "other", "--seed", "1")).exit_code == 0
    with pytest.warns(UserWarning, match="already holds a run: its model will be replaced when this fit succeeds"):
        assert invoke(*fit_args(tiny_dataset, tmp_path / "other", "--seed", "1")).exit_code == 0
    other = json.loads((tmp_path / "other" / "model" / "model.json").read_text())
    assert other["weights_sha256"] != first["weights_sha256"]
    assert json.loads((tmp_path / "other" / "environment.json").read_text())["seed"] == 1


@pytest.fixture
def whole_run_copy(run, tmp_path) -> Path:
    shutil.copytree(run, tmp_path / "whole-run")
    return tmp_path / "whole-run"


def test_predict_with_an_export_older_than_its_runs_threshold_warns(whole_run_copy, images, tmp_path, validation_data):
    exports = {}
    for fmt, extra in (("onnx", []), ("torchscript", ["--half"])):
        result = invoke("export", whole_run_copy, "--format", fmt, *extra)
        assert result.exit_code == 0, result.output
        (exports[fmt],) = (whole_run_copy / "export").glob("*.onnx" if fmt == "onnx" else "*.pt")

    def predict_warnings(export: Path) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            args = ["--trust-code"] if export.suffix == ".pt" else []
            result = invoke("predict", export, images, "--out", tmp_path / f"p-{export.suffix}", *args, "--quiet")
        assert result.exit_code == 0, result.output
        return [str(w.message) for w in caught if "fitted again" in str(w.message)]

    assert predict_warnings(exports["onnx"]) == [] and predict_warnings(exports["torchscript"]) == []
    with pytest.warns(UserWarning, match="previous threshold"):
        assert invoke("calibrate", whole_run_copy, "--data", validation_data, "--quiet").exit_code == 0
    for export in exports.values():
        (message,) = predict_warnings(export)
        assert str(export) in message and f"flawscope export {whole_run_copy}" in message
    shutil.copy(exports["onnx"], tmp_path / "elsewhere.onnx")  # moved out of its run: nothing to compare with
    assert predict_warnings(tmp_path / "elsewhere.onnx") == []


def test_calibrate_sets_an_f1_threshold_from_a_separate_folder(run, whole_run_copy, tmp_path, validation_data):
    run_copy = whole_run_copy
    validation = validation_data
    (run_copy / "export").mkdir(exist_ok=True)
    (run_copy / "export" / "line.ts").write_text("an export under TorchScript's other suffix")
    with pytest.warns(UserWarning, match=r"previous threshold and still carry it: .*metrics\.json.*line\.ts"):
        result = invoke("calibrate", run_copy, "--data", validation, "--quiet")
    assert result.exit_code == 0, result.output
    before = json.loads((run / "model" / "model.json").read_text())["calibration"]["threshold"]
    info = json.loads((run_copy / "model" / "model.json").read_text())
    assert info["calibration_details"]["rule"].startswith("F1-optimal")
    new = info["calibration"]["threshold"]
    details = info["calibration_details"]
    counts = f"{details['num_normal']} good and {details['num_defective']} defective images, F1 {details['f1']:.3f})"
    assert f"threshold {new:.6g} (F1-optimal" in result.output and counts in result.output
    assert f"previous threshold: {before:.6g}" in result.output
    assert info["calibration"]["threshold"] == pytest.approx(info["calibration_details"]["threshold"])
    assert "training" in info  # the fit report survives recalibration
    before_info = json.loads((run / "model" / "model.json").read_text())
    assert info["pretrained_weights"] == before_info["pretrained_weights"]  # and which weights the fit started from
    reloaded = load_model(run_copy / "model")
    assert float(reloaded.threshold) == pytest.approx(info["calibration"]["threshold"])

    # The saved threshold is F1-optimal on the validation images, scored independently of calibrate.
    samples = load_dataset(validation).test
    scores = score_images(reloaded, samples, FitContext(device=torch.device("cpu"), quiet=True)).raw_scores
    labels = np.array([s.label for s in samples], bool)

    def f1_at(threshold: float) -> float:
        predicted = scores > threshold
        return 2 * (predicted & labels).sum() / (predicted.sum() + labels.sum())

    best = max(f1_at(t) for t in np.r_[scores, -np.inf])
    assert f1_at(float(reloaded.threshold)) == pytest.approx(best)
    assert info["calibration_details"]["f1"] == pytest.approx(best)

    # The fpr rule: the good images' quantile, as threshold_from_normals computes it from the same scores; the
    # share of good images above it is at most --target-fpr (default 0.01: none of these 4).
    thresholds = {}
    for fpr in ("0.01", "0.5"):
        with pytest.warns(UserWarning, match="previous threshold"):
            args = ["--rule", "fpr", "--target-fpr", fpr] if fpr != "0.01" else ["--rule", "fpr"]
            assert invoke("calibrate", run_copy, "--data", validation, *args, "--quiet").exit_code == 0
        thresholds[fpr] = float(load_model(run_copy / "model").threshold)
        assert thresholds[fpr] == pytest.approx(threshold_from_normals(scores[~labels], float(fpr))["threshold"])
    assert (scores[~labels] > thresholds["0.01"]).sum() == 0 and 0 < (scores[~labels] > thresholds["0.5"]).mean() <= 0.5


def test_test_and_calibrate_read_a_folder_without_training_images(whole_run_copy, tiny_dataset, tmp_path):
    # Both read the test split only: test/ and ground_truth/ are enough (no train/good, or an empty one).
    labelled = tmp_path / "labelled"
    for part in ("test", "ground_truth"):
        shutil.copytree(tiny_dataset / part, labelled / part)
    out = tmp_path / "tested"
    assert invoke("test", whole_run_copy, "--data", labelled, "--out", out, "--quiet").exit_code == 0
    assert json.loads((out / "metrics.json").read_text())["num_images"] == len(load_dataset(tiny_dataset).test)
    (labelled / "train" / "good").mkdir(parents=True)
    with pytest.warns(UserWarning, match="previous threshold"):
        result = invoke("calibrate", whole_run_copy, "--data", labelled, "--quiet")
    assert result.exit_code == 0, result.output
    assert_clean_error(invoke(*fit_args(labelled, tmp_path / "r")), "train/good")  # fitting still needs it


def test_calibrate_warns_about_an_ignored_option_and_a_threshold_from_too_few_images(
    whole_run_copy, tiny_dataset, tmp_path
):
    few = tmp_path / "few"
    shutil.copytree(tiny_dataset / "test", few / "test")
    shutil.copytree(tiny_dataset / "ground_truth", few / "ground_truth")
    for extra in sorted((few / "test" / "good").iterdir())[1:]:
        extra.unlink()  # one good image left
    with (
        pytest.warns(UserWarning, match=r"--target-fpr\) is used by the 'fpr' rule only"),
        pytest.warns(UserWarning, match="Only 1 good image"),
        pytest.warns(UserWarning, match="previous threshold"),
    ):
        result = invoke("calibrate", whole_run_copy, "--data", few, "--target-fpr", "0.05", "--quiet")
    assert result.exit_code == 0, result.output
    shutil.rmtree(few / "test" / "good")
    assert_clean_error(invoke("calibrate", whole_run_copy, "--data", few, "--quiet"), "got 0 good and 6 defective")
    only_train = tmp_path / "only-train"
    shutil.copytree(tiny_dataset / "train", only_train / "train")
    assert_clean_error(invoke("calibrate", whole_run_copy, "--data", only_train), "No labelled images", "train/ is not")


def test_calibrate_says_why_a_threshold_can_call_every_good_image_defective(whole_run_copy, tiny_dataset, tmp_path):
    # Labels swapped: the defective test images filed as good, the images the model was fitted on (which score
    # lowest) as defective, with full masks.
    swapped = tmp_path / "swapped"
    (swapped / "test" / "good").mkdir(parents=True)
    (swapped / "test" / "mislabelled").mkdir(parents=True)
    (swapped / "ground_truth" / "mislabelled").mkdir(parents=True)
    for sample in load_dataset(tiny_dataset).test:
        if sample.label:
            shutil.copy(sample.path, swapped / "test" / "good" / f"{sample.defect_type}_{sample.path.name}")
    held_out = {Path(p).name for p in json.loads((whole_run_copy / "config.json").read_text())["val_images"]}
    fitted_on = [p for p in sorted((tiny_dataset / "train" / "good").iterdir()) if p.name not in held_out]
    for image in fitted_on:
        shutil.copy(image, swapped / "test" / "mislabelled" / image.name)
        Image.new("L", Image.open(image).size, 255).save(
            swapped / "ground_truth" / "mislabelled" / f"{image.stem}_mask.png"
        )
    counts = rf"\(6 good, {len(fitted_on)} defective\)"
    with pytest.warns(UserWarning, match=counts + ".*does not score its defective images above its good ones"):
        result = invoke("calibrate", whole_run_copy, "--data", swapped, "--quiet")
    assert result.exit_code == 0, result.output


def test_calibrate_refuses_the_images_of_the_data_it_was_trained_on(whole_run_copy, tiny_dataset):
    assert_clean_error(invoke("calibrate", whole_run_copy, "--data", tiny_dataset), "trained on", "test set")
    for inside, count, part in (("train/good", 12, "its training images"), ("test/good", 4, "its test split")):
        result = invoke("calibrate", whole_run_copy, "--data", tiny_dataset / inside, "--rule", "fpr")
        assert_clean_error(result, f"{count} of the {count} images in {tiny_dataset / inside}", part)


def test_demo_refuses_bad_options_before_generating_anything(tmp_path):
    result = invoke("demo", "--out", tmp_path / "d", "--epochs", "0")
    assert result.exit_code == 2 and "--epochs" in result.output and not (tmp_path / "d").exists()
    (tmp_path / "file").write_text("mine")
    assert_clean_error(invoke("demo", "--out", tmp_path / "file"), "--out", "is a file")
    assert (tmp_path / "file").read_text() == "mine"


def test_demo_generates_trains_tests_and_reports(tmp_path):
    # The demo exactly as the README runs it (its default schedule, about two minutes on 2 cores).
    result = invoke("demo", "--out", tmp_path / "demo", "--quiet")
    assert result.exit_code == 0, result.output
    report = tmp_path / "demo" / "run" / "report.html"
    assert report.is_file() and str(report.resolve()) in result.output
    metrics = json.loads((tmp_path / "demo" / "run" / "metrics.json").read_text())
    assert metrics["num_defective"] == 30
    # Measured on this schedule: image AUROC 0.913, pixel AUROC 0.940 (one epoch: 0.43 / 0.50, chance).
    assert metrics["image_auroc"] >= 0.85 and metrics["pixel_auroc"] >= 0.88
    # Another texture: the data set is reused, and the run trains and tests on that category.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke("demo", "--out", tmp_path / "demo", "--texture", "brick", "--epochs", "1", "--quiet")
    assert result.exit_code == 0, result.output
    said = result.output + " ".join(str(w.message) for w in caught)  # its own run replaced: nothing to warn about
    assert "already holds a run" not in said and "results of another model" not in said
    config = json.loads((tmp_path / "demo" / "run" / "config.json").read_text())
    assert Path(config["data"]).name == "brick" and config["options"]["num_epochs"] == 1
    assert json.loads((tmp_path / "demo" / "run" / "metrics.json").read_text())["category"] == "brick"


# ------------------------------------------------------------------------------ file systems and edited run folders


@pytest.mark.parametrize(
    ("error", "fragments"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "run/model/weights.safetensors"), ["free space there"]),
        (PermissionError(errno.EACCES, "Permission denied", "ro/.flawscope"), ["(ro/.flawscope)", "permissions"]),
        (OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300), ["shorten the path"]),
    ],
)
def test_file_system_errors_are_one_line_naming_the_file(tiny_dataset, tmp_path, monkeypatch, error, fragments):
    monkeypatch.setattr("flawscope.api.fit", lambda *a, **k: (_ for _ in ()).throw(error))
    assert_clean_error(invoke(*fit_args(tiny_dataset, tmp_path / "run")), "`flawscope fit` stopped:", *fragments)
    other = OSError(errno.EMFILE, "Too many open files")  # about no file: a traceback, as any other fault
    monkeypatch.setattr("flawscope.api.fit", lambda *a, **k: (_ for _ in ()).throw(other))
    assert invoke(*fit_args(tiny_dataset, tmp_path / "run")).exception is other


@pytest.mark.parametrize(
    "message",
    [
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })',
        "Error while serializing: I/O error: No space left on device (os error 28)",  # safetensors 0.8's wording
    ],
)
def test_a_full_disk_inside_safetensors_is_an_os_error(tmp_path, monkeypatch, message):
    from safetensors import SafetensorError

    from flawscope import runs

    monkeypatch.setattr(runs, "save_file", lambda *a, **k: (_ for _ in ()).throw(SafetensorError(message)))
    with pytest.raises(OSError, match="No space left on device") as caught:
        runs.save_safetensors({"x": torch.zeros(1)}, tmp_path / "w.safetensors", {})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "w.safetensors")


def test_export_refuses_a_disk_too_small_before_writing(run, tmp_path, monkeypatch):
    # torch.jit.save aborts the process on a full disk; the size is checked first.
    import shutil as shutil_module

    monkeypatch.setattr(
        "flawscope.export.parity.shutil.disk_usage", lambda path: shutil_module._ntuple_diskusage(10, 10, 1 << 20)
    )
    out = tmp_path / "exports" / "m.pt"
    line = assert_clean_error(invoke("export", run, "--format", "torchscript", "--out", out), "No space left on device")
    assert "MiB free" in line and list((tmp_path / "exports").iterdir()) == []


def test_edited_or_missing_run_files_are_named(whole_run_copy, tiny_dataset, tmp_path):
    assert_clean_error(invoke("test", tmp_path / "nope", "--data", tiny_dataset), "nope does not exist")
    config = whole_run_copy / "config.json"
    record = json.loads(config.read_text())
    for text in ("{", "[1, 2]"):
        config.write_text(text)
        for args in (("test", whole_run_copy, "--data", tiny_dataset), ("export", whole_run_copy)):
            assert_clean_error(invoke(*args), "config.json is not the JSON object `flawscope fit` wrote")
    config.write_text(json.dumps({**record, "val_images": [str(tmp_path / "moved" / "0.png")]}))
    from flawscope.export.parity import held_out_images

    with pytest.warns(UserWarning, match="None of the run's held-out images could be read.*data moved"):
        assert held_out_images(whole_run_copy, load_model(whole_run_copy)) is None
    args = ("synth", "--data", tiny_dataset, "--run", whole_run_copy, "--out", tmp_path / "synth")
    assert_clean_error(invoke(*args), "1 of the 1 held-out images listed in", "are gone", "leave --run out")
    config.write_text(json.dumps({**record, "val_images": ["grass/train/good/000.png"]}))  # an older run's form
    assert_clean_error(invoke(*args), "relative to the folder it was fitted from: run the command from there")
    elsewhere = tmp_path / "elsewhere.png"  # a received run listing a file outside the data: synth would copy it
    Image.new("RGB", (8, 8)).save(elsewhere)
    config.write_text(json.dumps({**record, "val_images": [str(elsewhere)]}))
    assert_clean_error(invoke(*args), "1 of the held-out images listed in", "are not in --data")
    config.write_text(json.dumps({**record, "val_images": []}))  # fitted with --val-ratio 0: never the training images
    assert_clean_error(invoke(*args), "held out no good images", "--val-ratio 0")
    config.write_text(json.dumps({**record, "options": {**record["options"], "image_size": 10**6}}))
    assert_clean_error(invoke(*args), "image_size")


def test_an_unreadable_image_is_not_called_corrupt(tmp_path, monkeypatch):
    # Root ignores permission bits, so the operating system's answer is simulated.
    image = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(image)
    monkeypatch.setattr("PIL.Image.open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(DataError, match=r"locked\.png: permission denied\. Give the user running flawscope read"):
        read_image(image)


def test_predict_cuts_long_file_names_for_its_images(run, tiny_dataset, tmp_path):
    folder = tmp_path / "long"
    folder.mkdir()
    source = tiny_dataset / "test" / "good" / "000.png"
    shutil.copy(source, folder / ("ü" * 120 + ".png"))  # 244 bytes: with the index, over 255
    latin1 = folder / os.fsdecode(b"z-caf\xe9.png")  # a name that is not UTF-8 (a Latin-1 file system)
    shutil.copy(source, latin1)
    shutil.copy(source, folder / 'we:ird?|"name. .png')  # names Windows cannot hold, nor copy from a Linux share
    result = invoke("predict", run, folder, "--out", tmp_path / "pred", "--masks", "--quiet")
    assert result.exit_code == 0, result.output
    overlays = sorted(p.name for p in (tmp_path / "pred" / "overlays").iterdir())
    assert overlays == ["00000_we_ird___name.png", "00001_z-caf.png", "00002_" + "ü" * 100 + ".png"]
    rows = (tmp_path / "pred" / "predictions.csv").read_bytes()
    assert b"z-caf\xe9.png" in rows  # the path as its bytes on disk


def test_synth_and_calibrate_on_a_multi_category_root_take_the_runs_category(tiny_dataset, tmp_path):
    root = tmp_path / "categories"
    for name in ("brick", "grass"):
        shutil.copytree(tiny_dataset, root / name)
    run = tmp_path / "run"
    assert invoke(*fit_args(root, run, "--category", "grass")).exit_code == 0
    result = invoke("synth", "--data", root, "--run", run, "--out", tmp_path / "synth")  # no --category
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "synth" / "synthetic.json").read_text())["sources"][0].startswith(str(root / "grass"))
    # Calibrating on another category: the advice is a validation folder of the run's parts, not --category grass,
    # whose test split is the test set (calibrate refuses it).
    with pytest.warns(UserWarning, match="is calibrated on 'brick'.*validation folder of 'grass' images") as caught:
        result = invoke("calibrate", run, "--data", root, "--category", "brick", "--quiet")
    assert result.exit_code == 0, result.output
    assert not any("--category grass" in str(w.message) for w in caught)


def test_calibrating_on_a_differently_named_folder_is_not_a_cross_category_warning(
    whole_run_copy, tiny_dataset, tmp_path
):
    validation = tmp_path / "synthval"
    shutil.copytree(tiny_dataset, validation)  # flawscope synth's folders have a name of their own
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*previous threshold")  # the run's old test outputs
        result = invoke("calibrate", whole_run_copy, "--data", validation, "--quiet")
    assert result.exit_code == 0, result.output


def test_fit_and_test_take_a_thread_count_and_restore_the_callers(tiny_dataset, tmp_path):
    import flawscope

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        options = {"backbone": "efficientnet_lite0", "image_size": 64, "resize_size": 0, "coreset_ratio": 0.5}
        options |= {"target_embed_dim": 64, "pretrain_embed_dim": 64}
        run = flawscope.fit("patchcore", tiny_dataset, tmp_path / "run", options=options, quiet=True, threads=1)
        assert json.loads((run / "environment.json").read_text())["torch_threads"] == 1
        assert torch.get_num_threads() == 2
        metrics = flawscope.test(run, tiny_dataset, quiet=True, report=False, threads=1)
        assert metrics["torch_threads"] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_python_m_flawscope_runs_the_command_line():
    command = [sys.executable, "-m", "flawscope", "--version"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"flawscope, version {__version__}"


# ------------------------------------------------------------------------- pixel metrics at the native resolution


def test_test_at_the_native_resolution_resizes_each_map_to_its_image(run, tiny_dataset, tmp_path):
    import torch.nn.functional as F

    import flawscope.metrics as fm
    from flawscope.data import read_mask

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    # Every test image and its mask get their own size, none of them the model's 64 x 64.
    for i, path in enumerate(sorted((data / "test").rglob("*.png"))):
        size = (64 + 16 * (i % 3), 40 + 24 * (i % 2))  # PIL (width, height)
        Image.open(path).resize(size, Image.BILINEAR).save(path)
        mask_path = data / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        if mask_path.exists():
            Image.open(mask_path).resize(size, Image.NEAREST).save(mask_path)
    result = invoke("test", run, "--data", data, "--out", tmp_path / "native", "--eval-resolution", "native", "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "native" / "metrics.json").read_text())
    assert metrics["eval_resolution"] == "native"
    assert "own size (native)" in (tmp_path / "native" / "report.html").read_text()

    # The same metrics computed directly: the model's raw 64-px map resized bilinearly to the file's size.
    model = load_model(run / "model")
    maps, masks = [], []
    for sample in load_dataset(data).test:
        pixels = read_image(sample.path)
        with torch.no_grad():
            raw = model(preprocess(pixels, 64, 0)[None]).anomaly_map
        maps.append(F.interpolate(raw, size=pixels.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy())
        masks.append(read_mask(sample.mask_path) if sample.mask_path else np.zeros(pixels.shape[:2], bool))
    assert {m.shape for m in maps} == {(40, 64), (64, 80), (40, 96), (64, 64), (40, 80), (64, 96)}
    expected = fm.pixel_metrics(maps, masks)
    # Batches of 8 against one image at a time move the maps by float rounding, and AUPRO with them (1e-6 here).
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-5), key
    scratch = [i for i, s in enumerate(load_dataset(data).test) if s.defect_type in ("good", "scratch")]
    per_type = fm.pixel_metrics([maps[i] for i in scratch], [masks[i] for i in scratch])
    assert metrics["per_type"]["scratch"]["pixel_aupro"] == pytest.approx(per_type["pixel_aupro"], abs=1e-5)

    default = invoke("test", run, "--data", data, "--out", tmp_path / "input", "--quiet")
    assert default.exit_code == 0, default.output
    at_input = json.loads((tmp_path / "input" / "metrics.json").read_text())
    assert at_input["eval_resolution"] == "input" and at_input["pixel_aupro"] != metrics["pixel_aupro"]


def test_native_resolution_needs_a_run_that_saw_the_whole_image(tiny_dataset, tmp_path):
    out = tmp_path / "crop"
    fitted = invoke(*fit_args(tiny_dataset, out)[:-4], "--resize-size", "72", "--data", tiny_dataset, "--out", out)
    assert fitted.exit_code == 0, fitted.output
    result = invoke("test", out, "--data", tiny_dataset, "--out", tmp_path / "t", "--eval-resolution", "native")
    assert_clean_error(result, "crops the centre of every image (resize_size=72, image_size=64)", "--resize-size 0")
    assert not (tmp_path / "t").exists()
    # resize_size = image_size sees a square image whole, an oblong one cropped.
    out = tmp_path / "square"
    fitted = invoke(*fit_args(tiny_dataset, out)[:-4], "--resize-size", "64", "--data", tiny_dataset, "--out", out)
    assert fitted.exit_code == 0, fitted.output
    result = invoke("test", out, "--data", tiny_dataset, "--out", tmp_path / "s", "--eval-resolution", "native")
    assert result.exit_code == 0, result.output  # the demo's images are square
    data = tmp_path / "oblong"
    shutil.copytree(tiny_dataset, data)
    oblong = sorted((data / "test" / "good").glob("*.png"))[0]
    Image.open(oblong).resize((80, 64)).save(oblong)
    result = invoke("test", out, "--data", data, "--out", tmp_path / "o", "--eval-resolution", "native", "--quiet")
    assert_clean_error(result, "crops the centre of oblong images (1 here, e.g.", oblong.name)


@pytest.mark.parametrize("module", ["flawscope", "flawscope.cli"])
def test_the_command_runs_as_a_module(module):
    # Where the `flawscope` script is not on PATH: `python -m flawscope` (and the package's own entry point).
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"flawscope, version {__version__}"
