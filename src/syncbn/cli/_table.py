"""The tools' tables: named columns, two spaces between them, at most 120 characters wide.

Columns are separated by at least two spaces and a header never contains two spaces in a row,
so a table can be read back by splitting each line at runs of two or more spaces.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["WIDTH", "table"]

#: The widest line a tool prints in a table; what does not fit goes to the JSON.
WIDTH = 120


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Header, a line of dashes and the rows; the first ``left`` columns left-aligned, the others
    right-aligned.

    >>> print(table(["name", "ms"], [["a", "1.5"], ["bb", "12.0"]]))
    name    ms
    ----  ----
    a      1.5
    bb    12.0
    """
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths),
                      *(line(r) for r in rows)])
