"""Built-in methods. Importing this package registers them (see flawscope.registry)."""

from . import patchcore, simplenet  # noqa: F401
