"""A blinded reading pass: the next image a rater has not rated, and repeats of some they have.

`review next --by RATER` shows what a rater needs to find and read the photograph (its id,
subject code, visit, body site and file) and nothing that could sway them: no model score, no
other rater's label, not their own earlier label. Images come in an order of their own for each
rater (a hash of the rater and the image id), so that no two raters read a study in the same
sequence, and a patient's visits do not come in date order.

A seeded share of the images a rater has read (`--repeat-share`, a hash of seed, rater and image
id) comes back once, after at least `REPEAT_GAP` other readings by that rater (or when nothing new
is left), to measure their intra-rater agreement. `review set --blinded` records a reading of an
image the rater had labelled before as a repeat (source `review-repeat`), which never replaces
their first label (see `catalogue.labels`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from eczema_batch.catalogue.labels import REVIEW_REPEAT
from eczema_batch.catalogue.models import Image, Label, Patient, Study, Visit
from eczema_batch.report.queries import check_scope

#: A repeat comes back only after this many other readings by the same rater, so that the
#: first reading is not fresh in mind.
REPEAT_GAP = 5
DEFAULT_REPEAT_SHARE = 0.1


@dataclass(frozen=True)
class BlindedItem:
    """What a rater needs to open and read one image; nothing about its severity."""

    image_id: int
    study: str
    patient: str
    visit: str
    visit_date: date | None
    body_site: str | None
    #: the file to open: the study folder (or image_root/study) joined with its path
    path: str


@dataclass(frozen=True)
class NextReading:
    rater: str
    item: BlindedItem | None
    #: readings left for this rater, this one included (new images and repeats still due)
    remaining: int

    def as_dict(self) -> dict[str, Any]:
        return {"rater": self.rater, "remaining": self.remaining,
                "image": None if self.item is None else asdict(self.item)}


def _unit(*parts: object) -> float:
    """A number in [0, 1) from the parts: the same parts, the same number, on every machine."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def next_reading(
    session: Session,
    *,
    rater: str,
    study: str | None = None,
    repeat_share: float = DEFAULT_REPEAT_SHARE,
    seed: int = 0,
    image_root: str | None = None,
) -> NextReading:
    """The next image for `rater`: a repeat that is due, else an unrated image, else a repeat
    not due yet; None when the rater has read everything (and repeated their sample)."""
    check_scope(session, study=study, patient=None)
    stmt = (select(Image.id).join(Study, Study.id == Image.study_id)
            .where(Image.decode_status == "ok"))
    if study is not None:
        stmt = stmt.where(Study.name == study)
    scope = set(session.scalars(stmt))
    readings = session.execute(
        select(Label.image_id, Label.source).where(Label.rater == rater).order_by(Label.id)
    ).all()
    first_at: dict[int, int] = {}  # image -> position of the rater's first reading of it
    repeated: set[int] = set()
    for position, (iid, source) in enumerate(readings):
        if source == REVIEW_REPEAT:
            repeated.add(iid)
        else:
            first_at.setdefault(iid, position)
    order = {iid: _unit("order", seed, rater, iid) for iid in scope}
    unrated = sorted((i for i in scope if i not in first_at), key=order.__getitem__)
    sample = [i for i in first_at if i in scope and i not in repeated
              and _unit("repeat", seed, rater, i) < repeat_share]
    due = sorted((i for i in sample if len(readings) - 1 - first_at[i] >= REPEAT_GAP),
                 key=first_at.__getitem__)
    later = sorted((i for i in sample if i not in due), key=first_at.__getitem__)
    pick = next(iter(due or unrated or later), None)
    remaining = len(unrated) + len(sample)
    if pick is None:
        return NextReading(rater=rater, item=None, remaining=0)
    return NextReading(rater=rater, item=_item(session, pick, image_root), remaining=remaining)


def _item(session: Session, image_id: int, image_root: str | None) -> BlindedItem:
    row = session.execute(
        select(Image.id, Study.name, Study.root, Patient.subject_code, Visit.label,
               Visit.visit_date, Image.body_site, Image.path)
        .join(Study, Study.id == Image.study_id)
        .join(Visit, Visit.id == Image.visit_id)
        .join(Patient, Patient.id == Visit.patient_id)
        .where(Image.id == image_id)
    ).one()
    iid, study, root, code, label, when, site, rel = row
    folder = Path(image_root) / study if image_root else Path(root)
    return BlindedItem(image_id=iid, study=study, patient=code, visit=label, visit_date=when,
                       body_site=site, path=str(folder / rel))
