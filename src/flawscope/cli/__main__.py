"""``python -m flawscope.cli``, as ``python -m flawscope``."""

from flawscope.cli import main

if __name__ == "__main__":
    main(prog_name="flawscope")
