"""Who and when: a file's patient, visit and body site, from the manifest, DICOM tags and folders.

Precedence: manifest over DICOM tags over folder names. A file in a visit folder whose name holds no
date takes the date of the other files in that folder when they all agree on one (a DICOM image of
the visit usually carries it); the visit then records where its date came from.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from dataclasses import dataclass

from eczema_batch.ingest.manifest import ManifestRow, check_subject_code
from eczema_batch.ingest.read import FileRead
from eczema_batch.ingest.scan import layout_of

#: A visit folder named like 2024-01-15, 20240115 or 2024-01-15_baseline carries its date.
FOLDER_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})(?:\D|$)")
INHERITED = "same-folder"


@dataclass(frozen=True)
class Identity:
    patient: str
    patient_source: str
    visit_label: str
    visit_date: dt.date | None
    date_source: str
    body_site: str | None


def folder_date(name: str | None) -> dt.date | None:
    if not name or not (match := FOLDER_DATE.match(name)):
        return None
    try:
        return dt.date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def _own_date(read: FileRead, row: ManifestRow | None) -> tuple[dt.date | None, str]:
    if row is not None and row.visit_date is not None:
        return row.visit_date, "manifest"
    if read.dicom is not None and read.dicom.visit_date is not None:
        return read.dicom.visit_date, read.dicom.date_source or "dicom"
    layout = layout_of(read.rel)
    if (date := folder_date(layout.visit_folder)) is not None:
        return date, "folder"
    return None, "none"


def _patient(read: FileRead, row: ManifestRow | None) -> tuple[str | None, str]:
    if row is not None and row.patient:
        return row.patient, "manifest"
    tags = read.dicom
    if tags is not None and tags.subject_code and check_subject_code(tags.subject_code) is None:
        return tags.subject_code, tags.subject_source or "dicom"
    folder = layout_of(read.rel).patient
    if folder and check_subject_code(folder) is None:
        return folder, "folder"
    return None, "none"


def resolve_identities(
    reads: list[FileRead], rows: dict[str, ManifestRow]
) -> dict[str, Identity | str]:
    """Identity per file, or the reason none can be given."""
    own = {read.rel: _own_date(read, rows.get(read.rel)) for read in reads}
    # Dates each (patient folder, visit folder) group agrees on, for files that have none.
    group_dates: dict[tuple[str | None, str | None], set[dt.date]] = defaultdict(set)
    for read in reads:
        date, _ = own[read.rel]
        layout = layout_of(read.rel)
        if date is not None and layout.visit_folder is not None:
            group_dates[(layout.patient, layout.visit_folder)].add(date)

    result: dict[str, Identity | str] = {}
    for read in reads:
        row = rows.get(read.rel)
        patient, patient_source = _patient(read, row)
        if patient is None:
            result[read.rel] = (
                "cannot tell the patient: put the file in a PATIENT/VISIT/ folder or give its "
                "patient in manifest.csv"
            )
            continue
        date, date_source = own[read.rel]
        layout = layout_of(read.rel)
        if date is None:
            agreed = group_dates.get((layout.patient, layout.visit_folder), set())
            if len(agreed) == 1:
                date, date_source = next(iter(agreed)), INHERITED
        timepoint = read.dicom.timepoint if read.dicom is not None else None
        label = date.isoformat() if date else (timepoint or layout.visit_folder)
        if label is None:
            result[read.rel] = (
                "cannot tell the visit: put the file in a PATIENT/VISIT/ folder or give its "
                "visit_date in manifest.csv"
            )
            continue
        if date is None and timepoint:
            date_source = "ClinicalTrialTimePointID"
        body_site = (row.body_site if row is not None else None) or (
            read.dicom.body_site if read.dicom is not None else None
        )
        result[read.rel] = Identity(
            patient=patient,
            patient_source=patient_source,
            visit_label=label[:128],
            visit_date=date,
            date_source=date_source,
            body_site=body_site[:64] if body_site else None,
        )
    return result
