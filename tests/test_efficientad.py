"""EfficientAD: layer tables and parameter counts of the spec, the losses, the map normalisation, the inference
graph against a direct transcription of the spec's pseudocode, teacher files, distillation and a short fit."""

import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flawscope.cli import main
from flawscope.data import find_images, load_dataset, split_validation
from flawscope.errors import ConfigError, DataError, ModelFormatError, WeightsNotFoundError
from flawscope.fitting import FitContext, autocast
from flawscope.model_io import load_model, save_model
from flawscope.models.efficientad import PDN, AutoEncoder, EfficientAD, EfficientADConfig, fit
from flawscope.models.efficientad.distill import DistillSettings, distill_teacher
from flawscope.models.efficientad.fit import (
    color_augment,
    hard_feature_loss,
    map_quantiles,
    mean_squared_difference,
    penalty_loss,
    random_grayscale,
    teacher_channel_stats,
    tensor_quantile,
    train,
    training_losses,
)
from flawscope.models.efficientad.model import load_teacher, quantile_normalize
from flawscope.runs import file_sha256

TINY = {"image_size": 64, "num_steps": 3}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tiny(**changes) -> EfficientAD:
    torch.manual_seed(0)
    return EfficientAD(EfficientADConfig.from_dict({**TINY, **changes}), pretrained=False)


# --- architecture (spec 2.3-2.6) ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "teacher", "student", "total"),
    [("small", 2_694_144, 4_267_392, 8_057_856), ("medium", 8_026_624, 11_615_488, 20_738_432)],
)
def test_parameter_counts_match_the_spec(size, teacher, student, total):
    with torch.device("meta"):  # shapes and counts without allocating or initialising anything
        model = EfficientAD(EfficientADConfig(size=size), pretrained=False)
    assert _count(model.teacher) == teacher
    assert _count(model.student) == student
    assert _count(model.autoencoder) == 1_096_320
    assert _count(model) == total  # spec 2.5: 8.06 M (S) and 20.74 M (M)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def _convs(module):
    return [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) for m in module.modules()
            if isinstance(m, torch.nn.Conv2d)]  # fmt: skip


