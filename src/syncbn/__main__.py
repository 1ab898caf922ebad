"""``python -m syncbn ...``: the command line of :mod:`syncbn.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
