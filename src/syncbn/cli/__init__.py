"""The ``syncbn`` command line (``syncbn ...`` or ``python -m syncbn ...``).

==========  ==================================================================================
``demo``    MNIST three ways: SyncBN on W ranks == 1 process with W*b images; plain BN is not
``check``   syncbn against a float64 reference on your devices and backend, and its speed
``bench``   per layer and end to end, against torch's BatchNorm and a textbook SyncBN
``kernel``  build the fused CPU kernel now (or find it in the cache) and say where
==========  ==================================================================================

Every command: exit 0 done, 1 a check failed or a rank failed, 2 a bad option (one line on
stderr, before anything starts), 130 interrupted. The tools are not the library: nothing in
``syncbn`` imports this package.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ._args import Parser, UsageError
from ._launch import SpawnFailure

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``syncbn <command> [options]``; returns the exit status."""
    from . import bench, check, demo, kernel

    parser = Parser(prog="syncbn", description="Exact synchronized BatchNorm for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (demo.add_parser, check.add_parser, bench.add_parser, kernel.add_parser):
        add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UsageError as e:
        print(f"syncbn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except SpawnFailure as e:
        print(f"syncbn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"syncbn {args.command}: interrupted; stopped the ranks", file=sys.stderr)
        return 130