def test_pdn_layer_tables():
    assert _convs(PDN("small", 384)) == [
        (3, 128, 4, 1, 3), (128, 256, 4, 1, 3), (256, 256, 3, 1, 1), (256, 384, 4, 1, 0),
    ]  # fmt: skip
    assert _convs(PDN("small", 768, padded=False)) == [
        (3, 128, 4, 1, 0), (128, 256, 4, 1, 0), (256, 256, 3, 1, 0), (256, 768, 4, 1, 0),
    ]  # fmt: skip
    assert _convs(PDN("medium", 384)) == [
        (3, 256, 4, 1, 3), (256, 512, 4, 1, 3), (512, 512, 1, 1, 0), (512, 512, 3, 1, 1), (512, 384, 4, 1, 0),
        (384, 384, 1, 1, 0),
    ]  # fmt: skip
    pools = [m for m in PDN("small", 384).modules() if isinstance(m, torch.nn.AvgPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(2, 2, 1), (2, 2, 1)]
    # ReLU after every conv except the last; PDN-M has one after Conv-5 too (spec 2.4).
    names = [name for name, _ in PDN("medium", 384).named_children()]
    assert names[-3:] == ["conv5", "relu5", "conv6"]
    assert list(dict(PDN("small", 384).named_children()))[-1] == "conv4"


@pytest.mark.parametrize(("size", "padded", "side"), [("small", True, 64), ("small", False, 56), ("medium", True, 64)])
def test_pdn_output_grid_at_256(size, padded, side):
    with torch.device("meta"):
        out = PDN(size, 384, padded)(torch.empty(1, 3, 256, 256))
    assert out.shape == (1, 384, side, side)


def test_autoencoder_layer_shapes_follow_the_table():
    with torch.device("meta"):
        ae = AutoEncoder(384, 256, 64)
        x, shapes = torch.empty(1, 3, 256, 256), []
        for name, layer in [*ae.encoder.named_children(), *ae.decoder.named_children()]:
            x = layer(x)
            if "conv" in name or "upsample" in name:
                shapes.append(tuple(x.shape[1:]))
    assert shapes[:6] == [(32, 128, 128), (32, 64, 64), (64, 32, 32), (64, 16, 16), (64, 8, 8), (64, 1, 1)]
    sides = [s[1] for s in shapes[6:]]
    assert sides == [3, 4, 8, 9, 15, 16, 32, 33, 63, 64, 127, 128, 64, 64, 64]
    assert shapes[-1] == (384, 64, 64)
    dropouts = [m for m in ae.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 6 and all(d.p == 0.2 for d in dropouts)


def test_pdn_receptive_field_is_33_pixels():
    torch.manual_seed(0)
    pdn = PDN("small", 8, padded=False)
    image = torch.rand(1, 3, 64, 64, requires_grad=True)
    out = pdn(image)
    out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    rows, cols = torch.nonzero(image.grad[0].abs().sum(0), as_tuple=True)
    assert int(rows.max() - rows.min()) + 1 == 33 and int(cols.max() - cols.min()) + 1 == 33


def test_config_defaults_and_checks():
    cfg = EfficientADConfig()
    assert (cfg.size, cfg.padding, cfg.image_size, cfg.resize_size, cfg.batch_size) == ("small", "paper", 256, 0, 1)
    assert (cfg.num_steps, cfg.lr, cfg.weight_decay, cfg.hard_quantile) == (70_000, 1e-4, 1e-5, 0.999)
    assert (cfg.quantile_a, cfg.quantile_b, cfg.penalty_images, cfg.teacher_path) == (0.9, 0.995, "", "")
    with pytest.raises(ConfigError, match="divisible by 32"):
        EfficientADConfig(image_size=100)
    with pytest.raises(ConfigError, match="quantile_a"):
        EfficientADConfig(quantile_a=0.99, quantile_b=0.9)


# --- losses (spec 2.8) ----------------------------------------------------------------------------------------------


def test_hard_feature_loss_on_hand_made_tensors():
    teacher = torch.zeros(1, 1, 2, 5)
    student = torch.arange(10.0).view(1, 1, 2, 5).requires_grad_()  # D = 0, 1, 4, ..., 81
    # p = 0.9: position 8.1 -> d_hard = 64 + 0.1 * (81 - 64) = 65.7, only 81 is kept.
    assert hard_feature_loss(teacher, student, 0.9).item() == pytest.approx(81.0)
    # p = 0.5: d_hard = (16 + 25) / 2 -> mean of 25, 36, 49, 64, 81.
    assert hard_feature_loss(teacher, student, 0.5).item() == pytest.approx(51.0)
    # p = 0 is the plain student-teacher loss.
    assert hard_feature_loss(teacher, student, 0.0).item() == pytest.approx(28.5)
    hard_feature_loss(teacher, student, 0.5).backward()
    kept = torch.arange(10.0) >= 5
    assert (student.grad.flatten()[~kept] == 0).all() and (student.grad.flatten()[kept] != 0).all()


def test_hard_feature_loss_at_0999_equals_direct_computation():
    generator = torch.Generator().manual_seed(0)
    teacher, student = (torch.randn(1, 384, 16, 16, generator=generator) for _ in range(2))
    distance = (teacher - student) ** 2
    expected = distance[distance >= torch.quantile(distance.flatten(), 0.999)].mean()
    assert hard_feature_loss(teacher, student, 0.999).item() == pytest.approx(expected.item(), rel=1e-6)
    assert (distance >= torch.quantile(distance.flatten(), 0.999)).sum() == math.ceil(0.001 * distance.numel())


def test_tensor_quantile_matches_torch_quantile():
    values = torch.randn(10_001, generator=torch.Generator().manual_seed(1))
    for q in (0.0, 0.1, 0.5, 0.9, 0.995, 0.999, 1.0):
        assert tensor_quantile(values, q).item() == pytest.approx(torch.quantile(values, q).item(), rel=1e-5)


def test_penalty_and_mean_squared_losses_on_hand_made_tensors():
    student_penalty = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2)
    assert penalty_loss(student_penalty).item() == pytest.approx((1 + 4 + 9 + 0) / 4)
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 6.0])
    assert mean_squared_difference(a, b).item() == pytest.approx((0 + 4 + 9) / 3)


