"""Image decoding, dataset layouts, validation splits and the torch dataset."""

from flawscope.data.dataset import (
    ImageDataset,
    collate,
    crop_box,
    is_enlarged,
    make_loader,
    preprocess,
    preprocess_mask,
    to_uint8_image,
    warn_enlarged,
)
from flawscope.data.find import find_images
from flawscope.data.io import IMAGE_EXTENSIONS, is_image_file, read_image, read_mask
from flawscope.data.layouts import (
    DatasetSplit,
    Sample,
    list_categories,
    load_dataset,
    split_validation,
)
from flawscope.data.seen import exclude_samples, load_anomaly_folder, select_seen_anomalies

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetSplit",
    "ImageDataset",
    "Sample",
    "collate",
    "crop_box",
    "exclude_samples",
    "find_images",
    "is_enlarged",
    "is_image_file",
    "list_categories",
    "load_anomaly_folder",
    "load_dataset",
    "make_loader",
    "preprocess",
    "preprocess_mask",
    "read_image",
    "read_mask",
    "select_seen_anomalies",
    "split_validation",
    "to_uint8_image",
    "warn_enlarged",
]
