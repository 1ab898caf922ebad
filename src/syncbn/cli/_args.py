"""The command line's argument checks, one set for every command.

A bad option is a one-line message and exit status 2, before anything starts: argparse's own
errors go through :class:`Parser` (no usage block), and what can only be checked after parsing
(a directory to write to, options that contradict each other, unreadable data) raises
:class:`UsageError`, which ``syncbn``'s ``main`` prints the same way.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

__all__ = ["Parser", "UsageError", "existing_dir", "int_at_least", "int_list", "number_above",
           "out_dir", "shape", "shape_list"]


class UsageError(ValueError):
    """A bad option or input found after parsing; ``main`` prints it on one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: ``syncbn demo: error: ... (see syncbn demo --help)``.

    Subcommand parsers are made of the same class (``add_subparsers`` uses the parent's).
    """

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= low``.

    >>> int_at_least(1)("3"), int_at_least(2).__name__
    (3, 'integer >= 2')
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number_above(low: float, *, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number ``> low`` (``>= low`` with ``inclusive``)."""
    what = f"a number {'>=' if inclusive else '>'} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1 (``"1,2"``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def shape(text: str) -> dict[str, Any]:
    """An argparse type: a tensor shape ``NxC``, ``NxCxHxW`` or ``cl:NxCxHxW`` (channels_last).

    >>> shape("cl:2x64x7x7")
    {'shape': (2, 64, 7, 7), 'layout': 'channels_last', 'name': 'cl:2x64x7x7'}
    """
    layout, spec = "contiguous", text.strip()
    if spec.startswith("cl:"):
        layout, spec = "channels_last", spec[3:]
    try:
        dims = tuple(int(d) for d in spec.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected NxC or NxCxHxW") from None
    if len(dims) not in (2, 4) or min(dims) < 1 or (layout == "channels_last" and len(dims) != 4):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected NxC, NxCxHxW or "
                                         "cl:NxCxHxW, every size >= 1")
    name = ("cl:" if layout == "channels_last" else "") + "x".join(map(str, dims))
    return {"shape": dims, "layout": layout, "name": name}


def shape_list(text: str) -> list[dict[str, Any]]:
    """An argparse type: comma-separated :func:`shape` s."""
    shapes = [shape(s) for s in text.split(",") if s.strip()]
    if not shapes:
        raise argparse.ArgumentTypeError(f"expected at least one shape, got {text!r}")
    return shapes


def existing_dir(text: str) -> str:
    """An argparse type: a directory that exists."""
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


def out_dir(text: str | os.PathLike[str], option: str = "--out") -> Path:
    """Create the output directory ``text`` if needed and check that it is writable, before any
    work starts (not at parse time, so that a later bad option leaves nothing behind).

    Raises :class:`UsageError` naming ``option``.
    """
    path = Path(text).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option} {str(text)!r}: cannot create the directory "
                         f"({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {str(text)!r}: the directory is not writable")
    return path
