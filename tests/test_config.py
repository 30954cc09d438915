import pytest

from flawscope.config import ModelConfig, parse_overrides
from flawscope.errors import ConfigError
from flawscope.models.patchcore import PatchCoreConfig


def test_from_dict_converts_cli_strings():
    cfg = PatchCoreConfig.from_dict({"image_size": "128", "coreset_ratio": "0.01", "strides": "8,16"})
    assert cfg.image_size == 128 and cfg.coreset_ratio == 0.01 and cfg.strides == (8, 16)


def test_unknown_option_lists_valid_names():
    with pytest.raises(ConfigError, match="Unknown option.*'corset_ratio'.*Valid options:.*coreset_ratio"):
        PatchCoreConfig.from_dict({"corset_ratio": 0.1})


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("coreset_ratio", 1.5, r"'coreset_ratio' parameter of PatchCoreConfig must be in \(0, 1\]; got 1.5"),
        ("coreset_ratio", 0, r"must be in \(0, 1\]"),
        ("image_size", "big", "must be of type int"),
        ("image_size", 2.5, "must be of type int"),
        # NaN passes every range comparison; neither it nor infinity may reach a model
        ("context_weight", "nan", "'context_weight' parameter of PatchCoreConfig must be a finite number; got nan"),
        ("context_weight", "inf", "must be a finite number; got inf"),
        ("coreset_ratio", float("nan"), "must be a finite number"),
    ],
)
def test_out_of_range_values_are_rejected(key, value, message):
    with pytest.raises(ConfigError, match=message):
        PatchCoreConfig.from_dict({key: value})


def test_crop_larger_than_resize_is_rejected():
    with pytest.raises(ConfigError, match="resize_size"):
        ModelConfig(image_size=256, resize_size=224)


def test_round_trip_through_dict():
    cfg = PatchCoreConfig(image_size=96, resize_size=0)
    assert PatchCoreConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(coreset_ratio=0.5).coreset_ratio == 0.5


def test_parse_overrides():
    assert parse_overrides(["a=1", "b-c = x"]) == {"a": "1", "b_c": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])
