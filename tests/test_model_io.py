"""Tests of flawscope.model_io on damaged model.json files (no weights are needed to reach these errors), and the
permissions of the weight files it writes."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import flawscope
from flawscope.errors import ConfigError, ModelFormatError
from flawscope.model_io import load_model, read_model_info
from flawscope.runs import save_safetensors

GOOD_INFO = {"format": 1, "method": "patchcore", "config": {"backbone": "efficientnet_lite0", "image_size": 64}}


def _run_with_model_json(tmp_path: Path, content: str) -> Path:
    """A run folder whose model/model.json holds ``content`` (and no weights)."""
    (tmp_path / "model").mkdir(parents=True)
    (tmp_path / "model" / "model.json").write_text(content)
    return tmp_path


@pytest.mark.parametrize("content", ["[1, 2]", "null", '"model"', "3"])
def test_model_json_that_is_not_an_object(tmp_path, content):
    run = _run_with_model_json(tmp_path, content)
    for load in (read_model_info, load_model):
        with pytest.raises(
            ModelFormatError,
            match=r"model/model\.json holds .* where a JSON object is expected.*"
            r"damaged; re-run `flawscope fit` or re-copy",
        ):
            load(run)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("config", None, "lacks the 'config' key"),
        ("method", None, "lacks the 'method' key"),
        ("config", [1], "has a 'config' that is not a JSON object"),
        ("method", 7, "has a 'method' that is not a JSON string"),
    ],
)
def test_model_json_without_method_or_config(tmp_path, key, value, problem):
    info = {k: v for k, v in GOOD_INFO.items() if k != key or value is not None}
    if value is not None:
        info[key] = value
    run = _run_with_model_json(tmp_path, json.dumps(info))
    for load in (read_model_info, load_model):
        with pytest.raises(ModelFormatError, match=rf"model/model\.json {problem}\. The model folder is damaged"):
            load(run)


@pytest.mark.parametrize(
    "calibration",
    [
        None,
        [1],
        {"threshold": None, "score_low": 0},
        {"threshold": "hi", "score_low": 0},
        {"threshold": 1.0},
        {"threshold": float("nan"), "score_low": 0},
        {"threshold": True, "score_low": 0},
    ],
)
def test_model_json_with_a_damaged_calibration(tmp_path, calibration):
    run = _run_with_model_json(tmp_path, json.dumps({**GOOD_INFO, "calibration": calibration}))
    for load in (read_model_info, load_model):
        with pytest.raises(
            ModelFormatError,
            match=r"model/model\.json has a 'calibration' that is not a JSON object with finite numbers for threshold "
            r"and score_low .*damaged",
        ):
            load(run)
    good = {**GOOD_INFO, "calibration": {"threshold": 2.5, "score_low": 1}}
    assert read_model_info(_run_with_model_json(tmp_path / "good", json.dumps(good)))["calibration"]["threshold"] == 2.5


@pytest.mark.parametrize(
    ("change", "original"),
    [
        ({"config": {**GOOD_INFO["config"], "image_size": "abc"}}, "The 'image_size' parameter of PatchCoreConfig"),
        ({"method": "nosuch"}, "Unknown model 'nosuch'"),
    ],
)
def test_invalid_value_in_model_json_names_the_file(tmp_path, change, original):
    run = _run_with_model_json(tmp_path, json.dumps({**GOOD_INFO, **change}))
    with pytest.raises(ConfigError, match=rf"model/model\.json: {original}.*re-run `flawscope fit`"):
        load_model(run)


def test_saved_weights_are_readable_as_the_umask_allows(tmp_path):
    # safetensors 0.8 writes 0600 files; a model folder handed to a service account must be readable by it.
    previous = os.umask(0o022)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "a.safetensors", {"k": "v"})
        os.umask(0o077)
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "b.safetensors", {"k": "v"})
    finally:
        os.umask(previous)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == 0o600


def test_weights_of_another_method_are_refused_even_with_a_matching_hash(tmp_path):
    # A weights file swapped in from another run, with model.json's hash updated to match: the method recorded in
    # the file's own header still tells them apart (no backbone is built to reach this check).
    run = _run_with_model_json(tmp_path, "{}")
    weights = run / "model" / "weights.safetensors"
    save_safetensors({"w": torch.zeros(2)}, weights, {"flawscope": json.dumps({"format": 1, "method": "simplenet"})})
    info = {**GOOD_INFO, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    (run / "model" / "model.json").write_text(json.dumps(info))
    with pytest.raises(ModelFormatError, match="holds a simplenet model but model.json says patchcore"):
        load_model(run)


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, '{"format": 1' + "0" * 5000 + "}"])
def test_model_json_too_deep_or_too_long_is_a_clean_error(tmp_path, content):
    run = _run_with_model_json(tmp_path, content)
    with pytest.raises(ModelFormatError, match="is not valid JSON"):
        read_model_info(run)


def test_model_json_with_calibration_details_that_are_not_an_object(tmp_path):
    run = _run_with_model_json(tmp_path, json.dumps({**GOOD_INFO, "calibration_details": [1]}))
    with pytest.raises(ModelFormatError, match="has a 'calibration_details' that is not a JSON object"):
        read_model_info(run)


@pytest.fixture(scope="module")
def fitted(tiny_dataset, tmp_path_factory) -> Path:
    options = {"backbone": "efficientnet_lite0", "image_size": 64, "resize_size": 0, "coreset_ratio": 0.1}
    return flawscope.fit("patchcore", tiny_dataset, tmp_path_factory.mktemp("io") / "run", options=options, quiet=True)


def _with_weights(run: Path, tmp_path: Path, change) -> Path:
    """A copy of ``run``'s model folder whose weights ``change`` edited (model.json's hash dropped, as an attacker
    would)."""
    copy = tmp_path / "edited"
    shutil.copytree(run / "model", copy)
    with safe_open(str(copy / "weights.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(copy / "weights.safetensors"))
    change(state)
    save_safetensors(state, copy / "weights.safetensors", metadata)
    info = json.loads((copy / "model.json").read_text())
    del info["weights_sha256"]
    (copy / "model.json").write_text(json.dumps(info))
    return copy


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_threshold_that_is_not_finite_is_refused(fitted, tmp_path, value):
    # A NaN threshold would call every image good: comparisons with NaN are False.
    edited = _with_weights(fitted, tmp_path, lambda state: state["threshold"].fill_(value))
    with pytest.raises(ModelFormatError, match="must be finite numbers"):
        load_model(edited)


def test_a_buffer_with_other_dimensions_is_refused(fitted, tmp_path):
    edited = _with_weights(fitted, tmp_path, lambda state: state.update(threshold=torch.zeros(1000)))
    with pytest.raises(ModelFormatError, match=r"threshold has shape \(1000,\), expected 0 dimensions"):
        load_model(edited)


@pytest.fixture(scope="module")
def simplenet_run(tiny_dataset, tmp_path_factory) -> Path:
    options = {"backbone": "efficientnet_lite0", "image_size": 64, "resize_size": 0, "num_epochs": 1, "embed_dim": 64}
    return flawscope.fit("simplenet", tiny_dataset, tmp_path_factory.mktemp("io") / "sn", options=options, quiet=True)


def test_a_folder_from_before_a_layer_was_added_loads_with_it_unfitted(simplenet_run, tmp_path):
    # Folders written before per-position whitening existed have no whitening.* entries; the layer is empty until
    # fitted, which is what they mean. With feature_norm=position, missing statistics are damage, not age.
    def drop_whitening(state: dict) -> None:
        names = [name for name in state if name.startswith("whitening.")]
        assert sorted(names) == ["whitening.matrix", "whitening.mean"]
        for name in names:
            del state[name]

    reference = load_model(simplenet_run)
    old = _with_weights(simplenet_run, tmp_path, drop_whitening)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(old)(images).pred_score, reference(images).pred_score)
    info = json.loads((old / "model.json").read_text())
    info["config"]["feature_norm"] = "position"
    (old / "model.json").write_text(json.dumps(info))
    with pytest.raises(ModelFormatError, match="has no whitening statistics .* feature_norm=position"):
        load_model(old)


@pytest.mark.parametrize("name", ["memory_bank", "bank_neighbors"])
def test_a_missing_entry_that_starts_empty_is_still_damage(fitted, tmp_path, name):
    # Only a whitening layer missing whole is read as age; a memory bank that starts empty must be in the file.
    edited = _with_weights(fitted, tmp_path, lambda state: state.pop(name))
    with pytest.raises(ModelFormatError, match=rf"does not fit PatchCore: missing \['{name}'\]"):
        load_model(edited)


def test_half_a_whitening_layer_is_damage(simplenet_run, tmp_path):
    edited = _with_weights(simplenet_run, tmp_path, lambda state: state.pop("whitening.matrix"))
    with pytest.raises(ModelFormatError, match=r"missing \['whitening.matrix'\]"):
        load_model(edited)
