"""The ``syncbn`` command line: ``syncbn demo``, ``check``, ``bench``, ``kernel`` (``python -m syncbn ...``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``syncbn <command> [options]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="syncbn", description="Exact synchronized BatchNorm for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from . import _kernel, bench, check, demo

    demo.add_parser(sub)
    check.add_parser(sub)
    bench.add_parser(sub)
    _kernel.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
