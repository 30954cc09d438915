"""flawscope: visual anomaly detection for industrial inspection.

>>> import flawscope
>>> run = flawscope.fit("simplenet", "data/bottle", "runs/bottle", options={"backbone": "efficientnet_lite0"})
>>> metrics = flawscope.test(run, "data/bottle")
>>> flawscope.calibrate_run(run, "data/bottle-validation")  # optional: an F1-optimal threshold on labelled images
>>> onnx_path, parity = flawscope.export_run(run)  # RUN/export/model.onnx, checked against the torch model
>>> model = flawscope.load_model(run)  # model(images) -> AnomalyOutput(anomaly_map, pred_score, ...)
>>> inferencer = flawscope.load_inferencer(run)  # or an exported .onnx / .pt file
>>> image = flawscope.preprocess(flawscope.read_image(upload_bytes), inferencer.image_size, inferencer.resize_size)
>>> prediction = inferencer.predict(image[None])[0]  # .norm_score, .decision, .regions
"""

__version__ = "0.1.0"

from .api import calibrate_run, export_run, fit  # noqa: E402
from .data import preprocess, read_image  # noqa: E402
from .evaluation import test  # noqa: E402
from .export import load_inferencer  # noqa: E402
from .model_io import load_model, save_model  # noqa: E402
from .models.base import AnomalyOutput  # noqa: E402
from .prediction import predict  # noqa: E402
from .registry import available_methods  # noqa: E402

__all__ = [
    "AnomalyOutput",
    "available_methods",
    "calibrate_run",
    "export_run",
    "fit",
    "load_inferencer",
    "load_model",
    "predict",
    "preprocess",
    "read_image",
    "save_model",
    "test",
]
