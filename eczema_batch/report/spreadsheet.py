"""CSV that a spreadsheet opens without running anything, and that reads back as it was written.

Two rules for every CSV eczema-batch writes:

- A cell that holds a CR or an LF is quoted. The csv module quotes a cell only when it holds the
  delimiter, the quote or a character of its own line terminator, so a writer whose terminator is
  "\\n" leaves "\\r" bare, and a reader ends the record there. Records are written with the
  terminator CRLF, which quotes both, and end in "\\n" on the page (`record_writer`).
- By default a text cell that a spreadsheet would read as a formula (it starts with `=`, `+`, `-`,
  `@`, a tab, CR or LF: OWASP's CSV injection list) gets a leading `'`, and a spreadsheet keeps
  it as text (`spreadsheet_text`). A value that is a plain number (`-0.5`,
  `+3`) stays as it is: a spreadsheet reads it as the number it is, and runs nothing. Only text
  cells are checked: the numbers eczema-batch formats itself never are. `--verbatim` keeps every
  value as stored, for R or pandas.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable
from typing import Any, TextIO

#: First characters that make a spreadsheet evaluate a cell (OWASP "CSV Injection"), and LF.
FORMULA_START = frozenset("=+-@\t\r\n")
#: A plain decimal number, as a spreadsheet reads one.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def spreadsheet_text(value: str | None) -> str | None:
    """`value`, with a leading `'` if a spreadsheet would read it as a formula."""
    if not value or value[0] not in FORMULA_START or _NUMBER.fullmatch(value):
        return value
    return "'" + value


class _Records:
    """A file for csv.writer: each record's CRLF becomes `end` on the way to `out`."""

    __slots__ = ("write",)

    def __init__(self, out: TextIO, end: str) -> None:
        write = out.write
        self.write: Callable[[str], Any] = (
            (lambda line: write(line[:-2] + end)) if end else (lambda line: write(line[:-2])))


def record_writer(out: TextIO, *, end: str = "\n") -> Callable[[Iterable[Any]], Any]:
    """`writerow` for `out`: every cell holding CR or LF is quoted, each record ends in `end`.

    `end=""` leaves a record open, for cells the caller writes after it (a rendered suffix).
    """
    return csv.writer(_Records(out, end), lineterminator="\r\n").writerow