def test_training_losses_match_the_pseudocode_and_feed_the_autoencoder_from_stae():
    model = _tiny(out_channels=8)
    model.teacher_mean.normal_()
    model.teacher_std.uniform_(0.5, 2.0)
    model.eval()  # dropout off, so the direct computation below sees the same autoencoder output
    generator = torch.Generator().manual_seed(0)
    image, augmented, penalty = (torch.rand(1, 3, 64, 64, generator=generator) for _ in range(3))
    losses = training_losses(model, image, augmented, penalty)
    norm = model.normalize_images
    t = (model.teacher(norm(image)) - model.teacher_mean) / model.teacher_std
    t_aug = (model.teacher(norm(augmented)) - model.teacher_mean) / model.teacher_std
    a = model.autoencoder(norm(augmented))
    distance = (t - model.student(norm(image))[:, :8]) ** 2
    expected = {
        "hard": distance[distance >= torch.quantile(distance.flatten(), 0.999)].mean(),
        "penalty": (model.student(norm(penalty))[:, :8] ** 2).mean(),
        "ae": ((t_aug - a) ** 2).mean(),
        "stae": ((a - model.student(norm(augmented))[:, 8:]) ** 2).mean(),
    }
    assert set(losses) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-4, atol=1e-6)
    losses["stae"].backward()  # A is not detached in L_STAE (spec 2.8)
    assert model.autoencoder.decoder.deconv8.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_bfloat16_training_agrees_with_float32_and_keeps_float32_weights():
    model = _tiny(out_channels=8)
    model.eval()  # dropout off: the two precisions see the same network
    generator = torch.Generator().manual_seed(0)
    image, augmented = (torch.rand(1, 3, 64, 64, generator=generator) for _ in range(2))
    exact = training_losses(model, image, augmented, None)
    model.config = EfficientADConfig.from_dict({**TINY, "out_channels": 8, "train_precision": "bfloat16"})
    mixed = training_losses(model, image, augmented, None)
    for key, value in exact.items():
        assert mixed[key].dtype == torch.float32
        assert not torch.equal(mixed[key], value)  # the forward pass did run in bfloat16
        torch.testing.assert_close(mixed[key], value, rtol=0.05, atol=1e-3)
    sum(mixed.values()).backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.student.parameters())
    with pytest.raises(ConfigError, match="train_precision"):
        EfficientADConfig.from_dict({"train_precision": "float16"})
    with pytest.raises(ValueError, match="train_precision"):
        autocast("float16", torch.device("cpu"))


def test_augmentations():
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = color_augment(images, 0.2, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    for image, result in zip(images, out, strict=True):  # each is one adjustment with a factor in [0.8, 1.2]
        candidates = [fn(image, f) for fn in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
                      for f in np.linspace(0.8, 1.2, 401)]  # fmt: skip
        assert min(float((c - result).abs().max()) for c in candidates) < 2e-3
    generator = torch.Generator()
    assert torch.equal(random_grayscale(images, 0.0, generator), images)
    gray = random_grayscale(images, 1.0, generator)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray, TF.rgb_to_grayscale(images, 3))


# --- normalisation and the inference graph (spec 2.8-2.10) ----------------------------------------------------------


def test_quantile_normalize_maps_qa_to_0_and_qb_to_01():
    qa, qb = torch.tensor(2.0), torch.tensor(3.0)
    out = quantile_normalize(torch.tensor([2.0, 3.0, 2.5, 4.0]), qa, qb)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.1, 0.05, 0.2]))


@pytest.mark.parametrize("weight", [0.5, 1.0, 0.2])
def test_combined_map_weighs_the_normalised_maps(weight):
    model = _tiny(out_channels=8, map_weight_st=weight).eval()
    model.qa_st, model.qb_st, model.qa_ae, model.qb_ae = (torch.tensor(v) for v in (0.1, 0.5, 0.2, 0.3))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        map_st, map_ae = model.raw_maps(images)
        anomaly_map, score = model.raw_scores(images)
    expected = weight * 0.1 * (map_st - 0.1) / 0.4 + (1 - weight) * 0.1 * (map_ae - 0.2) / 0.1
    expected = F.interpolate(expected, size=64, mode="bilinear", align_corners=False)
    torch.testing.assert_close(anomaly_map, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score, expected.flatten(1).amax(1), rtol=1e-5, atol=1e-6)


def test_teacher_stats_equal_direct_population_statistics():
    model = _tiny(out_channels=8)
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mean, std = teacher_channel_stats(model, iter(images.split(2)), torch.device("cpu"))
    with torch.no_grad():
        out = model.teacher(model.normalize_images(images)).transpose(0, 1).flatten(1)  # (C, N)
    torch.testing.assert_close(mean.flatten(), out.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std.flatten(), out.std(1, unbiased=False), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("padding", ["paper", "code"])
def test_map_quantiles_send_validation_quantiles_to_0_and_01(tiny_dataset, padding):
    model = _tiny(out_channels=8, padding=padding).eval()
    samples = load_dataset(tiny_dataset).train[:4]
    map_quantiles(model, samples, FitContext(quiet=True))
    images = _images(samples)
    with torch.no_grad():
        map_st, _ = model.raw_maps(images)
    if padding == "paper":  # quantiles taken on maps resized to the input (appendix), raw grid otherwise
        map_st = F.interpolate(map_st, size=64, mode="bilinear", align_corners=False)
    normalised = quantile_normalize(map_st, model.qa_st, model.qb_st)
    assert tensor_quantile(normalised, 0.9).item() == pytest.approx(0.0, abs=1e-6)
    assert tensor_quantile(normalised, 0.995).item() == pytest.approx(0.1, abs=1e-6)


@pytest.mark.parametrize("padding", ["paper", "code"])
def test_gaussian_map_normalization_standardises_the_validation_maps(tiny_dataset, padding):
    # The ablation baseline of the paper's Table 4: each map's validation pixels to mean 0 and std 1.
    model = _tiny(out_channels=8, padding=padding, map_normalization="gaussian").eval()
    samples = load_dataset(tiny_dataset).train[:4]
    map_quantiles(model, samples, FitContext(quiet=True))
    images = _images(samples)
    with torch.no_grad():
        maps = model.raw_maps(images)
    for raw, qa, qb in zip(maps, (model.qa_st, model.qa_ae), (model.qb_st, model.qb_ae), strict=True):
        if padding == "paper":
            raw = F.interpolate(raw, size=64, mode="bilinear", align_corners=False)
        normalised = quantile_normalize(raw, qa, qb).double()
        assert normalised.mean().item() == pytest.approx(0.0, abs=1e-4)
        assert normalised.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ConfigError, match="'map_normalization'.*one of 'quantile', 'gaussian'"):
        EfficientADConfig(**TINY, map_normalization="minmax")


