"""``syncbn kernel``: build the fused CPU kernel now (or find it in the cache) and say where."""

from __future__ import annotations

import sys
from typing import Any

from .._native import kernel

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> Any:
    """Add the ``kernel`` subcommand to ``syncbn``'s subparsers; returns its parser."""
    p = subparsers.add_parser(
        "kernel", help="build syncbn's fused CPU kernel now (or find it in the cache) and say where",
        description="Build syncbn's fused CPU kernel with the system C compiler, or load it from "
        "the cache, and print where it is, how long that took and with which flags: run it once "
        "in a container image or on a shared file system so that training processes only load "
        "it. Honors CC and SYNCBN_CACHE_DIR (see docs/troubleshooting.md).",
        epilog="Exit status: 0 the kernel is available, 1 it cannot be built (the reason is "
        "printed; syncbn then uses its plain ATen path).")
    p.add_argument("--rebuild", action="store_true", help="build it again even if it is cached")
    p.set_defaults(run=_run_cli)
    return p


def _run_cli(args: Any) -> int:
    info = kernel.load_now(rebuild=args.rebuild)  # the error is printed below, not warned
    for problem in info["problems"] if info["available"] else ():
        print(f"syncbn kernel: {problem}", file=sys.stderr)
    if not info["available"]:
        print(f"syncbn kernel: {info['error']}; syncbn will use its plain ATen path",
              file=sys.stderr)
        return 1
    how = "built" if info["compiled"] else "loaded from the cache"
    took = f"{info['seconds']:.2f} s" if info["seconds"] >= 0.1 else f"{info['seconds'] * 1e3:.1f} ms"
    print(f"syncbn kernel: {how} {info['path']} in {took} (flags: {info['flags']})")
    return 0
