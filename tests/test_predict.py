"""`flawscope export` and batch prediction: exported files as RUN, regions, JSON lines, masks, streaming."""

from __future__ import annotations

import csv
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import flawscope
import flawscope.prediction as prediction_module
from flawscope.cli import main
from flawscope.data import read_image
from flawscope.prediction import predict

FAST = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--resize-size", "0", "--val-ratio", "0.25"]
FAST += ["--quiet", "--set", "coreset_ratio=0.5", "--set", "target_embed_dim=64", "--set", "pretrain_embed_dim=64"]


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "run"
    invoke("fit", "--model", "patchcore", *FAST, "--data", tiny_dataset, "--out", out)
    return out


@pytest.fixture(scope="module")
def exported(run) -> dict[str, Path]:
    onnx = invoke("export", run, "--format", "onnx")
    assert "parity with torch" in onnx.output and "decisions equal" in onnx.output
    invoke("export", run, "--format", "torchscript", "--batch", "4")
    return {"onnx": run / "export" / "model.onnx", "torchscript": run / "export" / "model.pt"}


@pytest.fixture(scope="module")
def images(tiny_dataset, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for path in sorted((tiny_dataset / "test").rglob("*.png")):
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    return folder


def test_every_form_of_a_model_predicts_the_same(run, exported, images, tmp_path):
    results = {}
    for name, model in {"run": run, **exported}.items():
        invoke("predict", model, images, "--out", tmp_path / name, "--quiet", "--no-overlays", "--trust-code")
        results[name] = read_csv(tmp_path / name / "predictions.csv")
    reference = results.pop("run")
    assert any(r["decision"] == "defective" for r in reference) and any(r["decision"] == "good" for r in reference)
    for rows in results.values():
        assert [r["path"] for r in rows] == [r["path"] for r in reference]
        assert [r["decision"] for r in rows] == [r["decision"] for r in reference]
        for a, b in zip(rows, reference, strict=True):
            assert float(a["norm_score"]) == pytest.approx(float(b["norm_score"]), abs=2e-4)  # 4 decimals written


def test_rows_carry_regions_and_jsonl_matches_csv(run, images, tmp_path):
    out = tmp_path / "pred"
    invoke("predict", run, str(images / "*.png"), "--out", out, "--quiet", "--masks")
    rows = read_csv(out / "predictions.csv")
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(lines) == len(list(images.iterdir()))
    for row, line in zip(rows, lines, strict=True):
        assert row["path"] == line["path"] and row["decision"] == line["decision"]
        regions = json.loads(row["regions"])
        assert regions == line["regions"] and int(row["num_regions"]) == len(regions)
        mask = read_image(out / line["mask"])[..., 0] > 127
        assert int(row["defect_area"]) == int(mask.sum()) == sum(r["area"] for r in regions)
        for r in regions:
            assert 0 <= r["x0"] < r["x1"] <= 64 and 0 <= r["y0"] < r["y1"] <= 64
            assert r["area"] <= (r["x1"] - r["x0"]) * (r["y1"] - r["y0"]) and r["peak_score"] > 0.5
            assert mask[r["y0"] : r["y1"], r["x0"] : r["x1"]].any()
        assert (out / line["overlay"]).is_file()
        x, y = line["peak_x"], line["peak_y"]
        assert (int(row["peak_x"]), int(row["peak_y"])) == (x, y) and float(row["peak_score"]) == line["peak_score"]
        if regions:  # the map's highest pixel lies in a region, at the highest peak of all regions
            assert mask[y, x] and line["peak_score"] == max(r["peak_score"] for r in regions)
        else:
            assert line["peak_score"] <= 0.5
    assert any(int(r["num_regions"]) for r in rows)

    # The masks and scores are the model's own: its raw map above the run's threshold, computed here directly.
    model = flawscope.load_model(run)
    threshold = json.loads((run / "model" / "model.json").read_text())["calibration"]["threshold"]
    for line in lines:
        image = flawscope.preprocess(read_image(line["path"]), 64, 0)[None]
        with torch.no_grad():
            output = model(image)
        raw_map = output.anomaly_map[0, 0].numpy()
        np.testing.assert_array_equal(read_image(out / line["mask"])[..., 0] > 127, raw_map > threshold)
        assert line["raw_score"] == pytest.approx(float(output.pred_score[0]), rel=1e-5)
        assert line["decision"] == ("defective" if float(output.pred_score[0]) > threshold else "good")
    assert any(not line["regions"] for line in lines)  # some image has no region: the masks are not all-True

    # --min-area drops the small regions only.
    largest = max(r["area"] for line in lines for r in line["regions"])
    invoke("predict", run, images, "--out", tmp_path / "big", "--quiet", "--no-overlays", "--min-area", largest)
    kept = [json.loads(line) for line in (tmp_path / "big" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["area"] >= largest for line in kept for r in line["regions"])
    assert sum(len(line["regions"]) for line in kept) >= 1
    assert [line["norm_score"] for line in kept] == [line["norm_score"] for line in lines]  # scores unchanged


@pytest.fixture
def one_thread():
    # On a loaded 2-core machine two threads per op wait on each other; one thread is several times faster here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_prediction_streams_without_keeping_per_image_results(run, images, tmp_path, monkeypatch, one_thread):
    # 300 images; every Prediction is tracked by a weak reference, so the number still alive after each batch shows
    # whether anything keeps per-image results (maps, regions) until the end (CPython frees them on the last reference).
    folder = tmp_path / "many"
    folder.mkdir()
    sources = sorted(images.iterdir())
    for i in range(300):
        (folder / f"{i:03d}.png").symlink_to(sources[i % len(sources)])
    refs: list[weakref.ref] = []
    most_alive = 0
    load = prediction_module.load_inferencer

    def tracking_loader(*args, **kwargs):
        inferencer = load(*args, **kwargs)
        original = inferencer.predict

        def tracked(batch, min_area=0):
            nonlocal most_alive
            most_alive = max(most_alive, sum(ref() is not None for ref in refs))
            predictions = original(batch, min_area)
            refs.extend(weakref.ref(p) for p in predictions)
            return predictions

        inferencer.predict = tracked
        return inferencer

    monkeypatch.setattr(prediction_module, "load_inferencer", tracking_loader)
    csv_path = predict(run, [folder], tmp_path / "out", batch_size=16, overlays=False, quiet=True)
    assert most_alive <= 16  # at most the previous batch is still referenced when the next one starts
    rows = read_csv(csv_path)
    assert len(rows) == 300 and len(np.unique([r["path"] for r in rows])) == 300


def test_export_rejects_a_bad_batch(run):
    result = CliRunner().invoke(main, ["export", str(run), "--batch", "zero"])
    assert result.exit_code == 2 and "--batch must be 'dynamic' or an integer from 1 to 4096" in result.output


def test_a_generator_of_folders_is_checked_like_a_list(run, images, tmp_path):
    from flawscope.errors import ConfigError

    data = tmp_path / "data"
    shutil.copytree(images, data)
    with pytest.raises(ConfigError, match="inside the data folder"):
        predict(run, (p for p in [data]), data / "P", quiet=True)
    assert not (data / "P").exists()


def test_an_interrupted_predict_keeps_its_rows_and_lists_the_skipped_files(run, images, tmp_path, monkeypatch):
    data = tmp_path / "mixed"
    shutil.copytree(images, data)
    (data / "000_broken.png").write_bytes(b"not an image")  # sorted first: skipped before the interrupt
    calls, save_png = [], prediction_module.save_png

    def interrupt_on_the_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        save_png(*args)

    monkeypatch.setattr(prediction_module, "save_png", interrupt_on_the_third)
    result = CliRunner().invoke(
        main, ["predict", str(run), str(data), "--out", str(tmp_path / "P"), "--batch-size", "2"]
    )
    assert result.exit_code == 130 and "interrupted:" in result.stderr and "run the command again" in result.stderr
    rows = read_csv(tmp_path / "P" / "predictions.csv")
    assert len(rows) == 2  # batches: (broken, image 1), (image 2, image 3 interrupted while writing its overlay)
    assert len(list((tmp_path / "P" / "overlays").iterdir())) == 2  # every row written has its overlay
    assert [r["path"] for r in read_csv(tmp_path / "P" / "skipped.csv")] == [str(data / "000_broken.png")]


def test_progress_counts_images(run, images, tmp_path, capsys):
    predict(run, [images], tmp_path / "P", batch_size=4, overlays=False)
    count = len(list(images.iterdir()))
    err = capsys.readouterr().err
    assert f"0/{count} [" in err and "img/s" in err  # a total of images, not of batches of 4


def test_rows_give_each_files_upright_size_and_the_input_size(run, tmp_path):
    folder = tmp_path / "sizes"
    folder.mkdir()
    Image.new("RGB", (96, 40), (90, 120, 60)).save(folder / "wide.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80 x 30, shown rotated by 90 degrees: 30 wide, 80 high
    Image.new("RGB", (80, 30), (90, 120, 60)).save(folder / "rotated.jpg", exif=exif)
    invoke("predict", run, folder, "--out", tmp_path / "pred", "--quiet", "--no-overlays")
    rows = {Path(r["path"]).name: r for r in read_csv(tmp_path / "pred" / "predictions.csv")}
    assert [(rows[n]["width"], rows[n]["height"], rows[n]["input_size"]) for n in ("wide.png", "rotated.jpg")] == [
        ("96", "40", "64"),
        ("30", "80", "64"),
    ]
    lines = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert {(line["width"], line["height"], line["input_size"]) for line in lines} == {(96, 40, 64), (30, 80, 64)}


def test_export_takes_a_suffix_in_any_case(run, images, tmp_path):
    invoke("export", run, "--format", "onnx", "--out", tmp_path / "model.ONNX")
    invoke("predict", tmp_path / "model.ONNX", images, "--out", tmp_path / "pred", "--quiet", "--no-overlays")
    assert len(read_csv(tmp_path / "pred" / "predictions.csv")) == len(list(images.iterdir()))


def test_a_torchscript_file_is_loaded_only_when_trusted(exported, images, tmp_path):
    # Loading TorchScript runs code from the file; without --trust-code it is refused before it is opened.
    result = CliRunner().invoke(
        main, ["predict", str(exported["torchscript"]), str(images), "--out", str(tmp_path / "p"), "--quiet"]
    )
    assert result.exit_code != 0 and "runs the code it holds" in result.output and "--trust-code" in result.output
    assert not (tmp_path / "p").exists()
    # The library's parity check too: only export_checked, which has just written its file, trusts it unasked.
    from flawscope.errors import ConfigError
    from flawscope.export import check_parity, open_exported

    for call in (lambda: open_exported(exported["torchscript"]), lambda: check_parity(None, exported["torchscript"])):
        with pytest.raises(ConfigError, match="runs the code it holds"):
            call()


def test_predict_never_deletes_or_writes_through_a_linked_overlays_folder(run, images, tmp_path):
    out, photos = tmp_path / "pred", tmp_path / "photos"
    invoke("predict", run, images, "--out", out, "--quiet")
    photos.mkdir()
    for name in ("00001_part.png", "20240101_120000.png"):  # names like predict's own numbered overlays
        (photos / name).write_bytes(b"a user's picture")
    shutil.rmtree(out / "overlays")
    (out / "overlays").symlink_to(photos)
    invoke("predict", run, images, "--out", out, "--quiet", "--no-overlays")  # the stale-overlay cleanup skips it
    result = CliRunner().invoke(main, ["predict", str(run), str(images), "--out", str(out), "--quiet"])
    assert result.exit_code != 0 and "overlays as a symbolic link" in result.output
    assert sorted(p.name for p in photos.iterdir()) == ["00001_part.png", "20240101_120000.png"]


def test_predict_replaces_a_linked_overlay_file_instead_of_writing_through_it(run, images, tmp_path):
    out, victim = tmp_path / "pred", tmp_path / "victim.png"
    invoke("predict", run, images, "--out", out, "--quiet")
    victim.write_bytes(b"a user's picture")
    first = sorted((out / "overlays").iterdir())[0]
    first.unlink()
    first.symlink_to(victim)
    invoke("predict", run, images, "--out", out, "--quiet")
    assert victim.read_bytes() == b"a user's picture" and not first.is_symlink()


def test_predict_sees_a_quoted_home_folder_as_the_input_folder(run, images, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(images.parent))
    result = CliRunner().invoke(main, ["predict", str(run), f"~/{images.name}", "--out", f"~/{images.name}/res"])
    assert result.exit_code != 0 and "inside the data folder" in result.output
