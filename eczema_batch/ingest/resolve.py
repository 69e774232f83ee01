"""Who and when: a file's patient, visit and body site, from the manifest, DICOM tags and folders.

Precedence for the patient: the manifest, then DICOM ClinicalTrialSubjectID, then (only for a
study that keys on PatientID, as a keyed pseudonym) DICOM PatientID, then the patient folder. For
the date: the manifest, then the DICOM dates, then a date in the visit folder's name. A file in a
visit folder whose name holds no date takes the date of the other files in that folder when they
all agree on one (a DICOM image of the visit usually carries it); the visit then records where its
date came from.

Every name that becomes an identifier is normalised and validated (`eczema_batch.identifiers`):
a folder named `2024‐01‐15` with Unicode hyphens is the visit of 2024-01-15, a visit folder name
longer than the label column is refused, never cut. Where DICOM and the folders disagree on the
patient or the date, a note says so (ingest prints them, `status --sources` lists them); a note
quotes subject codes and dates, never another tag's value.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from eczema_batch.identifiers import (
    IdentifierError,
    normalise,
    normalise_code,
    normalise_label,
)
from eczema_batch.ingest.manifest import ManifestRow
from eczema_batch.ingest.read import FileRead
from eczema_batch.ingest.scan import layout_of

#: A visit folder named like 2024-01-15, 20240115 or 2024-01-15_baseline carries its date
#: (matched on the normalised name, ASCII digits only).
FOLDER_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})(?:\D|$)", re.ASCII)
INHERITED = "same-folder"
FOLDER = "folder"
MANIFEST = "manifest"


@dataclass(frozen=True)
class Identity:
    patient: str
    patient_source: str
    visit_label: str
    visit_date: dt.date | None
    date_source: str
    body_site: str | None


@dataclass(frozen=True)
class SourceNote:
    """What the sources of a file's patient or date disagree on, for its PATIENT/VISIT folder."""

    folder: str
    note: str


@dataclass
class Resolution:
    #: identity per file, or the reason none can be given
    identities: dict[str, Identity | str] = field(default_factory=dict)
    #: one per file it concerns (the caller counts them)
    notes: list[SourceNote] = field(default_factory=list)


def folder_date(name: str | None) -> dt.date | None:
    if not name:
        return None
    try:
        text = normalise(name)
    except IdentifierError:
        return None
    if not (match := FOLDER_DATE.match(text)):
        return None
    try:
        return dt.date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def folder_code(name: str | None) -> str | None:
    """The subject code a patient folder's name gives, or None."""
    if not name:
        return None
    try:
        return normalise_code(name)
    except IdentifierError:
        return None


def _own_date(read: FileRead, row: ManifestRow | None) -> tuple[dt.date | None, str]:
    if row is not None and row.visit_date is not None:
        return row.visit_date, MANIFEST
    if read.dicom is not None and read.dicom.visit_date is not None:
        return read.dicom.visit_date, read.dicom.date_source or "dicom"
    layout = layout_of(read.rel)
    if (date := folder_date(layout.visit_folder)) is not None:
        return date, FOLDER
    return None, "none"


def _patient(read: FileRead, row: ManifestRow | None) -> tuple[str | None, str]:
    if row is not None and row.patient:
        return row.patient, MANIFEST
    tags = read.dicom
    if tags is not None and tags.subject_code:
        return tags.subject_code, tags.subject_source or "dicom"
    if (code := folder_code(layout_of(read.rel).patient)) is not None:
        return code, FOLDER
    return None, "none"


def _folder_of(rel: str) -> str:
    layout = layout_of(rel)
    return "/".join(p for p in (layout.patient, layout.visit_folder) if p) or "."


def _disagreements(read: FileRead, identity: Identity) -> Iterable[str]:
    """What DICOM says that the folders contradict (or that could not be used)."""
    tags = read.dicom
    if tags is None:
        return
    layout = layout_of(read.rel)
    if tags.subject_problem is not None and identity.patient_source != MANIFEST:
        yield (f"DICOM {tags.subject_problem}: not used (its value is not shown); the patient is "
               f"{identity.patient} (from the {identity.patient_source})")
    from_folder = folder_code(layout.patient)
    if (tags.subject_source == "ClinicalTrialSubjectID" and tags.subject_code
            and from_folder is not None and tags.subject_code != from_folder
            and identity.patient_source != MANIFEST):
        yield (f"DICOM ClinicalTrialSubjectID says patient {tags.subject_code}, the folder says "
               f"{from_folder}: catalogued as {identity.patient}")
    named = folder_date(layout.visit_folder)
    if (tags.visit_date is not None and named is not None and tags.visit_date != named
            and identity.date_source != MANIFEST):
        yield (f"DICOM {tags.date_source} says {tags.visit_date.isoformat()}, the folder name says "
               f"{named.isoformat()}: dated {tags.visit_date.isoformat()}")


