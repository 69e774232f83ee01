"""The optional `manifest.csv`: what the study team says about each file.

Columns: `path` (required, relative to the study folder), and any of `patient`, `visit_date`
(YYYY-MM-DD), `body_site`, `severity` (0-3 or a class name), `mask` (relative path of a manual
mask). The manifest wins over DICOM tags and folder names. A bad row does not stop the ingest: the
file it names is rejected with the row's problem, so nothing is catalogued under a wrong date or
patient; fix the row and ingest again.
"""

from __future__ import annotations

import csv
import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from eczema_batch.errors import UsageError

DEFAULT_CLASSES = ("clear", "mild", "moderate", "severe")
KNOWN_COLUMNS = frozenset({"path", "patient", "visit_date", "body_site", "severity", "mask"})
#: Subject codes are short identifiers; spaces or commas suggest a name was typed instead.
SUBJECT_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,63}$")


@dataclass(frozen=True)
class ManifestRow:
    line: int
    path: str
    patient: str | None = None
    visit_date: dt.date | None = None
    body_site: str | None = None
    severity: int | None = None
    mask: str | None = None


@dataclass
class Manifest:
    rows: dict[str, ManifestRow] = field(default_factory=dict)
    #: relative path (or `manifest.csv:LINE`) -> reason
    problems: dict[str, str] = field(default_factory=dict)


def _normalise_path(raw: str) -> str | None:
    text = raw.strip().replace("\\", "/")
    if not text:
        return None
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts:
        return None
    return path.as_posix()


def check_subject_code(code: str) -> str | None:
    """The reason `code` is not usable as a subject code, or None."""
    if not SUBJECT_CODE.match(code):
        return (
            f"patient {code!r} is not a subject code (letters, digits, '-', '_', '.' only; "
            "never a name)"
        )
    return None


def parse_severity(raw: str, classes: tuple[str, ...] = DEFAULT_CLASSES) -> int:
    text = raw.strip().lower()
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    if text in classes:
        return classes.index(text)
    raise ValueError(
        f"severity {raw.strip()!r} is not one of 0-{len(classes) - 1} or {', '.join(classes)}"
    )


def read_manifest(path: Path, classes: tuple[str, ...] = DEFAULT_CLASSES) -> Manifest:
    """Parse the manifest; a malformed file as a whole is a UsageError, a bad row a problem."""
    manifest = Manifest()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path.name} is not UTF-8 text: save it as CSV (UTF-8)") from exc
    reader = csv.DictReader(text.splitlines())
    header = [name.strip() for name in (reader.fieldnames or [])]
    if "path" not in header:
        raise UsageError(
            f"{path.name} has no 'path' column: the header must be "
            "path,patient,visit_date,body_site,severity,mask"
        )
    unknown = sorted(set(header) - KNOWN_COLUMNS)
    if unknown:
        raise UsageError(
            f"{path.name} has unknown columns {', '.join(unknown)}: allowed are "
            "path,patient,visit_date,body_site,severity,mask"
        )
    for number, record in enumerate(reader, start=2):
        fields = {(k or "").strip(): (v or "").strip() for k, v in record.items() if k}
        where = f"{path.name} line {number}"
        rel = _normalise_path(fields.get("path", ""))
        if rel is None:
            manifest.problems[f"{path.name}:{number}"] = (
                f"{where}: path {fields.get('path', '')!r} must be relative to the study folder"
            )
            continue
        try:
            row = _parse_row(number, rel, fields, classes)
        except ValueError as exc:
            manifest.problems[rel] = f"{where}: {exc}"
            continue
        if rel in manifest.rows:
            manifest.problems[rel] = (
                f"{where}: {rel} is listed twice (first on line {manifest.rows[rel].line})"
            )
            del manifest.rows[rel]
            continue
        manifest.rows[rel] = row
    return manifest


def _parse_row(
    line: int, rel: str, fields: dict[str, str], classes: tuple[str, ...]
) -> ManifestRow:
    patient = fields.get("patient") or None
    if patient is not None and (reason := check_subject_code(patient)):
        raise ValueError(reason)
    visit_date = None
    if raw_date := fields.get("visit_date"):
        try:
            visit_date = dt.date.fromisoformat(raw_date)
        except ValueError:
            raise ValueError(f"visit_date {raw_date!r} is not a date (use YYYY-MM-DD)") from None
    severity = parse_severity(fields["severity"], classes) if fields.get("severity") else None
    mask = None
    if raw_mask := fields.get("mask"):
        mask = _normalise_path(raw_mask)
        if mask is None:
            raise ValueError(f"mask {raw_mask!r} must be relative to the study folder")
    return ManifestRow(
        line=line,
        path=rel,
        patient=patient,
        visit_date=visit_date,
        body_site=fields.get("body_site") or None,
        severity=severity,
        mask=mask,
    )
