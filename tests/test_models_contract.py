"""One suite run over every registered model: construct, forward shapes, short fit, save/load round trip."""

import json

import numpy as np
import pytest
import torch

from flawscope.data import load_dataset
from flawscope.fitting import FitContext
from flawscope.model_io import load_model, save_model
from flawscope.models.base import AnomalyOutput
from flawscope.registry import available_methods, get_method, register

# Small, fast settings per method: a random-weight ResNet-18 at 64 px and the shortest schedule.
QUICK_OPTIONS = {
    "patchcore": {"coreset_ratio": 0.5, "pretrain_embed_dim": 64, "target_embed_dim": 64},
    "simplenet": {"num_epochs": 1, "batch_size": 4, "embed_dim": 64, "discriminator_hidden": 32},
    "efficientad": {"num_steps": 3},
    "cfa": {"num_epochs": 1, "gamma_d": 4, "gamma_c": 4, "kmeans_max_iter": 50},
    "prn": {
        "num_epochs": 1,
        "steps_per_epoch": 1,
        "batch_normal": 2,
        "batch_simulated": 2,
        "msa_depth": 1,
        "precise_bn_batches": 2,
    },
    "mlff": {
        "num_epochs": 1,
        "repeat_factor": 4,
        "batch_size": 4,
        "texture_dim": 16,
        "feat_dim": 16,
        "tem_levels": 8,
        "tem_stat_dim": 8,
        "sc_reduce": 16,
        "freeze_backbone": True,
        "lr": 0.01,
    },
}
BASE_OPTIONS = {"backbone": "resnet18", "image_size": 64, "resize_size": 0}


def _build(name):
    method = get_method(name)
    config = method.config_class.from_dict({**BASE_OPTIONS, **QUICK_OPTIONS[name]})
    return method, method.model_class(config, pretrained=False)


def test_a_method_of_ones_own_cannot_take_a_built_in_name():
    # Built-in methods are imported on first lookup; a user's method under a built-in name is refused at once.
    class Mine:
        pass

    with pytest.raises(RuntimeError, match="one of flawscope's own"):
        register("patchcore", Mine, lambda *args: {})
    assert get_method("patchcore").model_class.__name__ == "PatchCore"


def test_every_registered_model_has_quick_options():
    assert set(available_methods()) <= set(QUICK_OPTIONS), "add quick test options for the new method"


@pytest.fixture(scope="module", params=sorted(QUICK_OPTIONS))
def fitted(request, tiny_dataset):
    if request.param not in available_methods():
        pytest.skip(f"{request.param} is not registered yet")
    torch.manual_seed(0)
    method, model = _build(request.param)
    split = load_dataset(tiny_dataset)
    report = method.fit(model, split.train, FitContext(quiet=True))
    return model.eval(), report, split


# Each method's default backbone and geometry (input side, shorter side before the centre crop; 0 = no crop), as its
# paper and spec set them (specs/*.md).
PAPER_GEOMETRY = {
    "patchcore": ("wide_resnet50_2", 224, 256),
    "simplenet": ("wide_resnet50_2", 224, 256),
    "cfa": ("wide_resnet50_2", 224, 256),
    "efficientad": ("pdn", 256, 0),
    "prn": ("resnet18", 256, 0),  # PRN and MLFF: the whole image resized to 256 x 256, no crop
    "mlff": ("resnet50", 256, 0),
}


def test_defaults_are_the_papers():
    assert set(available_methods()) == set(PAPER_GEOMETRY)
    for name, expected in PAPER_GEOMETRY.items():
        config = get_method(name).config_class()
        assert (config.backbone, config.image_size, config.resize_size) == expected, name


def test_forward_shapes_and_values(fitted):
    model, _, _ = fitted
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
    assert isinstance(out, AnomalyOutput)
    assert out.anomaly_map.shape == out.norm_map.shape == (2, 1, 64, 64)
    assert out.pred_score.shape == out.norm_score.shape == (2,)
    assert torch.isfinite(out.anomaly_map).all() and torch.isfinite(out.pred_score).all()
    assert float(out.norm_score.min()) >= 0 and float(out.norm_score.max()) <= 1


def test_fit_marks_model_fitted_and_reports(fitted):
    model, report, split = fitted
    assert bool(model.fitted)
    # The report goes into model.json: plain JSON, counting the images the fit was given (EfficientAD splits them
    # between the student and the map quantiles).
    assert json.loads(json.dumps(report)) == report
    counted = report["num_train"] + report["num_validation"] if "num_train" in report else report["num_images"]
    assert counted == len(split.train)


def test_save_load_round_trip_gives_identical_outputs(fitted, tmp_path):
    model, _, _ = fitted
    model.set_calibration(threshold=2.0, score_low=1.0)
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        a, b = model(images), loaded(images)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert float(loaded.threshold) == 2.0
    # Ready for inference: called without no_grad, a loaded model keeps no autograd graph.
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(t.grad_fn is None for t in loaded(images))


def test_anomalous_test_images_score_higher_on_average(fitted):
    # A sanity check that fitting learned something, even with random backbone weights.
    model, _, split = fitted
    if model.method == "prn":
        # Measured: PRN's decoder is trained from scratch, and 1-30 steps (random ResNet-18 or real Lite0 weights,
        # 64 px) leave the two means within 0.005 of each other either way, so this would be a coin flip.
        # tests/test_prn.py::test_training_steps_fit_a_fixed_batch checks instead that PRN's training learns.
        pytest.skip("a few PRN steps do not separate test images; see test_prn.py")
    from flawscope.api import score_images

    scored = score_images(model, split.test, FitContext(quiet=True))
    labels = np.array([s.label for s in split.test])
    assert np.isfinite(scored.raw_scores).all()
    assert scored.raw_scores[labels == 1].mean() > scored.raw_scores[labels == 0].mean()
