"""CUDA paths: fit on the GPU, load and export across devices. Skipped without a GPU (none on the CI machine).

On the CPU the same code is covered by the other tests; the CPU-side guards against these failures are in
test_export.py (no device constant in a traced graph), test_layers.py and test_sampling.py ("meta" device).
"""

from __future__ import annotations

import pytest
import torch
from test_export import EXPORT_OPTIONS, _calibrate, _test_images
from test_models_contract import BASE_OPTIONS, QUICK_OPTIONS

import flawscope
from flawscope.data import load_dataset
from flawscope.export import TorchInferencer, check_parity, export_model, load_inferencer
from flawscope.fitting import FitContext, preserved_random_state
from flawscope.model_io import save_model
from flawscope.registry import available_methods, get_method

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fit_on_gpu(name: str, tiny_dataset, **changes):
    # Random backbone weights (no download), as in the contract suite.
    torch.manual_seed(0)
    method = get_method(name)
    config = method.config_class.from_dict(
        {**BASE_OPTIONS, **QUICK_OPTIONS[name], **EXPORT_OPTIONS.get(name, {}), **changes}
    )
    model = method.model_class(config, pretrained=False)
    split = load_dataset(tiny_dataset)
    method.fit(model, split.train, FitContext(device=torch.device("cuda"), quiet=True))
    return model, split


def _run(name: str, tiny_dataset, folder, **changes):
    """A model fitted on the GPU, calibrated and saved as a run's model folder."""
    model, split = _fit_on_gpu(name, tiny_dataset, **changes)
    _calibrate(model.cpu().eval(), _test_images(split, model.config.image_size))  # both decisions occur
    return save_model(model, folder)


@pytest.mark.parametrize("name", available_methods())
def test_a_gpu_fit_loads_on_either_device_and_exports_for_either(name, tiny_dataset, tmp_path):
    run = _run(name, tiny_dataset, tmp_path / "run")
    gpu = flawscope.load_model(run, map_location="cuda")
    assert {t.device.type for t in [*gpu.parameters(), *gpu.buffers()]} == {"cuda"}
    cpu = flawscope.load_model(run, map_location="cpu")
    images = _test_images(load_dataset(tiny_dataset), cpu.config.image_size)
    expected = TorchInferencer(cpu).run(images)
    spread = float(expected["anomaly_map"].max() - expected["anomaly_map"].min()) or 1.0
    got = TorchInferencer(gpu, "cuda").run(images)
    assert abs(got["anomaly_map"] - expected["anomaly_map"]).max() <= 1e-3 * spread
    for fmt in ("onnx", "torchscript"):
        path = export_model(gpu, tmp_path / f"model.{fmt}", fmt)
        assert check_parity(gpu, path, images, trust_code=True)["ok"]
        assert gpu.fitted.device.type == "cuda"  # the parity check ran on the CPU and put the model back
    scripted = load_inferencer(tmp_path / "model.torchscript", "cuda", trust_code=True).run(
        images
    )  # built with device constants once
    assert abs(scripted["anomaly_map"] - expected["anomaly_map"]).max() <= 1e-3 * spread


@pytest.mark.parametrize("name", ["simplenet", "cfa", "mlff", "prn"])
def test_position_whitening_fits_on_the_gpu(name, tiny_dataset):
    model, split = _fit_on_gpu(name, tiny_dataset, feature_norm="position")  # PRN gathers its statistics on the CPU
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    images = _test_images(split, model.config.image_size).cuda()
    with torch.no_grad():
        assert model(images).anomaly_map.isfinite().all()


def test_fit_leaves_the_callers_cuda_stream_as_it_was():
    # flawscope.fit seeds every generator inside this block.
    torch.cuda.manual_seed(123)
    before = torch.cuda.get_rng_state()
    with preserved_random_state():
        torch.manual_seed(0)
        torch.randn(3, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)
