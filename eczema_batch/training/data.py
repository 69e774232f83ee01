"""What training and evaluation read from the catalogue: labelled images and reference images.

An image's truth is its reference label under a rule (`catalogue.labels`: the newest label by
default, or the raters' majority, or an adjudicator's); an image without a label is not used, nor
one that no longer decodes. References are the images with a manual mask: they prompt
SegGPT whether or not they carry a label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from eczema_batch.catalogue.labels import ReferenceRule, parse_reference_rule, reference_labels
from eczema_batch.catalogue.models import Image, Mask, Patient, Study, Visit
from eczema_batch.errors import UsageError
from eczema_batch.severity import DEFAULT_CLASSES


@dataclass(frozen=True)
class LabelledImages:
    """Parallel arrays, ordered by image id."""

    image_ids: np.ndarray
    labels: np.ndarray
    patient_ids: np.ndarray
    study_ids: np.ndarray
    #: patient id -> subject code (for the predictions CSV; never a name)
    patient_codes: dict[int, str]
    classes: tuple[str, ...] = DEFAULT_CLASSES

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass(frozen=True)
class References:
    image_ids: np.ndarray
    patient_ids: np.ndarray
    study_ids: np.ndarray


def study_id(session: Session, study: str | None) -> int | None:
    if study is None:
        return None
    found = session.scalar(select(Study.id).where(Study.name == study))
    if found is None:
        raise UsageError(f"no study named {study!r}: `eczema-batch status` lists the studies")
    return found


def newest_labels(session: Session, *, study: str | None = None,
                  rule: ReferenceRule | str = "newest") -> dict[int, int]:
    """image id -> severity of its reference label under `rule` (default: the newest label,
    latest created_at then highest id; blinded repeats never count)."""
    return reference_labels(session, rule=parse_reference_rule(rule),
                            study_id=study_id(session, study))


def labelled_images(
    session: Session, *, study: str | None = None, classes: tuple[str, ...] = DEFAULT_CLASSES,
    rule: ReferenceRule | str = "newest",
) -> LabelledImages:
    labels = newest_labels(session, study=study, rule=rule)
    ids = sorted(labels)
    rows = {
        iid: (pid, sid, code)
        for iid, pid, sid, code in session.execute(
            select(Image.id, Visit.patient_id, Image.study_id, Patient.subject_code)
            .join(Visit, Image.visit_id == Visit.id)
            .join(Patient, Visit.patient_id == Patient.id)
            .where(Image.id.in_(ids))
        )
    }
    bad = sorted({labels[i] for i in ids if not 0 <= labels[i] < len(classes)})
    if bad:
        raise UsageError(
            f"labels {bad} are outside the {len(classes)} classes ({', '.join(classes)})"
        )
    return LabelledImages(
        image_ids=np.array(ids, dtype=np.int64),
        labels=np.array([labels[i] for i in ids], dtype=np.int64),
        patient_ids=np.array([rows[i][0] for i in ids], dtype=np.int64),
        study_ids=np.array([rows[i][1] for i in ids], dtype=np.int64),
        patient_codes={rows[i][0]: rows[i][2] for i in ids},
        classes=classes,
    )


def references(session: Session, *, study: str | None = None) -> References:
    sid = study_id(session, study)
    stmt = (
        select(Image.id, Visit.patient_id, Image.study_id)
        .join(Visit, Image.visit_id == Visit.id)
        .where(
            Image.decode_status == "ok",
            Image.id.in_(select(Mask.image_id).where(Mask.kind == "manual")),
        )
        .order_by(Image.id)
    )
    if sid is not None:
        stmt = stmt.where(Image.study_id == sid)
    rows = session.execute(stmt).all()
    return References(
        image_ids=np.array([r[0] for r in rows], dtype=np.int64),
        patient_ids=np.array([r[1] for r in rows], dtype=np.int64),
        study_ids=np.array([r[2] for r in rows], dtype=np.int64),
    )
