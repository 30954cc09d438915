"""`flawscope bench` on the tiny generated set: settings parsing, the table, the JSON, the FLOP count."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from flawscope import bench
from flawscope.bench import count_flops, matmul_peak_gflops, parse_settings, render_markdown
from flawscope.cli import main
from flawscope.errors import ConfigError
from flawscope.registry import get_method


def test_settings_from_models_shared_and_per_model_options(tmp_path):
    settings = parse_settings("patchcore, simplenet", ["image_size=64", "simplenet:num_epochs=2"])
    assert [(s.name, s.method) for s in settings] == [("patchcore", "patchcore"), ("simplenet", "simplenet")]
    assert settings[0].options == {"image_size": "64"}
    assert settings[1].options == {"image_size": "64", "num_epochs": "2"}
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"pc-small": {"model": "patchcore", "options": {"coreset_ratio": 0.01}}}))
    (from_file,) = parse_settings(None, [], path)
    assert from_file.name == "pc-small" and from_file.options == {"coreset_ratio": 0.01}
    for name in ("../elsewhere", "/abs", "..", "a\\b"):  # each name is a folder in --out
        path.write_text(json.dumps({name: {"model": "patchcore"}}))
        with pytest.raises(ConfigError, match="used as a folder name in --out"):
            parse_settings(None, [], path)


@pytest.mark.parametrize(
    ("models", "overrides", "fragment"),
    [(None, [], "--models"), ("patchcore", ["x=1"], "'x'"), ("patchcore", ["patchcor:coreset_ratio=0.5"], "patchcor:")],
)
def test_bad_settings_fail_before_fitting(models, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_settings(models, overrides)


def test_a_setting_name_given_twice_or_options_not_an_object_are_refused(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"patchcore": {"model": "patchcore", "options": {"coreset_ratio": 0.5}}}))
    with pytest.raises(ConfigError, match="patchcore are given twice"):  # one run folder for two fits
        parse_settings("patchcore", [], path)
    with pytest.raises(ConfigError, match="given twice"):
        parse_settings("simplenet,simplenet")
    path.write_text(json.dumps({"a": {"model": "patchcore", "options": ["x"]}}))
    with pytest.raises(ConfigError, match="the options of 'a' must be a JSON object"):
        parse_settings(None, [], path)


def test_flop_count_matches_a_hand_count():
    # SimpleNet's FLOPs counted by hand, module by module: 2 per multiply-add of every product.
    method = get_method("simplenet")
    config = method.config_class.from_dict(
        {"backbone": "resnet18", "image_size": 64, "resize_size": 0, "embed_dim": 32, "discriminator_hidden": 16}
    )
    model = method.model_class(config, pretrained=False).eval()
    flops = count_flops(model, 64)

    def conv(c_in: int, c_out: int, k: int, side: int) -> int:  # 2 FLOPs per multiply-add, side x side outputs
        return 2 * c_in * c_out * k * k * side * side

    stem = conv(3, 64, 7, 32)  # then max-pooled to 16 x 16
    layer1 = 4 * conv(64, 64, 3, 16)
    layer2 = conv(64, 128, 3, 8) + 3 * conv(128, 128, 3, 8) + conv(64, 128, 1, 8)  # the 1x1 is the downsample
    layer3 = conv(128, 256, 3, 4) + 3 * conv(256, 256, 3, 4) + conv(128, 256, 1, 4)
    assert flops["backbone"] == stem + layer1 + layer2 + layer3  # SimpleNet stops after layer3 (stride 16)
    # The aggregator's 3x3 neighbourhoods are pooled to 32 by one matrix per stage, each on its own grid.
    aggregator = 2 * 8 * 8 * (128 * 9) * 32 + 2 * 4 * 4 * (256 * 9) * 32
    adaptor = 2 * 8 * 8 * 32 * 32  # on the 8 x 8 stride-8 grid
    discriminator = 2 * 8 * 8 * (32 * 16 + 16 * 1)
    blur = 2 * (2 * 64 * 64 * 64)  # the separable Gaussian as two (64, 64) products over the 64 x 64 map
    # Every FLOP is accounted for: nothing counted twice, nothing left out (the upsampling is not a product).
    assert flops["total"] == flops["backbone"] + aggregator + adaptor + discriminator + blur
    assert matmul_peak_gflops(threads=1, size=256, repeats=2) > 0


def test_bench_writes_one_table_and_json(tiny_dataset, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--data", tiny_dataset, "--models", "patchcore", "--out", out, "--threads", "1", "--repeats", "2"]
    args += ["--set", "backbone=efficientnet_lite0", "--set", "image_size=64", "--set", "resize_size=0"]
    args += ["--set", "coreset_ratio=0.5", "--set", "target_embed_dim=64", "--set", "pretrain_embed_dim=64"]
    threads = torch.get_num_threads()
    result = CliRunner().invoke(main, [str(a) for a in args])
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    (row,) = data["rows"]
    # The table reports the run's own test metrics, and they are those of a working model on this data.
    measured = json.loads((out / "patchcore" / "metrics.json").read_text())
    assert row["name"] == "patchcore"
    assert row["image_auroc"] == measured["image_auroc"] >= 0.6 and row["pixel_aupro"] == measured["pixel_aupro"]
    for runtime in ("torch", "onnxruntime"):
        assert row[runtime]["latency_ms"] > 0 and row[runtime]["images_per_second"] > 0
    assert row["parity_max_abs_norm"] <= 1e-4 and row["peak_mib"] > 0 and row["gflop_per_image"] > 0
    assert row["peak_fraction"] == pytest.approx(
        row["gflop_per_image"] * row["torch"]["images_per_second"] / data["matmul_peak_gflops"]
    )
    assert data["environment"]["threads"] == 1 and data["environment"]["onnxruntime"]
    table = (out / "bench.md").read_text()
    assert "| patchcore |" in table and "GFLOP/s" in table and "onnxruntime" in table
    assert row["cpu"] == data["environment"]["cpu"] and f"Hardware: {row['cpu']}, " in table
    assert (data["category"], data["layout"], data["seed"], data["environment"]["seed"]) == ("grass", "mvtec", 0, 0)
    assert f"Data: `{tiny_dataset}` (category grass), seed 0." in table

    # Rows merged from runs on different machines name the CPU of each row.
    other = {**row, "name": "patchcore-elsewhere", "cpu": "Another CPU"}
    mixed = render_markdown({**data, "rows": [row, other]})
    assert f"Hardware: {row['cpu']} (patchcore); Another CPU (patchcore-elsewhere), " in mixed
    assert row["test_images"] == measured["num_images"] and row["excluded_seen"] == 0
    assert "Test images differ" not in mixed
    # A few-shot row tested without its seen defects is named, with how to compare on one split.
    few_shot = {**row, "name": "prn", "test_images": row["test_images"] - 2, "excluded_seen": 2}
    note = render_markdown({**data, "rows": [row, few_shot]})
    assert (
        f"Test images differ between rows: patchcore {row['test_images']}, prn {row['test_images'] - 2} (2 seen" in note
    )
    assert "--exclude-seen-of" in note
    # Rows kept from runs before the counts were recorded are left out of the comparison, not listed as None.
    older = {k: v for k, v in few_shot.items() if k not in ("test_images", "excluded_seen")}
    assert "Test images differ" not in render_markdown({**data, "rows": [row, older]})


def test_bench_without_a_category_on_several_fails_before_any_work(tiny_dataset, tmp_path):
    import shutil

    for name in ("brick", "grass"):
        shutil.copytree(tiny_dataset, tmp_path / "data" / name)
    args = ["bench", "--data", tmp_path / "data", "--models", "patchcore", "--out", tmp_path / "bench"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0 and "holds several categories; found categories: brick, grass" in result.stderr
    assert not (tmp_path / "bench").exists()


def test_peak_memory_is_measured_where_the_system_can(monkeypatch):
    assert bench.peak_memory_mib() > 10  # this process has torch loaded
    monkeypatch.setitem(sys.modules, "resource", None)  # as on Windows, which has no resource module
    assert bench.peak_memory_mib() is None


def test_bench_refuses_a_table_file_name_and_a_shared_option_one_model_lacks(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"bench.md": {"model": "patchcore"}}))
    with pytest.raises(ConfigError, match="bench's own table file"):
        parse_settings(None, [], path)
    # num_epochs is SimpleNet's, not PatchCore's: the error says how to give it to one model.
    with pytest.raises(ConfigError, match="patchcore \\(patchcore\\) has no option 'num_epochs'.*--set MODEL:num_ep"):
        parse_settings("simplenet,patchcore", ["num_epochs=2"])


def test_bench_fails_before_the_first_fit_when_a_later_setting_cannot_start(tiny_dataset, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--data", tiny_dataset, "--models", "patchcore,efficientad", "--out", out]
    args += ["--set", "image_size=64", "--set", "resize_size=0", "--set", "patchcore:backbone=efficientnet_lite0"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "bench setting efficientad (efficientad) cannot start" in result.stderr and "distill" in result.stderr
    assert not out.exists()  # patchcore was not fitted first


def test_bench_keeps_the_rows_before_a_setting_that_fails(tiny_dataset, tmp_path, monkeypatch):
    def fake_setting(setting, *args):  # a row without the work; the second setting fails
        if setting.name == "simplenet":
            raise MemoryError("out of memory in the second row")
        timing = {"latency_ms": 5.0, "images_per_second": 100.0}
        accuracy = {"image_auroc": 0.9, "pixel_auroc": 0.8, "pixel_aupro": 0.7, "fit_seconds": 1.0}
        sizes = {"gflop_per_image": 1.0, "peak_mib": 1.0}
        return {"name": setting.name, **accuracy, "torch": timing, "onnxruntime": timing, **sizes}

    monkeypatch.setattr(bench, "bench_setting", fake_setting)
    monkeypatch.setattr(bench, "matmul_peak_gflops", lambda threads: 100.0)
    settings = parse_settings("patchcore,simplenet", ["backbone=efficientnet_lite0", "image_size=64", "resize_size=0"])
    with pytest.raises(MemoryError):
        bench.run_bench(tiny_dataset, settings, tmp_path / "bench", threads=1, isolate=False, progress=lambda _: None)
    data = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["patchcore"]
    assert "| patchcore |" in (tmp_path / "bench" / "bench.md").read_text()
