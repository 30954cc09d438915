"""What every `flawscope` command shares: the group that turns errors into one line, and common options."""

from __future__ import annotations

import errno
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from PIL import Image

from .. import __version__
from ..data.io import set_pixel_limit_from_environment
from ..data.layouts import LAYOUTS
from ..errors import FlawscopeError, format_warning_line

DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
QUIET = click.option("--quiet", is_flag=True, help="no progress bars")
LAYOUT = click.option(
    "--layout",
    default="auto",
    type=click.Choice(LAYOUTS),
    show_default=True,
    help="mvtec (train/good, test/<type>, ground_truth/<type>), visa (split_csv/1cls.csv), folder (a plain folder "
    "of good images, no labels); auto tells them apart",
)


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value:
        import torch

        torch.set_num_threads(value)
    return value


def threads_option(expose: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--threads N: torch's (and ONNX Runtime's) CPU threads for the whole command; passed on when ``expose``."""
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        expose_value=expose,
        callback=_set_threads,
        help="CPU threads for torch and ONNX Runtime (default: torch's, one per core); on a machine shared with "
        "other jobs fewer threads are often faster",
    )


def _fail(error: Exception | str) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(2)


def _out_of_memory(error: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (GPU) or its CPU allocator's failure."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError)
        and (type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(error))
    )


_FULL = "free space there or give --out on another disk, then run the command again (it replaces what it wrote)"
_DENIED = "check the permissions of that path (flawscope only reads --data and writes --out)"
_OS_ERROR_HINTS = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EACCES: _DENIED,
    errno.EPERM: _DENIED,
    errno.EROFS: "give --out on a writable file system",
    errno.ENAMETOOLONG: "shorten the path or file name",
}


def _os_error_text(error: OSError, command: str | None) -> str:
    where = f" ({error.filename})" if error.filename else ""
    hint = _OS_ERROR_HINTS.get(error.errno, "check that path and the disk")
    return f"`flawscope {command}` stopped: {error.strerror or error}{where}; {hint}."


class _Group(click.Group):
    """Turns flawscope's own errors into one clear line instead of a traceback, and warnings into one line each."""

    def invoke(self, ctx: click.Context):
        formatwarning = warnings.formatwarning
        warnings.formatwarning = format_warning_line
        try:
            set_pixel_limit_from_environment()
            with warnings.catch_warnings():
                # Pillow warns about images above its pixel limit before flawscope refuses them with the reason.
                warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
                return super().invoke(ctx)
        except FlawscopeError as e:
            _fail(e)
        except OSError as e:  # the file system's answer about a file: one line with the file and what to do
            if e.errno not in _OS_ERROR_HINTS and not e.filename:
                raise
            _fail(_os_error_text(e, ctx.invoked_subcommand))
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            said = " ".join(str(e).split())[:160] or type(e).__name__
            _fail(
                f"out of memory in `flawscope {ctx.invoked_subcommand}` ({said}). Use less: "
                "a smaller --batch-size (test, predict) or --set batch_size=N (fit), a smaller fit --image-size, fewer "
                "training images, and for PatchCore --set max_train_features=N (default 2,000,000 locations: about "
                "4 GiB in float16 plus 1 GiB for the coreset search); `flawscope info --model NAME` lists each "
                "model's options."
            )
        finally:
            warnings.formatwarning = formatwarning


class _UserPath(click.Path):
    """A path parameter whose leading ``~`` is expanded, also where the shell left it (``--out=~/runs``, cmd.exe)."""

    def convert(self, value: str | Path, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        return Path(super().convert(value, param, ctx)).expanduser()


PATH = _UserPath(path_type=Path)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="flawscope")
def main() -> None:
    """Visual anomaly detection for industrial inspection."""


def threshold_line(run: Path) -> str:
    """The run's decision threshold and how it was set, as one line."""
    from ..model_io import describe_threshold, read_model_info

    return describe_threshold(read_model_info(run))[1]


def print_metrics(metrics: dict) -> None:
    """The seven metrics of a metrics.json dictionary, one per line in percent (n/a where not computed)."""
    from ..evaluation import METRIC_KEYS

    for key in METRIC_KEYS:
        value = metrics.get(key)
        click.echo(f"  {key:<12} {'n/a' if value is None else f'{100 * value:.1f} %'}")
