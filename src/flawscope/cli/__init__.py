"""The `flawscope` command: fit | test | predict | export | bench | calibrate | synth | info | distill | demo.

``_common`` holds the group and the shared options; ``run`` the commands of a model's life (fit to export), ``tools``
the others. Importing them registers their commands on ``main``.
"""

from . import run, tools  # noqa: F401  (registers the commands)
from ._common import main

__all__ = ["main"]