def test_quantile_images_replace_the_held_out_share(tiny_dataset, tmp_path):
    folder = tiny_dataset / "test" / "good"
    model = _tiny(out_channels=8, num_steps=1, quantile_images=str(folder))
    train = load_dataset(tiny_dataset).train
    report = fit(model, train, FitContext(quiet=True))
    assert report["num_train"] == len(train)  # nothing held out
    assert report["validation_images"] == [str(p) for p in find_images(folder)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="quantile_images="):
        fit(_tiny(out_channels=8, num_steps=1, quantile_images=str(tmp_path / "empty")), train, FitContext(quiet=True))
    # One training image and no quantile folder: the hold-out leaves nothing; the way out is quantile_images.
    with pytest.raises(DataError, match=r"validation_ratio=0\.1 .*--set quantile_images=DIR"):
        fit(_tiny(out_channels=8, num_steps=1), train[:1], FitContext(quiet=True))
    one = fit(_tiny(out_channels=8, num_steps=1, quantile_images=str(folder)), train[:1], FitContext(quiet=True))
    assert one["num_train"] == 1


def _images(samples):
    batch = next(iter(FitContext(quiet=True).loader(samples, EfficientADConfig(**TINY), batch_size=len(samples))))
    return batch["image"]


@pytest.mark.parametrize("padding", ["paper", "code"])
def test_raw_scores_equal_the_spec_pseudocode(padding):
    model = _tiny(out_channels=8, padding=padding).eval()
    for name, value in {"qa_st": 0.5, "qb_st": 0.9, "qa_ae": 0.01, "qb_ae": 0.05}.items():
        getattr(model, name).fill_(value)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        anomaly_map, score = model.raw_scores(images)
        x = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
            1, 3, 1, 1
        )
        t = (model.teacher(x) - model.teacher_mean) / model.teacher_std
        s, a = model.student(x), model.autoencoder(x)
        m_st = ((t - s[:, :8]) ** 2).mean(1, keepdim=True)
        m_ae = ((a - s[:, 8:]) ** 2).mean(1, keepdim=True)
        m = 0.5 * 0.1 * (m_st - 0.5) / (0.9 - 0.5) + 0.5 * 0.1 * (m_ae - 0.01) / (0.05 - 0.01)
        if padding == "code":
            m = F.pad(m, (4, 4, 4, 4))
        expected = F.interpolate(m, size=64, mode="bilinear", align_corners=False)
    torch.testing.assert_close(anomaly_map, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(score, expected.flatten(1).amax(1), rtol=1e-4, atol=1e-6)
    assert m.shape[-1] == 16  # 64 px: padded grid 16, unpadded 8 + 2 x 4


# --- teacher files --------------------------------------------------------------------------------------------------


def test_fitting_without_a_teacher_is_refused_with_the_recipe(tmp_path, tiny_dataset):
    args = ["fit", "--model", "efficientad", "--data", tiny_dataset, "--out", tmp_path / "run", "--image-size", "64"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "flawscope distill" in result.output and "teacher_path" in result.output
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"flawscope distill .*teacher_path="):
        EfficientAD(EfficientADConfig(**TINY))
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        EfficientAD(EfficientADConfig(**TINY, teacher_path=str(tmp_path / "missing.safetensors")))


def test_teacher_files_load_by_name_or_order_and_check_the_size(tmp_path):
    torch.manual_seed(1)
    pdn = PDN("small", 384)
    save_file(pdn.state_dict(), str(tmp_path / "t.safetensors"), metadata={"flawscope_teacher": '{"size": "small"}'})
    model = EfficientAD(EfficientADConfig(**TINY, teacher_path=str(tmp_path / "t.safetensors")))
    assert all(torch.equal(model.teacher.state_dict()[k], v) for k, v in pdn.state_dict().items())
    # A plain torch state dict with nn.Sequential numbering (the public code's PDN) maps by order.
    numbered = dict(zip(["0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias", "8.weight", "8.bias"],
                        pdn.state_dict().values(), strict=True))  # fmt: skip
    torch.save(numbered, tmp_path / "t.pth")
    model = EfficientAD(EfficientADConfig(**TINY), weights_path=tmp_path / "t.pth")
    assert torch.equal(model.teacher.conv4.weight, pdn.conv4.weight)
    assert model.config.teacher_path == str(tmp_path / "t.pth")
    torch.save(pdn, tmp_path / "module.pth")  # a pickled module is refused, never unpickled
    with pytest.raises(ModelFormatError, match="never unpickles"):
        EfficientAD(EfficientADConfig(**TINY), weights_path=tmp_path / "module.pth")
    with pytest.raises(ConfigError, match="size=small"):
        EfficientAD(EfficientADConfig(**TINY, size="medium", teacher_path=str(tmp_path / "t.safetensors")))


def test_a_teacher_distilled_at_another_input_size_is_named_in_a_warning(tmp_path, recwarn):
    pdn = PDN("small", 384)
    meta = {"flawscope_teacher": json.dumps({"size": "small", "image_size": TINY["image_size"] * 2})}
    save_file(pdn.state_dict(), str(tmp_path / "t.safetensors"), metadata=meta)
    with pytest.warns(UserWarning, match=rf"distilled at {TINY['image_size'] * 2} px .* --image-size"):
        EfficientAD(EfficientADConfig(**TINY, teacher_path=str(tmp_path / "t.safetensors")))
    meta = {"flawscope_teacher": json.dumps({"size": "small", "image_size": TINY["image_size"]})}
    save_file(pdn.state_dict(), str(tmp_path / "same.safetensors"), metadata=meta)
    recwarn.clear()
    EfficientAD(EfficientADConfig(**TINY, teacher_path=str(tmp_path / "same.safetensors")))
    assert not [w for w in recwarn if "distilled at" in str(w.message)]
    assert not [w for w in recwarn if "does not use backbone" in str(w.message)]
    teacher = str(tmp_path / "same.safetensors")
    with pytest.warns(UserWarning, match="does not use backbone=efficientnet_lite0.*distill --backbone efficientnet_l"):
        EfficientAD(EfficientADConfig(**TINY, backbone="efficientnet_lite0", teacher_path=teacher))
    # No warning when the teacher was distilled from the named backbone.
    meta = {"flawscope_teacher": json.dumps({"size": "small", "image_size": TINY["image_size"], "backbone": "x"})}
    save_file(pdn.state_dict(), str(tmp_path / "from_x.safetensors"), metadata=meta)
    recwarn.clear()
    EfficientAD(EfficientADConfig(**TINY, backbone="x", teacher_path=str(tmp_path / "from_x.safetensors")))
    assert not [w for w in recwarn if "does not use backbone" in str(w.message)]


# --- distillation and an end-to-end run -----------------------------------------------------------------------------

SETTINGS = DistillSettings(size="small", steps=2, batch_size=2, image_size=64, stats_images=2)


def test_interrupted_distillation_says_which_checkpoint_a_rerun_resumes_from(tiny_dataset, tmp_path, monkeypatch):
    from flawscope.models.efficientad import distill

    calls = []
    real = distill.grayscale_decisions

    def interrupt_on_the_fourth_call(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(distill, "grayscale_decisions", interrupt_on_the_fourth_call)
    args = ["distill", "--backbone", "efficientnet_lite0", "--images", str(tiny_dataset / "train"), "--quiet"]
    args += ["--out", str(tmp_path / "t.safetensors"), "--steps", "5", "--batch-size", "2", "--image-size", "64"]
    args += ["--stats-images", "2", "--checkpoint-every", "1", "--num-workers", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    done = re.search(
        r"interrupted after (\d) of 5 steps; the checkpoint \S+ holds step (\d): run the same", result.output
    )
    assert done and done.group(1) == done.group(2) and int(done.group(1)) >= 2
    monkeypatch.setattr(distill, "grayscale_decisions", real)
    resumed = CliRunner().invoke(main, [a for a in args if a != "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming from {tmp_path / 't.safetensors.ckpt.safetensors'} at step {done.group(1)} of 5" in resumed.output


def test_distillation_writes_metadata_and_resumes_exactly(tiny_dataset, tmp_path):
    images = tiny_dataset / "train"
    run = dict(pretrained_backbone=False, quiet=True)
    half = DistillSettings(**{**SETTINGS.__dict__, "steps": 1})
    distill_teacher("efficientnet_lite0", images, tmp_path / "a" / "t.safetensors", half, checkpoint_every=1, **run)
    report = distill_teacher("efficientnet_lite0", images, tmp_path / "a" / "t.safetensors", SETTINGS, **run)
    assert report["steps_this_run"] == 1 and report["num_images"] == 12
    distill_teacher("efficientnet_lite0", images, tmp_path / "b" / "t.safetensors", SETTINGS, **run)
    resumed, straight = (load_file(str(tmp_path / run / "t.safetensors")) for run in ("a", "b"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    with safe_open(str(tmp_path / "a" / "t.safetensors"), "pt") as handle:
        meta = handle.metadata()["flawscope_teacher"]
    assert '"backbone": "efficientnet_lite0"' in meta and '"steps": 2' in meta and '"num_images": 12' in meta
    with pytest.raises(ConfigError, match=r"lr: 0\.0001 -> 0\.001\). .*--restart"):
        changed = DistillSettings(**{**SETTINGS.__dict__, "lr": 1e-3})
        distill_teacher("efficientnet_lite0", images, tmp_path / "a" / "t.safetensors", changed, **run)
    with pytest.raises(ConfigError, match=r"already at step 2, beyond --steps 1\. Ask for at least"):
        distill_teacher("efficientnet_lite0", images, tmp_path / "a" / "t.safetensors", half, **run)
    with pytest.raises(ConfigError, match="never writes"):
        distill_teacher("efficientnet_lite0", images, images / "t.safetensors", SETTINGS, **run)
    good = images / "good"  # a glob or one file: the folder that holds the images is theirs too
    for given in (good / "*.png", good / "000.png"):
        with pytest.raises(ConfigError, match="never writes"):
            distill_teacher("efficientnet_lite0", given, good / "t.safetensors", SETTINGS, **run)
    assert not list(good.glob("t.*"))


def test_distillation_names_every_unreadable_image_before_training(tiny_dataset, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny_dataset / "train" / "good", images)
    (images / "broken.png").write_bytes(b"not a png")
    (images / "cut.png").write_bytes((images / "000.png").read_bytes()[:100])
    with pytest.raises(DataError, match=r"2 of 14 distillation images cannot be read; nothing was trained") as caught:
        distill_teacher("efficientnet_lite0", images, tmp_path / "t.safetensors", SETTINGS, pretrained_backbone=False)
    assert "broken.png" in str(caught.value) and "cut.png" in str(caught.value)
    assert not list(tmp_path.glob("t.*"))
    # Read on the fly (nothing cached): the headers are checked first; a file damaged after its header stops the
    # run in one line, with how to go on.
    uncached = dict(pretrained_backbone=False, quiet=True, max_cache_bytes=0, checkpoint_every=1)
    with pytest.raises(DataError, match=r"1 of 14 distillation images cannot be read; nothing was trained"):
        distill_teacher("efficientnet_lite0", images, tmp_path / "t.safetensors", SETTINGS, **uncached)
    (images / "broken.png").unlink()
    settings = DistillSettings(**{**SETTINGS.__dict__, "steps": 8})  # 16 images: every one is read
    with pytest.raises(DataError, match=r"cut\.png.*\(at step \d of 8; the checkpoint .* holds step \d\)\. Repl"):
        distill_teacher("efficientnet_lite0", images, tmp_path / "t.safetensors", settings, **uncached)


def test_distillation_never_overwrites_what_it_did_not_write(tiny_dataset, tmp_path):
    images, run = tiny_dataset / "train", dict(pretrained_backbone=False, quiet=True)
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "other.safetensors").write_bytes(b"a user's file")
    for out in ("folder.safetensors", "other.safetensors"):
        with pytest.raises(ConfigError, match="not a teacher written by flawscope distill.*another --out"):
            distill_teacher("efficientnet_lite0", images, tmp_path / out, SETTINGS, **run)
    assert (tmp_path / "other.safetensors").read_bytes() == b"a user's file"
    assert not list(tmp_path.glob("*.ckpt*"))  # refused before any work
    distill_teacher("efficientnet_lite0", images, tmp_path / "t.safetensors", SETTINGS, **run)
    distill_teacher("efficientnet_lite0", images, tmp_path / "t.safetensors", SETTINGS, restart=True, **run)  # its own
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600
    for size in (48, 80):
        with pytest.raises(ConfigError, match="multiple of 32 and at least 64"):
            DistillSettings(image_size=size)


def test_files_that_are_not_teachers_are_named_for_what_they_are(tiny_dataset, tmp_path):
    run = dict(pretrained_backbone=False, quiet=True, checkpoint_every=1)
    distill_teacher("efficientnet_lite0", tiny_dataset / "train", tmp_path / "t.safetensors", SETTINGS, **run)
    expected = PDN("small", 384).state_dict()
    with pytest.raises(ModelFormatError, match=r"resume checkpoint .*\(t\.safetensors\)"):
        load_teacher(tmp_path / "t.safetensors.ckpt.safetensors", "small", expected)
    image = next((tiny_dataset / "train" / "good").iterdir())
    with pytest.raises(ModelFormatError, match="neither a safetensors file nor a torch state dict"):
        load_teacher(image, "small", expected)
    for name, text in (("t.txt", "hello\n"), ("t.csv", "a,b\n1,2\n")):  # torch's reader: KeyError, IndexError
        (tmp_path / name).write_text(text)
        with pytest.raises(ModelFormatError, match="neither a safetensors file nor a torch state dict"):
            load_teacher(tmp_path / name, "small", expected)
    nan = {name: tensor.clone() for name, tensor in expected.items()}
    nan[next(iter(nan))].view(-1)[0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ModelFormatError, match="NaN or infinite weights .*Distil it again with a smaller --lr"):
        load_teacher(tmp_path / "nan.safetensors", "small", expected)
    with pytest.raises(WeightsNotFoundError, match="does not exist; check the path") as info:
        load_teacher(tmp_path / "missing.safetensors", "small", expected)
    assert "none was given" not in str(info.value)
    args = ["distill", "--images", str(tmp_path), "--out", "x.safetensors", "--num-workers", "-1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--num-workers" in result.output


def test_a_diverging_distillation_stops_without_writing_a_teacher(tiny_dataset, tmp_path):
    settings = DistillSettings(**{**SETTINGS.__dict__, "steps": 8, "lr": 1e30})
    with pytest.raises(ConfigError, match=r"Distillation diverged: the loss is (nan|inf) at step \d.*Lower --lr"):
        distill_teacher(
            "efficientnet_lite0",
            tiny_dataset / "train",
            tmp_path / "t.safetensors",
            settings,
            pretrained_backbone=False,
            quiet=True,
        )
    assert not (tmp_path / "t.safetensors").exists()


def test_distillation_without_the_cache_resumes_exactly(tiny_dataset, tmp_path):
    images, run = tiny_dataset / "train", dict(pretrained_backbone=False, quiet=True, max_cache_bytes=0)
    half = DistillSettings(**{**SETTINGS.__dict__, "steps": 1})
    distill_teacher("efficientnet_lite0", images, tmp_path / "a" / "t.safetensors", half, checkpoint_every=1, **run)
    distill_teacher("efficientnet_lite0", images, tmp_path / "a" / "t.safetensors", SETTINGS, **run)
    distill_teacher("efficientnet_lite0", images, tmp_path / "b" / "t.safetensors", SETTINGS, **run)
    resumed, straight = (load_file(str(tmp_path / name / "t.safetensors")) for name in ("a", "b"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_distillation_resumes_in_bfloat16_and_counts_the_steps_of_each_precision(tiny_dataset, tmp_path):
    images, out = tiny_dataset / "train", tmp_path / "t.safetensors"
    run = dict(pretrained_backbone=False, quiet=True)
    half = DistillSettings(**{**SETTINGS.__dict__, "steps": 1})
    distill_teacher("efficientnet_lite0", images, out, half, checkpoint_every=1, **run)
    report = distill_teacher("efficientnet_lite0", images, out, SETTINGS, precision="bfloat16", **run)
    assert report["steps_this_run"] == 1 and math.isfinite(report["final_loss"])
    with safe_open(str(out), "pt") as handle:
        meta = json.loads(handle.metadata()["flawscope_teacher"])
    assert all(weight.dtype == torch.float32 for weight in load_file(str(out)).values())
    assert meta["precision_steps"] == {"float32": 1, "bfloat16": 1} and meta["steps"] == 2
    with pytest.raises(ConfigError, match="--precision"):
        distill_teacher("efficientnet_lite0", images, tmp_path / "u.safetensors", SETTINGS, precision="half", **run)


def test_cached_targets_equal_targets_on_the_fly(tiny_dataset, tmp_path):
    """The target cache (float16) changes only rounding: same grayscale decisions, same statistics, same steps."""
    images = tiny_dataset / "train"
    settings = DistillSettings(**{**SETTINGS.__dict__, "gray_prob": 0.5, "steps": 3})
    run = dict(pretrained_backbone=False, quiet=True)
    cached = distill_teacher("efficientnet_lite0", images, tmp_path / "c" / "t.safetensors", settings, **run)
    direct = distill_teacher(
        "efficientnet_lite0", images, tmp_path / "d" / "t.safetensors", settings, max_cache_bytes=0, **run
    )
    assert cached["final_loss"] == pytest.approx(direct["final_loss"], rel=1e-2)
    a, b = (load_file(str(tmp_path / name / "t.safetensors")) for name in ("c", "d"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-2, atol=1e-4) for k in a)


def test_cli_distill_then_fit_test_save_load(tiny_dataset, tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    result = CliRunner().invoke(main, [
        "distill", "--backbone", "efficientnet_lite0", "--images", str(tiny_dataset / "train"), "--out", str(teacher),
        "--steps", "2", "--batch-size", "2", "--image-size", "64", "--stats-images", "4", "--num-workers", "0",
        "--device", "cpu", "--quiet",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "teacher written to" in result.output and teacher.is_file()

    # Fit on the good images (with a penalty folder), keep held-out ones apart: they set the quantiles.
    split = load_dataset(tiny_dataset)
    options = {**TINY, "teacher_path": str(teacher), "penalty_images": str(tiny_dataset / "test" / "good")}
    model = EfficientAD(EfficientADConfig.from_dict(options))
    ctx = FitContext(quiet=True)
    report = fit(model, split.train, ctx)
    train, val = split_validation(split.train, 0.1, seed=0, min_count=1)
    assert report["num_validation"] == len(val) == 1 and report["num_train"] == len(train)
    assert report["penalty"]["num_images"] == 4 and "penalty" in ctx.log[-1]
    assert report["teacher"]["backbone"] == "efficientnet_lite0" and bool(model.fitted)
    assert not torch.equal(model.qa_st, torch.tensor(0.0)) and model.qb_st > model.qa_st

    # The same through the command line: fit, then test on the labelled split.
    run = tmp_path / "run"
    fitted = CliRunner().invoke(main, [
        "fit", "--model", "efficientad", "--data", str(tiny_dataset), "--out", str(run), "--image-size", "64",
        "--set", "num_steps=3", "--set", "teacher_path=not-this.safetensors", "--weights", str(teacher),
        "--device", "cpu", "--quiet",
    ])  # fmt: skip
    assert fitted.exit_code == 0, fitted.output
    # --weights replaced the teacher_path option; config.json and model.json name the teacher that was used.
    assert json.loads((run / "config.json").read_text())["options"]["teacher_path"] == str(teacher)
    model_json = json.loads((run / "model" / "model.json").read_text())
    assert model_json["config"]["teacher_path"] == str(teacher)
    (pretrained,) = model_json["pretrained_weights"]  # the teacher, by content
    assert pretrained["name"] == "teacher" and pretrained["sha256"] == file_sha256(teacher)
    tested = CliRunner().invoke(main, ["test", str(run), "--data", str(tiny_dataset), "--device", "cpu", "--quiet"])
    assert tested.exit_code == 0, tested.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("image_auroc", "pixel_auroc", "pixel_aupro"))

    teacher.unlink()  # the model folder must not need the teacher file
    model.eval()
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for x, y in zip(model(images), loaded(images), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_learning_rate_drops_by_10_once():
    # The drop happens once, after lr_drop_ratio of the steps (the public code: after int(0.95 * 70000)).
    model = _tiny(out_channels=8, num_steps=3, lr_drop_ratio=0.34)
    ctx = FitContext(quiet=True)
    image = torch.rand(1, 3, 64, 64)

    class _OneImage:
        def forever(self, generator):
            while True:
                yield image

    train(model, _OneImage(), None, ctx)
    assert [round(r["lr"], 12) for r in ctx.log] == [1e-4, 1e-5, 1e-5]


def test_training_batches_are_the_same_cached_or_streamed(tiny_dataset, monkeypatch):
    # Streamed epochs were shuffled by a fresh loader each epoch, so every epoch repeated one order.
    import importlib

    from flawscope.data import load_dataset
    from flawscope.fitting import FitContext

    fit_module = importlib.import_module("flawscope.models.efficientad.fit")
    samples, cfg, ctx = (
        load_dataset(tiny_dataset).train[:5],
        EfficientADConfig.from_dict({**TINY}),
        FitContext(quiet=True),
    )
    runs = []
    for limit in (1 << 30, 0):
        monkeypatch.setattr(fit_module, "MAX_CACHE_BYTES", limit)
        images = fit_module._TrainImages(samples, cfg, ctx)
        assert (images.cache is None) is (limit == 0)
        stream = images.forever(torch.Generator().manual_seed(3))
        runs.append([next(stream) for _ in range(12)])  # more than two epochs of batch size 1
    for cached, streamed in zip(*runs, strict=True):
        torch.testing.assert_close(streamed, cached, rtol=0, atol=0)
    assert not torch.equal(torch.cat(runs[0][:5]), torch.cat(runs[0][5:10]))  # the second epoch has another order
