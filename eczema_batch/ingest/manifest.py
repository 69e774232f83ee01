"""The optional `manifest.csv`: what the study team says about each file.

Columns: `path` (required, relative to the study folder), and any of `patient`, `visit_date`
(YYYY-MM-DD), `body_site`, `severity` (0-3 or a class name), `mask` (relative path of a manual
mask), `rater` (who gave the severity), `fitzpatrick` (skin type 1-6 or I-VI). The manifest wins
over DICOM tags and folder names.

Several raters: with a `rater` column, an image may have one row per rater (its other cells
blank or the same on every row). A path listed twice for one rater (or twice without a `rater`
column) rejects its file, naming both lines: which label counts would be a guess.

Spreadsheets save "CSV" with commas, or with semicolons or tabs where the comma is the decimal
separator, often with a byte-order mark and CRLF line ends: the delimiter is told from the header
line. A column the tool does not know is ignored with a warning (spreadsheets collect notes
columns), not a stop.

A bad row does not stop the ingest. A wrong patient, date or path rejects the file it names, so
nothing is catalogued under a wrong visit; a wrong severity, mask or Fitzpatrick type rejects only
that
(`ManifestRow.parts`) and the photograph is catalogued without it. Fix the row and ingest again.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from eczema_batch.errors import UsageError
from eczema_batch.identifiers import check_subject_code, normalise_code
from eczema_batch.ingest.rejections import FITZPATRICK, LABEL, MASK, PartProblem
from eczema_batch.severity import DEFAULT_CLASSES, parse_severity

COLUMNS = ("path", "patient", "visit_date", "body_site", "severity", "mask", "rater",
           "fitzpatrick")
#: Longest rater name the catalogue stores (labels.rater).
MAX_RATER = 64
#: The cells every row of one image must agree on (a blank cell agrees with any).
SHARED = ("patient", "visit_date", "body_site", "mask", "fitzpatrick")
KNOWN_COLUMNS = frozenset(COLUMNS)
#: Delimiter -> its name in messages, in the order ties are broken.
DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}


@dataclass(frozen=True)
class ManifestRow:
    line: int
    path: str
    patient: str | None = None
    visit_date: dt.date | None = None
    body_site: str | None = None
    severity: int | None = None
    mask: str | None = None
    #: the row's label or mask that cannot be used; the photograph is catalogued without it
    parts: tuple[PartProblem, ...] = ()
    #: who gave `severity` (the `rater` column; None without one)
    rater: str | None = None
    #: every (rater, severity) of the image's rows, in file order
    ratings: tuple[tuple[str | None, int], ...] = ()
    #: Fitzpatrick skin type, 1-6 (None: not given)
    fitzpatrick: int | None = None


@dataclass
class Manifest:
    rows: dict[str, ManifestRow] = field(default_factory=dict)
    #: relative path (or `manifest.csv:LINE`) -> reason, for rows that reject their file
    problems: dict[str, str] = field(default_factory=dict)
    #: things the user should know that stop nothing (columns ignored)
    warnings: list[str] = field(default_factory=list)


def _normalise_path(raw: str) -> str | None:
    text = raw.strip().replace("\\", "/")
    if not text:
        return None
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts:
        return None
    return path.as_posix()


def sniff_delimiter(header: str, name: str) -> str:
    """The delimiter that splits the header line into columns, one of them `path`.

    csv.Sniffer guesses from character frequencies and can pick a letter on one short line; the
    header's own column names are a surer test.
    """
    splits = {d: [c.strip() for c in next(csv.reader([header], delimiter=d))] for d in DELIMITERS}
    with_path = [d for d, columns in splits.items() if "path" in columns]
    if with_path:
        return max(with_path, key=lambda d: len(splits[d]))  # max keeps the first of a tie
    if all(len(columns) <= 1 for columns in splits.values()):
        *names, last = DELIMITERS.values()
        raise UsageError(
            f"cannot tell how the columns of {name} are separated: tried {', '.join(names)} and "
            f"{last}, and its first line {header[:80]!r} is one column, not 'path'. The header "
            f"must be {','.join(COLUMNS)} (commas, semicolons or tabs between)"
        )
    raise UsageError(
        f"{name} has no 'path' column: the header must be {','.join(COLUMNS)}"
    )


def read_manifest(
    path: Path, classes: tuple[str, ...] = DEFAULT_CLASSES, *, data: bytes | None = None
) -> Manifest:
    """Parse the manifest; a malformed file as a whole is a UsageError, a bad row a problem.

    `data` is its content when the caller has read it already (ingest reads study files only
    through `eczema_batch.studyfiles`); `path` then names it in messages.

    The csv module reads the text as a file object opened with `newline=""`: records end only
    where CSV says (CR, LF or CRLF outside quotes), so a quoted line break stays in its cell as it
    was written, and U+0085, U+2028, form feeds and the other characters `str.splitlines` breaks
    at are a cell's text, never the end of a row.
    """
    try:
        raw = path.read_bytes() if data is None else data
        # -sig: drops Excel's byte-order mark
        with io.StringIO(raw.decode("utf-8-sig"), newline="") as handle:
            return _read_rows(handle, path.name, classes)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path.name} is not UTF-8 text: save it as CSV (UTF-8)") from exc


def _read_rows(lines: Iterator[str], name: str, classes: tuple[str, ...]) -> Manifest:
    manifest = Manifest()
    # Blank lines above the header (a spreadsheet's empty first row) are skipped, and counted so
    # that problems still name the line the user sees.
    skipped = 0
    for first in lines:
        if first.strip():
            break
        skipped += 1
    else:
        raise UsageError(f"{name} is empty: its first line must be {','.join(COLUMNS)}")
    delimiter = sniff_delimiter(first.rstrip("\r\n"), name)
    reader = csv.DictReader(itertools.chain([first], lines), delimiter=delimiter)
    header = [column.strip() for column in (reader.fieldnames or []) if column.strip()]
    if twice := sorted({c for c in header if header.count(c) > 1} & KNOWN_COLUMNS):
        raise UsageError(
            f"{name} has the column {', '.join(repr(n) for n in twice)} twice: "
            "keep one, so that it is clear which value counts"
        )
    if unknown := list(dict.fromkeys(n for n in header if n not in KNOWN_COLUMNS)):
        manifest.warnings.append(
            f"{name}: ignored the unknown column{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(n) for n in unknown)} (known columns: {', '.join(COLUMNS)})"
        )
    #: (path, rater) -> the line that rated it
    rated: dict[tuple[str, str | None], int] = {}
    for record in reader:
        number = skipped + reader.line_num  # physical lines: blank and quoted newlines count
        fields = {
            k.strip(): (v or "").strip()
            for k, v in record.items()
            if k and k.strip() in KNOWN_COLUMNS
        }
        if not any(fields.values()):
            continue  # a spreadsheet's empty row, saved as ";;;;;"
        where = f"{name} line {number}"
        rel = _normalise_path(fields.get("path", ""))
        # Every other character is kept as written (and shown escaped); NUL is never text a
        # spreadsheet meant, and PostgreSQL cannot store it.
        if column := next((c for c, v in fields.items() if "\0" in v), None):
            key = rel if rel is not None and column != "path" else f"{name}:{number}"
            manifest.problems[key] = (
                f"{where}: the {column} cell holds a NUL character: fix the cell and ingest again")
            continue
        if rel is None:
            manifest.problems[f"{name}:{number}"] = (
                f"{where}: path {fields.get('path', '')!r} must be relative to the study folder"
            )
            continue
        if rel in manifest.problems:
            continue  # one of its rows rejected the file already
        try:
            row = _parse_row(number, rel, fields, classes, where)
        except ValueError as exc:
            manifest.problems[rel] = f"{where}: {exc}"
            manifest.rows.pop(rel, None)
            continue
        first_line = rated.setdefault((rel, row.rater), number)
        if first_line != number:
            who = "" if "rater" not in header else (
                f" for rater {row.rater!r}" if row.rater else " with no rater")
            manifest.problems[rel] = (
                f"{where}: {rel} is listed twice{who} (first on line {first_line}): keep one "
                "row per image and rater"
            )
            manifest.rows.pop(rel, None)
            continue
        if rel in manifest.rows:
            try:
                row = _merge(manifest.rows[rel], row)
            except ValueError as exc:
                manifest.problems[rel] = f"{where}: {exc}"
                del manifest.rows[rel]
                continue
        manifest.rows[rel] = row
    return manifest


def _merge(before: ManifestRow, row: ManifestRow) -> ManifestRow:
    """Another rater's row of the same image: its shared cells must agree with the first's."""
    shared = {}
    for name in SHARED:
        old, new = getattr(before, name), getattr(row, name)
        if old is not None and new is not None and old != new:
            raise ValueError(f"{name} {str(new)!r} differs from {str(old)!r} on line {before.line} "
                             "of the same path: the rows of one image must agree")
        shared[name] = old if old is not None else new
    return replace(before, **shared, parts=before.parts + row.parts,
                   ratings=before.ratings + row.ratings)


def _parse_row(
    line: int, rel: str, fields: dict[str, str], classes: tuple[str, ...], where: str
) -> ManifestRow:
    """The row; ValueError for what rejects its file, `parts` for what rejects a label or mask."""
    patient = fields.get("patient") or None
    if patient is not None and (reason := check_subject_code(patient)):
        raise ValueError(reason)
    patient = normalise_code(patient) if patient is not None else None  # as folder codes are
    visit_date = None
    if raw_date := fields.get("visit_date"):
        try:
            visit_date = dt.date.fromisoformat(raw_date)
        except ValueError:
            raise ValueError(f"visit_date {raw_date!r} is not a date (use YYYY-MM-DD)") from None
    parts: list[PartProblem] = []
    severity = None
    if raw_severity := fields.get("severity"):
        try:
            severity = parse_severity(raw_severity, classes)
        except ValueError as exc:
            parts.append(PartProblem(LABEL, rel, f"{where}: {exc}"))
    rater = fields.get("rater") or None
    if rater is not None and (len(rater) > MAX_RATER or not rater.isprintable()):
        parts.append(PartProblem(LABEL, rel, f"{where}: rater {rater!r} must be 1 to {MAX_RATER} "
                                 "printable characters (a rater's id such as rater-07)"))
        severity = None
    fitzpatrick = None
    if raw_type := fields.get("fitzpatrick"):
        fitzpatrick = parse_fitzpatrick(raw_type)
        if fitzpatrick is None:
            parts.append(PartProblem(FITZPATRICK, rel, f"{where}: fitzpatrick {raw_type!r} is not "
                                     "a Fitzpatrick skin type: use 1 to 6 or I to VI"))
    mask = None
    if raw_mask := fields.get("mask"):
        mask = _normalise_path(raw_mask)
        if mask is None:
            parts.append(PartProblem(
                MASK, raw_mask, f"{where}: mask {raw_mask!r} must be relative to the study folder"
            ))
    return ManifestRow(
        line=line,
        path=rel,
        patient=patient,
        visit_date=visit_date,
        body_site=fields.get("body_site") or None,
        severity=severity,
        mask=mask,
        parts=tuple(parts),
        rater=rater,
        ratings=() if severity is None else ((rater, severity),),
        fitzpatrick=fitzpatrick,
    )


_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}


def parse_fitzpatrick(text: str) -> int | None:
    """1-6 from "1".."6" or "I".."VI" (any case; "type IV" too, as clinics write it); None for
    anything else."""
    value = text.strip().upper().removeprefix("TYPE").strip()
    if value in _ROMAN:
        return _ROMAN[value]
    return int(value) if value in {"1", "2", "3", "4", "5", "6"} else None
