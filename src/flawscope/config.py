"""Frozen configuration dataclasses with validated construction from dictionaries and CLI strings.

Every model config subclasses :class:`ModelConfig`. Constraints are declared next to the fields with
``field(metadata=...)`` (scikit-learn style) and checked in ``__post_init__``, so a config that exists is valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ConfigError, DataError

C = TypeVar("C", bound="ModelConfig")


def option(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: Sequence[Any] | None = None,
) -> Any:
    """A dataclass field with a help text and a declared range or set of choices."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open, "choices": choices}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


TRAIN_PRECISIONS = ("float32", "bfloat16")


def train_precision_option() -> Any:
    """The ``train_precision`` option of the models that train a network (see ``fitting.autocast``)."""
    return option(
        "float32",
        "number format of the training forward pass: float32, or bfloat16 autocast (weights, optimiser and losses "
        "stay float32; faster on CPUs with AMX or AVX512-BF16: a step 1.8x for EfficientAD, 1.1x for PRN here)",
        choices=TRAIN_PRECISIONS,
    )


def context_weight_option() -> Any:
    """The ``context_weight`` option of the models built on ``layers.LocalFeatureAggregator`` (PatchCore, SimpleNet)."""
    return option(
        0.0, "append the image's mean feature x this weight to every location's (not in the paper); 0 = off", low=0
    )


def position_shrinkage_option() -> Any:
    """The ``position_shrinkage`` option of the models with ``feature_norm=position`` (SimpleNet, CFA, MLFF, PRN)."""
    return option(
        0.01, "epsilon of the per-position covariance + epsilon I (feature_norm=position; PaDiM: 0.01)", low=0
    )


def _describe_range(meta: Mapping[str, Any]) -> str:
    if meta.get("choices") is not None:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    lo = "(" if meta["low_open"] else "["
    hi = ")" if meta["high_open"] else "]"
    low = "-inf" if meta["low"] is None else meta["low"]
    high = "inf" if meta["high"] is None else meta["high"]
    return f"in {lo}{low}, {high}{hi}"


def _finite(value: Any) -> bool:
    """False when ``value`` (or an entry of a tuple value) is a float NaN or infinity."""
    values = value if isinstance(value, tuple) else (value,)
    return all(math.isfinite(v) for v in values if isinstance(v, float))


def _in_range(value: Any, meta: Mapping[str, Any]) -> bool:
    if meta.get("choices") is not None:
        return value in meta["choices"]
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)):
            continue
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (v < low or (meta["low_open"] and v == low)):
            return False
        if high is not None and (v > high or (meta["high_open"] and v == high)):
            return False
    return True


def _coerce(value: Any, annotation: Any, name: str, owner: str) -> Any:
    """Converts a JSON or CLI value to the field's declared type, or raises ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name, owner)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one number is a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"The {name!r} parameter of {owner} must be a list; got {value!r}.")
        item_type = args[0] if args else str
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, item_type, name, owner) for v in value)
    try:
        if annotation is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes")
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"The {name!r} parameter of {owner} must be of type {annotation.__name__}; got {value!r}."
        ) from e
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Settings every model shares: backbone and the geometry of the input pipeline.

    Images are resized so the shorter side is ``resize_size`` and centre-cropped to ``image_size`` (the
    PatchCore/SimpleNet recipe, 256 -> 224). ``resize_size`` 0 resizes the whole image to ``image_size`` square
    (no crop, aspect ratio not kept), as EfficientAD and anomalib do.
    """

    backbone: str = option("wide_resnet50_2", "feature extractor name (see `flawscope info`)")
    image_size: int = option(224, "side of the square model input, pixels", low=32, high=4096)
    resize_size: int = option(
        256, "shorter side before the centre crop; 0 = resize the whole image, no crop", low=0, high=8192
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), hints[f.name], f.name, type(self).__name__)
            object.__setattr__(self, f.name, value)
            if not _finite(value):  # NaN passes every range comparison; no option is meant to be infinite
                raise ConfigError(
                    f"The {f.name!r} parameter of {type(self).__name__} must be a finite number; got {value!r}."
                )
            if f.metadata and not _in_range(value, f.metadata):
                raise ConfigError(
                    f"The {f.name!r} parameter of {type(self).__name__} must be {_describe_range(f.metadata)}; "
                    f"got {value!r}."
                )
        if 0 < self.resize_size < self.image_size:
            raise ConfigError(
                f"resize_size ({self.resize_size}) must be 0 or at least image_size ({self.image_size}); "
                "the centre crop cannot be larger than the resized image."
            )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Builds a config from a mapping, rejecting unknown keys with the list of valid ones."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"Unknown option(s) {', '.join(map(repr, unknown))} for {cls.__name__}. "
                f"Valid options: {', '.join(cls.field_names())}."
            )
        return cls(**dict(values))

    def replace(self: C, **changes: Any) -> C:
        """Returns a copy with some fields changed (validated like the constructor)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) for every option, for `flawscope info --model NAME`."""
        return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    """Turns CLI ``key=value`` strings into a dict; the config does the type conversion."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r} (for example --set num_epochs=4).")
        result[key.strip().replace("-", "_")] = value.strip()
    return result


@contextmanager
def naming_option(name: str, value: Any) -> Iterator[None]:
    """Puts ``name=value`` in front of a DataError raised inside, so a bad path says which option gave it."""
    try:
        yield
    except DataError as e:
        raise DataError(f"Option {name}={value}: {e}") from e
