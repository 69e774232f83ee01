"""Read-only questions the commands ask of the catalogue."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from eczema_batch.catalogue.models import (
    Event,
    Image,
    Label,
    Mask,
    Patient,
    Rejection,
    Study,
    Visit,
)


@dataclass(frozen=True)
class StudyCounts:
    study: str
    root: str
    patients: int
    visits: int
    images: int
    reference_masks: int
    labelled_images: int
    rejected: int
    duplicates: int
    #: images whose DICOM header says the pixels identify the patient
    identifying_pixels: int = 0
    #: images the quality gate flagged (blurred, badly exposed, a colour cast), not cleared
    quality_flagged: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count_by_study(session: Session, stmt: Any) -> dict[int, int]:
    return dict(session.execute(stmt).all())


def study_counts(session: Session) -> list[StudyCounts]:
    """Per study: what the catalogue holds (one grouped query per table, not one per study)."""
    patients = _count_by_study(
        session, select(Patient.study_id, func.count()).group_by(Patient.study_id)
    )
    visits = _count_by_study(
        session,
        select(Patient.study_id, func.count(Visit.id)).join(Visit).group_by(Patient.study_id),
    )
    images = _count_by_study(
        session, select(Image.study_id, func.count()).group_by(Image.study_id)
    )
    references = _count_by_study(
        session,
        select(Image.study_id, func.count(distinct(Mask.image_id)))
        .join(Mask, Mask.image_id == Image.id)
        .where(Mask.kind == "manual")
        .group_by(Image.study_id),
    )
    labelled = _count_by_study(
        session,
        select(Image.study_id, func.count(distinct(Label.image_id)))
        .join(Label, Label.image_id == Image.id)
        .group_by(Image.study_id),
    )
    rejected = _count_by_study(
        session,
        select(Rejection.study_id, func.count())
        .where(Rejection.kind != "duplicate")  # files, and labels or masks of catalogued images
        .group_by(Rejection.study_id),
    )
    duplicates = _count_by_study(
        session,
        select(Rejection.study_id, func.count())
        .where(Rejection.kind == "duplicate")
        .group_by(Rejection.study_id),
    )
    identifying = _count_by_study(
        session,
        select(Image.study_id, func.count())
        .where(Image.identifying_pixels.is_not(None))
        .group_by(Image.study_id),
    )
    flagged = _count_by_study(
        session,
        select(Image.study_id, func.count())
        .where(Image.quality_flag.is_not(None))
        .group_by(Image.study_id),
    )
    return [
        StudyCounts(
            study=study.name,
            root=study.root,
            patients=patients.get(study.id, 0),
            visits=visits.get(study.id, 0),
            images=images.get(study.id, 0),
            reference_masks=references.get(study.id, 0),
            labelled_images=labelled.get(study.id, 0),
            rejected=rejected.get(study.id, 0),
            duplicates=duplicates.get(study.id, 0),
            identifying_pixels=identifying.get(study.id, 0),
            quality_flagged=flagged.get(study.id, 0),
        )
        for study in session.scalars(select(Study).order_by(Study.name))
    ]


def rejections(session: Session, study: str | None = None) -> list[tuple[str, str, str, str]]:
    """(study, path, kind, reason) of every file, label or mask not catalogued."""
    stmt = (
        select(Study.name, Rejection.path, Rejection.kind, Rejection.reason)
        .join(Study)
        .order_by(Study.name, Rejection.path)
    )
    if study is not None:
        stmt = stmt.where(Study.name == study)
    return [tuple(row) for row in session.execute(stmt)]  # type: ignore[misc]


@dataclass
class VisitSource:
    visit: str
    date: dt.date | None
    #: manifest, a DICOM date tag (StudyDate...), folder, same-folder, ClinicalTrialTimePointID
    #: or none
    date_source: str
    images: int


@dataclass
class PatientSource:
    patient: str
    #: manifest, ClinicalTrialSubjectID, PatientID-HMAC or folder
    code_source: str
    visits: list[VisitSource] = field(default_factory=list)


@dataclass
class StudySources:
    """Where a study's subject codes and visit dates came from, for a coordinator to check."""

    study: str
    root: str
    patients: list[PatientSource] = field(default_factory=list)
    #: what DICOM and the folders disagreed on when files were ingested: {folder, note, files, at}
    notes: list[dict[str, Any]] = field(default_factory=list)

    def code_counts(self) -> dict[str, int]:
        return _by_count(Counter(p.code_source for p in self.patients))

    def date_counts(self) -> dict[str, int]:
        return _by_count(Counter(v.date_source for p in self.patients for v in p.visits))

    def as_dict(self) -> dict[str, Any]:
        return {
            "study": self.study, "root": self.root, "codes": self.code_counts(),
            "dates": self.date_counts(),
            "patients": [{
                "patient": p.patient, "code_source": p.code_source,
                "visits": [{"visit": v.visit, "date": v.date.isoformat() if v.date else None,
                            "date_source": v.date_source, "images": v.images}
                           for v in p.visits],
            } for p in self.patients],
            "notes": self.notes,
        }


def _by_count(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def subject_sources(session: Session, study: str | None = None) -> list[StudySources]:
    """Per study, every patient with where its code came from, and every visit with its date's."""
    stmt = select(Study).order_by(Study.name)
    if study is not None:
        stmt = stmt.where(Study.name == study)
    studies = {s.id: StudySources(s.name, s.root) for s in session.scalars(stmt)}
    images = (select(Image.visit_id, func.count().label("n")).group_by(Image.visit_id)
              .subquery())
    rows = session.execute(
        select(Patient.study_id, Patient.id, Patient.subject_code, Patient.code_source,
               Visit.label, Visit.visit_date, Visit.date_source, func.coalesce(images.c.n, 0))
        .join(Visit, Visit.patient_id == Patient.id, isouter=True)
        .join(images, images.c.visit_id == Visit.id, isouter=True)
        .where(Patient.study_id.in_(studies))
        .order_by(Patient.study_id, Patient.subject_code, Visit.visit_date.is_(None),
                  Visit.visit_date, Visit.label)
    )
    current: dict[int, PatientSource] = {}
    for study_id, pid, code, code_source, label, date, date_source, n in rows:
        if pid not in current:
            current[pid] = PatientSource(code, code_source)
            studies[study_id].patients.append(current[pid])
        if label is not None:
            current[pid].visits.append(VisitSource(label, date, date_source, int(n)))
    for study_id, at, detail in session.execute(
        select(Event.subject_id, Event.at, Event.detail)
        .where(Event.kind == "ingest", Event.subject_type == "study",
               Event.subject_id.in_(studies))
        .order_by(Event.at, Event.id)
    ):
        for note in (detail or {}).get("notes", []):
            studies[study_id].notes.append({**note, "at": at.isoformat()})
    return list(studies.values())