def _visit_label(
    read: FileRead, date: dt.date | None, notes: list[SourceNote]
) -> tuple[str | None, str | None, str | None]:
    """(label, date source when the label is a time point, or why no label can be given)."""
    if date is not None:
        return date.isoformat(), None, None
    timepoint = read.dicom.timepoint if read.dicom is not None else None
    if timepoint:
        try:
            return normalise_label(timepoint), "ClinicalTrialTimePointID", None
        except IdentifierError as exc:
            notes.append(SourceNote(_folder_of(read.rel), (
                f"DICOM ClinicalTrialTimePointID {exc}: not used (its value is not shown)")))
    visit_folder = layout_of(read.rel).visit_folder
    if visit_folder is None:
        return None, None, (
            "cannot tell the visit: put the file in a PATIENT/VISIT/ folder or give its "
            "visit_date in manifest.csv"
        )
    try:
        return normalise_label(visit_folder), None, None
    except IdentifierError as exc:
        return None, None, (
            f"the visit folder's name {exc}, so it cannot name the visit: rename the folder, or "
            "give the file's visit_date in manifest.csv"
        )


def resolve_identities(reads: list[FileRead], rows: dict[str, ManifestRow]) -> Resolution:
    """Identity per file, or the reason none can be given; and where the sources disagree."""
    own = {read.rel: _own_date(read, rows.get(read.rel)) for read in reads}
    # Dates each (patient folder, visit folder) group agrees on, for files that have none.
    group_dates: dict[tuple[str | None, str | None], set[dt.date]] = defaultdict(set)
    for read in reads:
        date, _ = own[read.rel]
        layout = layout_of(read.rel)
        if date is not None and layout.visit_folder is not None:
            group_dates[(layout.patient, layout.visit_folder)].add(date)

    result = Resolution()
    for read in reads:
        row = rows.get(read.rel)
        patient, patient_source = _patient(read, row)
        if patient is None:
            result.identities[read.rel] = (
                "cannot tell the patient: put the file in a PATIENT/VISIT/ folder whose name is a "
                "subject code (letters, digits, '-', '_', '.') or give its patient in manifest.csv"
            )
            continue
        date, date_source = own[read.rel]
        layout = layout_of(read.rel)
        if date is None:
            agreed = group_dates.get((layout.patient, layout.visit_folder), set())
            if len(agreed) == 1:
                date, date_source = next(iter(agreed)), INHERITED
        label, label_source, problem = _visit_label(read, date, result.notes)
        if label is None:
            result.identities[read.rel] = problem or "cannot tell the visit"
            continue
        if label_source is not None:
            date_source = label_source
        body_site = (row.body_site if row is not None else None) or (
            read.dicom.body_site if read.dicom is not None else None
        )
        identity = Identity(
            patient=patient,
            patient_source=patient_source,
            visit_label=label,
            visit_date=date,
            date_source=date_source,
            body_site=body_site[:64] if body_site else None,
        )
        result.identities[read.rel] = identity
        result.notes.extend(SourceNote(_folder_of(read.rel), note)
                            for note in _disagreements(read, identity))
    return result


def look_alike_folders(rels: Iterable[str]) -> list[str]:
    """Warnings for folders whose names differ but are one patient or visit once normalised.

    `P001` and `Ｐ００１`, or `2024-01-15` and `2024‐01‐15` (Unicode hyphens), are one identifier:
    their files are catalogued together, and the user is told, with the names spelt out in ASCII
    so that the difference shows.
    """
    patients: dict[str, set[str]] = defaultdict(set)
    visits: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rel in rels:
        layout = layout_of(rel)
        code = folder_code(layout.patient)
        if code is None or layout.patient is None:
            continue
        patients[code].add(layout.patient)
        if layout.visit_folder is None:
            continue
        try:
            visit = normalise(layout.visit_folder)
        except IdentifierError:
            continue
        visits[(code, visit)].add(layout.visit_folder)
    warnings = [
        f"patient folders {', '.join(ascii(n) for n in sorted(names))} are one patient, {code}: "
        "their names differ only in how they are written"
        for code, names in sorted(patients.items()) if len(names) > 1
    ]
    warnings += [
        f"visit folders {', '.join(ascii(n) for n in sorted(names))} of patient {code} are one "
        "visit: their names differ only in how they are written"
        for (code, _), names in sorted(visits.items()) if len(names) > 1
    ]
    return warnings
