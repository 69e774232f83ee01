"""Plain functions that write catalogue rows for the report tests, with hand-chosen numbers.

`make_prediction` writes the chain the pipeline writes: a predicted mask (with its flag and prompt
similarities), the crop embedding cut with it, and the prediction pointing at that embedding.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from eczema_batch.catalogue.models import (
    Embedding,
    Head,
    Image,
    Label,
    Mask,
    Model,
    Patient,
    Prediction,
    Study,
    Visit,
    mean_prompt_similarity,
)
from eczema_batch.imaging import encode_mask_png
from eczema_batch.pipeline.records import MaskKey
from eczema_batch.severity import DEFAULT_CLASSES


def make_study(session: Session, name: str = "trial", root: str = "/nonexistent") -> Study:
    study = Study(name=name, root=root)
    session.add(study)
    session.flush()
    return study


def make_patient(session: Session, study: Study, code: str) -> Patient:
    patient = Patient(study_id=study.id, subject_code=code, code_source="manifest")
    session.add(patient)
    session.flush()
    return patient


def make_visit(session: Session, patient: Patient, when: dt.date | None, label: str | None = None
               ) -> Visit:
    visit = Visit(patient_id=patient.id, label=label or (when.isoformat() if when else "visit"),
                  visit_date=when, date_source="manifest" if when else "none")
    session.add(visit)
    session.flush()
    return visit


def make_image(session: Session, visit: Visit, *, body_site: str | None = "left-arm",
               fmt: str = "jpeg", path: str | None = None, size: tuple[int, int] = (64, 48),
               file: Path | None = None, **extra: Any) -> Image:
    """An image row; with `file`, the content SHA-256 and size of that real file (what `run`
    and `report --html` check before they read it)."""
    patient = session.get(Patient, visit.patient_id)
    assert patient is not None
    content = file.read_bytes() if file is not None else None
    image = Image(
        study_id=patient.study_id, visit_id=visit.id,
        sha256=hashlib.sha256(content).hexdigest() if content else uuid.uuid4().hex * 2,
        path=path or f"{patient.subject_code}/{visit.label}/{uuid.uuid4().hex[:8]}.jpg",
        format=fmt, size_bytes=len(content) if content else 1000, width=size[0], height=size[1],
        body_site=body_site, **extra,
    )
    session.add(image)
    session.flush()
    return image


def make_head(session: Session, *, classes: Sequence[str] = DEFAULT_CLASSES, active: bool = True,
              name: str = "head-test") -> Head:
    embedder = Model(kind="embedder", name="tiny-dino", digest="e" * 64, config={})
    segmenter = Model(kind="segmenter", name="tiny-seggpt", digest="s" * 64, config={})
    session.add_all([embedder, segmenter])
    session.flush()
    head = Head(name=name, classes=list(classes), embedder_model_id=embedder.id,
                segmenter_model_id=segmenter.id, segmenter_mode="seggpt", settings={},
                metrics={}, training_image_ids=[], weights=b"w", digest="h" * 64, active=active)
    session.add(head)
    session.flush()
    return head


def make_prediction(
    session: Session,
    image: Image,
    head: Head,
    probabilities: Sequence[float],
    *,
    mask_flag: str | None = None,
    similarities: Sequence[float] = (0.9, 0.8),
    mask: np.ndarray | None = None,
) -> Prediction:
    """A prediction with the predicted mask and crop embedding it came from."""
    if mask is None:
        mask = np.zeros((image.height, image.width), dtype=bool)
        if mask_flag is None:
            mask[image.height // 4: image.height // 2, image.width // 4: image.width // 2] = True
    prompt_ids = [1, 2][: len(similarities)]
    mask_row = Mask(
        image_id=image.id, kind="predicted",
        variant=MaskKey.seggpt(head.segmenter_model_id, prompt_ids).variant,
        model_id=head.segmenter_model_id, prompt_ids=prompt_ids,
        prompt_similarities=list(similarities),
        prompt_similarity=mean_prompt_similarity(similarities), width=image.width,
        height=image.height,
        area_fraction=float(mask.mean()), png=encode_mask_png(mask), flag=mask_flag,
    )
    session.add(mask_row)
    session.flush()
    crop = Embedding(image_id=image.id, model_id=head.embedder_model_id, region="crop",
                     variant=mask_row.variant, mask_id=mask_row.id, dim=2,
                     vector=np.zeros(2, "<f4").tobytes())
    session.add(crop)
    session.flush()
    probs = [float(p) for p in probabilities]
    prediction = Prediction(image_id=image.id, head_id=head.id, embedding_id=crop.id,
                            severity=int(np.argmax(probs)), probabilities=probs)
    session.add(prediction)
    session.flush()
    return prediction


def make_review(session: Session, image: Image, severity: int, *, rater: str = "dr-a",
                note: str | None = None) -> Label:
    label = Label(image_id=image.id, severity=severity, source="review", rater=rater, note=note)
    session.add(label)
    session.flush()
    return label
