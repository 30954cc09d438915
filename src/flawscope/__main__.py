"""``python -m flawscope``: the command line, where the ``flawscope`` script is not on PATH (e.g. on Windows)."""

from flawscope.cli import main

if __name__ == "__main__":
    main(prog_name="flawscope")
