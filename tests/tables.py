"""Read back a table the command-line tools print (``syncbn.cli._table``): rows by column name."""

from __future__ import annotations

import re

WIDTH = 120  # no line of a printed table is wider


def read_table(text: str, first_column: str) -> list[dict[str, str]]:
    """The rows of the table in ``text`` whose header starts with ``first_column``, each a dict
    from column name to cell. Columns are separated by two or more spaces; the table ends at the
    first blank line. Fails (AssertionError) when there is no such table or a line is too wide."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(first_column + "  ")]
    assert starts, f"no table starting with {first_column!r} in:\n{text}"
    header = re.split(r"\s{2,}", lines[starts[0]].strip())
    assert set(lines[starts[0] + 1].replace(" ", "")) == {"-"}, lines[starts[0] + 1]
    rows = []
    for i, line in enumerate(lines[starts[0]:]):
        if not line.strip():
            break
        assert len(line) <= WIDTH, f"table line of {len(line)} > {WIDTH} characters: {line!r}"
        if i < 2:  # the header and the dashes
            continue
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), f"{len(cells)} cells for {len(header)} columns: {line!r}"
        rows.append(dict(zip(header, cells)))
    return rows
