"""The review queue: which predictions a clinician should look at, and recording their decision.

An unreviewed prediction is flagged when its top class probability is low, its mask is flagged
(SegGPT found no lesion, or no reference image could prompt it), or its SegGPT prompts were weakly
similar to it (thresholds in Settings, ECZEMA_BATCH_REVIEW_*). An unreviewed photograph the
image-quality gate flagged at ingest (blurred, badly exposed, a colour cast) is in the queue too,
scored or not. A decision is a new label (source=review) plus an audit event; earlier labels and
the prediction stay as they were, and the newest reviewed label is what reports use for that image.
A reviewer who finds a flagged photograph good enough to score clears its flag
(`clear_quality_flag`, also an audit event): `run --quality skip` then scores it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.db import transaction
from eczema_batch.catalogue.labels import REVIEW_REPEAT
from eczema_batch.catalogue.models import Event, Image, Label, Prediction
from eczema_batch.errors import UsageError
from eczema_batch.report.queries import (
    HeadInfo,
    ReviewThresholds,
    check_scope,
    choose_head,
    flag_reasons,
    iter_image_records,
)
from eczema_batch.severity import DEFAULT_CLASSES, parse_severity

#: Event.kind of a recorded review decision.
REVIEW_EVENT = "review.label"
#: Event.kind of a quality flag a reviewer cleared.
QUALITY_CLEARED_EVENT = "review.quality_cleared"
#: Longest rater name the catalogue stores (labels.rater).
MAX_RATER = 64
#: C0 and C1 control characters but line breaks and tabs: PostgreSQL refuses NUL in text, and the
#: others only ever hide or rewrite what a terminal shows.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class ReviewItem:
    image_id: int
    study: str
    patient: str
    visit: str
    visit_date: date | None
    body_site: str | None
    predicted: int | None
    predicted_class: str | None
    top_probability: float | None
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        return out


@dataclass(frozen=True)
class ReviewQueue:
    head: HeadInfo | None
    items: list[ReviewItem]


@dataclass(frozen=True)
class ReviewDecision:
    label_id: int
    event_id: int
    image_id: int
    severity: int
    severity_class: str
    rater: str
    note: str | None
    #: what the image's severity was before: the previous review, else the prediction
    previous: int | None
    previous_source: str | None
    #: review, or review-repeat for a blinded reading of an image the rater had labelled
    source: str = "review"
    #: recorded in a blinded pass (`review next`): what the image was before is not shown
    blinded: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.blinded:  # the rater must not learn the model's or another rater's class
            del out["previous"], out["previous_source"]
        return out


def list_review_queue(
    session: Session,
    *,
    thresholds: ReviewThresholds,
    study: str | None = None,
    patient: str | None = None,
    head_id: int | None = None,
) -> ReviewQueue:
    """Flagged, unreviewed predictions in patient and visit order, with why each is flagged."""
    check_scope(session, study=study, patient=patient)
    head = choose_head(session, head_id=head_id)
    # Without a head there are no predictions, but photographs the quality gate flagged.
    classes = head.classes if head is not None else DEFAULT_CLASSES
    items = []
    for record in iter_image_records(session, head=head, thresholds=thresholds, study=study,
                                     patient=patient):
        reasons = flag_reasons(record, thresholds)
        if not reasons:  # the SQL and Python rules agree; this guards a float on the boundary
            continue
        probs = record.probabilities
        items.append(ReviewItem(
            image_id=record.image_id, study=record.study, patient=record.patient,
            visit=record.visit_label, visit_date=record.visit_date, body_site=record.body_site,
            predicted=record.predicted,
            predicted_class=_class_name(classes, record.predicted),
            top_probability=max(probs) if probs else None, reasons=tuple(reasons),
        ))
    return ReviewQueue(head=head, items=items)


def _class_name(classes: tuple[str, ...], k: int | None) -> str | None:
    if k is None:
        return None
    return classes[k] if 0 <= k < len(classes) else str(k)


def record_review(
    factory: sessionmaker[Session],
    *,
    image_id: int,
    severity: str | int,
    rater: str,
    note: str | None = None,
    head_id: int | None = None,
    blinded: bool = False,
) -> ReviewDecision:
    """Record a rater's severity for an image as a new label and an audit event (one commit).

    `blinded`: a reading of the blinded pass (`review next`); where the rater had labelled the
    image before, it is a repeat (source `review-repeat`), which measures their intra-rater
    agreement and leaves their first label the one the reference rule reads.

    Everything that can refuse the decision is checked before the commit, so that a command that
    fails has recorded nothing and running it again records the decision once.
    """
    rater = _check_rater(rater)
    if note is not None and _CONTROL.search(note):
        raise UsageError("--note has a control character (NUL, escape...): write it as plain text; "
                         "line breaks and tabs are fine")
    with transaction(factory) as session:
        if session.scalar(select(Image.id).where(Image.id == image_id)) is None:
            raise UsageError(
                f"no image {image_id} in the catalogue: `eczema-batch review list` shows image ids"
            )
        head = choose_head(session, head_id=head_id)
        classes = head.classes if head else DEFAULT_CLASSES
        level = parse_severity(severity, classes)
        previous, source = _previous(session, image_id, head)
        kind = "review"
        if blinded and session.scalar(select(Label.id).where(
                Label.image_id == image_id, Label.rater == rater,
                Label.source != REVIEW_REPEAT).limit(1)) is not None:
            kind = REVIEW_REPEAT
        label = Label(image_id=image_id, severity=level, source=kind, rater=rater,
                      note=note or None)
        session.add(label)
        session.flush()
        event = Event(
            kind=REVIEW_EVENT, actor=rater, subject_type="image", subject_id=image_id,
            detail={"label_id": label.id, "severity": level, "class": classes[level],
                    "previous": previous, "previous_source": source, "note": note or None,
                    "head_id": head.id if head else None, "source": kind,
                    "blinded": blinded},
        )
        session.add(event)
        session.flush()
        return ReviewDecision(
            label_id=label.id, event_id=event.id, image_id=image_id, severity=level,
            severity_class=classes[level], rater=rater, note=note or None, previous=previous,
            previous_source=source, source=kind, blinded=blinded,
        )


@dataclass(frozen=True)
class QualityClearance:
    image_id: int
    event_id: int
    rater: str
    #: the flag cleared
    flag: str
    note: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def clear_quality_flag(
    factory: sessionmaker[Session], *, image_id: int, rater: str, note: str | None = None
) -> QualityClearance:
    """A rater says a flagged photograph is good enough to score: its flag is cleared (the
    measures stay in `images.quality`, with who cleared it) and an audit event keeps the flag."""
    rater = _check_rater(rater)
    if note is not None and _CONTROL.search(note):
        raise UsageError("--note has a control character (NUL, escape...): write it as plain text; "
                         "line breaks and tabs are fine")
    with transaction(factory) as session:
        image = session.get(Image, image_id)
        if image is None:
            raise UsageError(
                f"no image {image_id} in the catalogue: `eczema-batch review list` shows image ids"
            )
        if image.quality_flag is None:
            raise UsageError(f"image {image_id} has no quality flag to clear: `eczema-batch review "
                             "list` shows the flagged images and why")
        flag = image.quality_flag
        event = Event(kind=QUALITY_CLEARED_EVENT, actor=rater, subject_type="image",
                      subject_id=image_id, detail={"flag": flag, "note": note or None})
        session.add(event)
        session.flush()
        image.quality = {**(image.quality or {}),
                         "cleared": {"by": rater, "event": event.id, "flag": flag}}
        image.quality_flag = None
        return QualityClearance(image_id=image_id, event_id=event.id, rater=rater, flag=flag,
                                note=note or None)


def _check_rater(rater: str) -> str:
    rater = rater.strip()
    if not rater or len(rater) > MAX_RATER or not rater.isprintable():
        raise UsageError(f"--by must name the rater in 1 to {MAX_RATER} printable characters "
                         "(a rater's id such as rater-07)")
    return rater


def _previous(session: Session, image_id: int, head: HeadInfo | None
              ) -> tuple[int | None, str | None]:
    reviewed = session.scalar(
        select(Label.severity).where(Label.image_id == image_id, Label.source == "review")
        .order_by(Label.id.desc()).limit(1)
    )
    if reviewed is not None:
        return reviewed, "review"
    if head is not None:
        predicted = session.scalar(select(Prediction.severity).where(
            Prediction.image_id == image_id, Prediction.head_id == head.id))
        if predicted is not None:
            return predicted, "prediction"
    return None, None
