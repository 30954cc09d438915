"""Method name -> (inference module, config, fit routine). Methods register themselves on import."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    """One registered method."""

    name: str
    model_class: type
    fit: Callable[..., dict[str, Any]]
    supervision: str  # "normal" (good images only) or "few-shot" (good images plus a few labelled defects)
    summary: str

    @property
    def config_class(self) -> type:
        return self.model_class.config_class


_METHODS: dict[str, Method] = {}
BUILTIN_METHODS = ("cfa", "efficientad", "mlff", "patchcore", "prn", "simplenet")  # flawscope.models.<name>


def register(
    name: str, model_class: type, fit: Callable[..., dict[str, Any]], *, supervision: str = "normal", summary: str = ""
) -> None:
    """Adds a method under ``name`` (lower case, no separators)."""
    if name in BUILTIN_METHODS and model_class.__module__ != f"{__package__}.models.{name}.model":
        raise RuntimeError(f"Method {name!r} is one of flawscope's own; register yours under another name.")
    if name in _METHODS:
        raise RuntimeError(f"Method {name!r} is registered twice.")
    _METHODS[name] = Method(name, model_class, fit, supervision, summary)


def _load_builtin() -> None:
    # Imported on first use, so `import flawscope` and ONNX-only services load neither timm, torchvision nor
    # scikit-image. Each package registers itself.
    for name in BUILTIN_METHODS:
        importlib.import_module(f"{__package__}.models.{name}")


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    _load_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """Looks up a method; an unknown name raises ConfigError listing the valid ones."""
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"Unknown model {name!r}. Available: {', '.join(sorted(_METHODS))}.") from None
