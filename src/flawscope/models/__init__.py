"""Built-in methods. Importing this package registers them (see flawscope.registry)."""

from . import cfa, efficientad, mlff, patchcore, prn, simplenet  # noqa: F401
