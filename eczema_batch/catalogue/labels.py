"""Raters' labels and the rule that makes one reference label of them per image.

An image may carry labels from several raters: manifest rows (one per rater when the manifest has
a `rater` column) and `review set` decisions. A rater is named by the label's `rater`; a label
without one (a manifest with no `rater` column) is its source's own rater, `manifest`.

A rater's own label of an image is their newest label of it, blinded repeats aside: a repeat
(source `review-repeat`, recorded by `review set --blinded` on an image the rater had already
labelled) measures intra-rater agreement and never replaces the rater's first reading.

The reference label, the truth `train` and `evaluate` use, is picked by a rule
(`ECZEMA_BATCH_REFERENCE_LABEL`, `--reference-label`):

- `newest` (the default): the newest label of any rater (latest `created_at`, then the latest
  entry), repeats aside;
- `majority`: the class most raters gave (one vote per rater, their own label); a tie goes to the
  more severe of the tied classes: under-calling severity is the costlier error in a trial's
  reading, and the rule then never depends on the order labels were recorded in;
- `adjudicator:NAME`: that rater's own label where they gave one, else the fallback rule,
  `newest` (`adjudicator:NAME:majority` falls back to `majority`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from eczema_batch.catalogue.models import Image, Label, Patient, Study, Visit
from eczema_batch.errors import UsageError

#: Label.source of a blinded repeat: counts for intra-rater agreement, never as a reference.
REVIEW_REPEAT = "review-repeat"
NEWEST: Final = "newest"
MAJORITY: Final = "majority"
ADJUDICATOR: Final = "adjudicator"
RULES = (NEWEST, MAJORITY, f"{ADJUDICATOR}:NAME")

Fallback = Literal["newest", "majority"]


@dataclass(frozen=True)
class ReferenceRule:
    kind: Literal["newest", "majority", "adjudicator"] = "newest"
    #: the adjudicating rater (kind "adjudicator")
    adjudicator: str | None = None
    #: where the adjudicator gave no label
    fallback: Fallback = "newest"

    def __str__(self) -> str:
        if self.kind != ADJUDICATOR:
            return self.kind
        tail = f":{MAJORITY}" if self.fallback == MAJORITY else ""
        return f"{ADJUDICATOR}:{self.adjudicator}{tail}"


def parse_reference_rule(text: str | ReferenceRule) -> ReferenceRule:
    """`newest`, `majority`, `adjudicator:NAME` or `adjudicator:NAME:majority`."""
    if isinstance(text, ReferenceRule):
        return text
    value = text.strip()
    if value in (NEWEST, MAJORITY):
        return ReferenceRule(kind=value)  # type: ignore[arg-type]
    if value.startswith(f"{ADJUDICATOR}:"):
        name = value[len(ADJUDICATOR) + 1:]
        fallback: Fallback = "newest"
        # A rater's name may hold a colon: only a known rule after the last one is a fallback.
        head, sep, tail = name.rpartition(":")
        if sep and tail in (NEWEST, MAJORITY):
            name, fallback = head, tail  # type: ignore[assignment]
        if name.strip():
            return ReferenceRule(kind=ADJUDICATOR, adjudicator=name.strip(), fallback=fallback)
    raise UsageError(f"reference label rule {text!r}: use {', '.join(RULES)} "
                     "(ECZEMA_BATCH_REFERENCE_LABEL or --reference-label)")


@dataclass(frozen=True)
class RatedLabel:
    """One row of `labels`, as the rules read it; a list of them is oldest first."""

    image_id: int
    severity: int
    source: str
    rater: str | None
    label_id: int = 0

    @property
    def rater_key(self) -> str:
        return rater_key(self.source, self.rater)

    @property
    def repeat(self) -> bool:
        return self.source == REVIEW_REPEAT


def rater_key(source: str, rater: str | None) -> str:
    """Who gave a label: its rater, else its source (an anonymous manifest is one rater)."""
    return rater if rater else source


def own_labels(labels: Iterable[RatedLabel]) -> dict[str, int]:
    """rater -> their own label of one image (their newest, repeats aside); `labels` oldest
    first."""
    out: dict[str, int] = {}
    for label in labels:
        if not label.repeat:
            out[label.rater_key] = label.severity
    return out


def repeat_labels(labels: Iterable[RatedLabel]) -> dict[str, int]:
    """rater -> their first blinded repeat of one image."""
    out: dict[str, int] = {}
    for label in labels:
        if label.repeat:
            out.setdefault(label.rater_key, label.severity)
    return out


def majority(votes: Iterable[int]) -> int | None:
    """The most frequent class; a tie goes to the more severe class."""
    counts = Counter(votes)
    if not counts:
        return None
    return max(counts, key=lambda k: (counts[k], k))


def reference_label(labels: Sequence[RatedLabel], rule: ReferenceRule) -> int | None:
    """The image's reference class under `rule`; `labels` are the image's, oldest first."""
    if rule.kind == ADJUDICATOR:
        own = own_labels(labels)
        if rule.adjudicator in own:
            return own[rule.adjudicator]
        rule = ReferenceRule(kind=rule.fallback)
    if rule.kind == MAJORITY:
        return majority(own_labels(labels).values())
    kept = [label for label in labels if not label.repeat]
    return kept[-1].severity if kept else None


def read_labels(session: Session, *, study_id: int | None = None
                ) -> dict[int, list[RatedLabel]]:
    """image id -> its labels, oldest first (created_at, then id); decodable images only."""
    stmt = (
        select(Label.image_id, Label.severity, Label.source, Label.rater, Label.id)
        .join(Image, Image.id == Label.image_id)
        .where(Image.decode_status == "ok")
        .order_by(Label.created_at, Label.id)
    )
    if study_id is not None:
        stmt = stmt.where(Image.study_id == study_id)
    out: dict[int, list[RatedLabel]] = {}
    for iid, severity, source, rater, lid in session.execute(stmt):
        out.setdefault(int(iid), []).append(
            RatedLabel(int(iid), int(severity), source, rater, int(lid)))
    return out


def reference_labels(session: Session, *, rule: ReferenceRule, study_id: int | None = None
                     ) -> dict[int, int]:
    """image id -> its reference class under `rule` (images with a label only)."""
    out = {}
    for iid, labels in read_labels(session, study_id=study_id).items():
        ref = reference_label(labels, rule)
        if ref is not None:
            out[iid] = ref
    return out


@dataclass(frozen=True)
class ImageRatings:
    """Every rater's own label (and repeat) of one image, with its patient."""

    image_id: int
    patient_id: int
    own: dict[str, int]
    repeats: dict[str, int]


def read_ratings(session: Session, *, study: str | None = None) -> list[ImageRatings]:
    """The labelled decodable images of `study` (or all), by image id, with their raters'
    labels."""
    sid = None
    if study is not None:
        sid = session.scalar(select(Study.id).where(Study.name == study))
        if sid is None:
            raise UsageError(f"no study named {study!r}: `eczema-batch status` lists the studies")
    labels = read_labels(session, study_id=sid)
    patients: dict[Any, Any] = dict(session.execute(
        select(Image.id, Patient.id).join(Visit, Image.visit_id == Visit.id)
        .join(Patient, Visit.patient_id == Patient.id)
        .where(Image.id.in_(select(Label.image_id)))).all()) if labels else {}
    return [ImageRatings(iid, int(patients[iid]), own_labels(rows), repeat_labels(rows))
            for iid, rows in sorted(labels.items())]
