"""Built-in methods. Importing this package registers them (see flawscope.registry)."""

from . import cfa, efficientad, patchcore, simplenet  # noqa: F401
