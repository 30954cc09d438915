"""Exceptions raised by flawscope. Each subclasses a built-in so callers can catch either."""


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
