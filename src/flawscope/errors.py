"""Exceptions raised by flawscope (each subclasses a built-in so callers can catch either), and how warnings read."""

import warnings


class FlawscopeError(Exception):
    """Base class of every error flawscope raises on purpose."""


class ConfigError(FlawscopeError, ValueError):
    """A model, fit or CLI option is unknown or out of range."""


class DataError(FlawscopeError, ValueError):
    """An image, mask or data folder cannot be used as given."""


class WeightsNotFoundError(FlawscopeError, FileNotFoundError):
    """Backbone weights are needed but cannot be found offline."""


class NotFittedError(FlawscopeError, RuntimeError):
    """A model is used for prediction or export before it was fitted."""


class ModelFormatError(FlawscopeError, ValueError):
    """A model folder is missing files, corrupt, or written by a newer format version."""


def format_warning_line(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning as one line for a command-line user, without the source file and line it was raised from.

    Installed as ``warnings.formatwarning`` by the CLI, and in the worker processes of ``flawscope bench``.
    """
    return f"warning: {message}\n"


def use_one_line_warnings() -> None:
    """Makes this process print warnings with :func:`format_warning_line` (a worker process's initializer)."""
    warnings.formatwarning = format_warning_line
