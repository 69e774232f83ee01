"""Read-only questions the commands ask of the catalogue."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from eczema_batch.catalogue.models import Image, Label, Mask, Patient, Rejection, Study, Visit


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
