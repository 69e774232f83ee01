"""The catalogue's tables (SQLAlchemy 2 typed models).

Alembic owns the schema (migrations/); these classes are what the code sees. Patients are study
subject codes, never names or birth dates. Masks, embeddings and predictions point at the model
identity (name + weights digest) that made them, so changing a model redoes only what depends on it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from eczema_batch.clock import utcnow
from eczema_batch.jobs.states import JobState, RunState

# Named constraints make migrations portable: SQLite batch mode must find a constraint by name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def mean_prompt_similarity(similarities: Sequence[float]) -> float | None:
    """What `masks.prompt_similarity` stores beside the list: its mean, None when empty."""
    return float(sum(similarities) / len(similarities)) if similarities else None


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Timestamped:
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.now()
    )


class Study(Timestamped, Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    #: absolute folder the study was ingested from; image paths are relative to it. Another
    #: folder for the same name is refused unless the user says the study moved.
    root: Mapped[str] = mapped_column(Text)
    #: for a study that keys on DICOM PatientID: HMAC of a fixed text with the pseudonym key, so
    #: that another key is refused (`eczema_batch.identifiers.key_check`); else None
    pseudonym_key_check: Mapped[str | None] = mapped_column(String(64))

    patients: Mapped[list[Patient]] = relationship(back_populates="study")


class Patient(Timestamped, Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("study_id", "subject_code"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    #: the study's subject code (never a name)
    subject_code: Mapped[str] = mapped_column(String(64))
    #: where the code came from: manifest, ClinicalTrialSubjectID, PatientID-HMAC (a keyed
    #: pseudonym of the hospital's PatientID) or folder
    code_source: Mapped[str] = mapped_column(String(32))

    study: Mapped[Study] = relationship(back_populates="patients")
    visits: Mapped[list[Visit]] = relationship(back_populates="patient")


class Visit(Timestamped, Base):
    __tablename__ = "visits"
    __table_args__ = (UniqueConstraint("patient_id", "label"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), index=True
    )
    #: ISO date when the date is known, else the visit folder's name or DICOM time point
    label: Mapped[str] = mapped_column(String(128))
    visit_date: Mapped[dt.date | None] = mapped_column(Date)
    #: manifest, StudyDate, AcquisitionDateTime, ..., folder, or none
    date_source: Mapped[str] = mapped_column(String(32))

    patient: Mapped[Patient] = relationship(back_populates="visits")
    images: Mapped[list[Image]] = relationship(back_populates="visit")


class Image(Timestamped, Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    visit_id: Mapped[int] = mapped_column(ForeignKey("visits.id", ondelete="CASCADE"), index=True)
    #: content SHA-256 (hex): the image's identity; the same picture twice is a duplicate
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    #: POSIX path relative to the study root
    path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    body_site: Mapped[str | None] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(String(64))
    sop_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    #: ok, or why the image no longer decodes when the pipeline found it broken
    decode_status: Mapped[str] = mapped_column(String(200), default="ok")
    #: the DICOM tag that says the pixels identify the patient (BurnedInAnnotation,
    #: RecognizableVisualFeatures); such images stay out of shared outputs. None: not flagged
    identifying_pixels: Mapped[str | None] = mapped_column(String(32))
    #: the camera: "Make Model" from EXIF, or DICOM Manufacturer and ManufacturerModelName
    device: Mapped[str | None] = mapped_column(String(128))
    #: Fitzpatrick skin type 1-6 given by the manifest (None: not given)
    fitzpatrick: Mapped[int | None] = mapped_column(Integer)
    #: estimated Individual Typology Angle (degrees, CIELAB) of the skin outside the lesion mask,
    #: and that mask as "kind:variant" (None: not estimated yet)
    skin_ita: Mapped[float | None] = mapped_column(Float)
    skin_ita_mask: Mapped[str | None] = mapped_column(String(216))
    #: image-quality measures (blur, exposure, colour cast) taken at ingest; None: not measured
    #: (stored as SQL NULL, which ingest looks for, never as JSON null)
    quality: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    #: why the image is out of the quality gate's range ("; "-joined reasons), None when in range
    quality_flag: Mapped[str | None] = mapped_column(Text)

    visit: Mapped[Visit] = relationship(back_populates="images")


class Rejection(Timestamped, Base):
    """A file that was not catalogued, and why (or a second copy of a catalogued picture).

    Also a manifest label or a manual mask refused while its photograph was catalogued
    (`eczema_batch/ingest/rejections.py`).
    """

    __tablename__ = "rejections"
    __table_args__ = (UniqueConstraint("study_id", "path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    #: rejected (the file) | duplicate | label (filed under the image) | mask (under the mask)
    kind: Mapped[str] = mapped_column(String(16), default="rejected")
    reason: Mapped[str] = mapped_column(Text)
    same_as_image_id: Mapped[int | None] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE")
    )


class Label(Timestamped, Base):
    """A severity class given by a rater; the newest label of an image is its truth."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    severity: Mapped[int] = mapped_column(Integer)
    #: manifest | review
    source: Mapped[str] = mapped_column(String(16))
    rater: Mapped[str | None] = mapped_column(String(64))
    note: Mapped[str | None] = mapped_column(Text)


#: The precision of model rows made before it was recorded (revision 0004).
UNRECORDED_PRECISION = "unrecorded"


class Model(Timestamped, Base):
    """A model identity: the name and the digest of its weights, and the precision it ran in.

    Results of a bf16 and an fp32 run differ (slightly), so they belong to two identities; a head
    eats the features of the weights (name and digest) whatever their precision.
    """

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "digest", "precision"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    #: segmenter | embedder
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(100))
    digest: Mapped[str] = mapped_column(String(64))
    #: fp32 | bf16 | fp16, or "unrecorded"
    precision: Mapped[str] = mapped_column(String(16), server_default=UNRECORDED_PRECISION)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Mask(Timestamped, Base):
    __tablename__ = "masks"
    __table_args__ = (UniqueConstraint("image_id", "kind", "variant"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    #: manual | predicted
    kind: Mapped[str] = mapped_column(String(16))
    #: what made it, as one key: "" for a manual mask, else segmenter identity + prompt set
    variant: Mapped[str] = mapped_column(String(200), default="")
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    #: the reference image ids that prompted SegGPT and their cosine similarity
    prompt_ids: Mapped[list[Any]] = mapped_column(default=list)
    prompt_similarities: Mapped[list[Any]] = mapped_column(default=list)
    #: their mean (None without prompts): the review queue's "weak prompts" rule reads it for
    #: every image of a report, where averaging the JSON list in SQL cost a fifth of the query
    prompt_similarity: Mapped[float | None] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    area_fraction: Mapped[float] = mapped_column(Float)
    #: 1-bit PNG at the image's full size, so workers on any machine can read it
    png: Mapped[bytes] = mapped_column(LargeBinary)
    #: relative path of the source file for a manual mask
    source_path: Mapped[str | None] = mapped_column(Text)
    #: why a reviewer should look (e.g. SegGPT found no lesion and the whole image was used)
    flag: Mapped[str | None] = mapped_column(Text)


class Embedding(Timestamped, Base):
    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("image_id", "model_id", "region", "variant"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    #: full (whole image, for prompt retrieval) | crop (the lesion crop, the head's input)
    region: Mapped[str] = mapped_column(String(8))
    #: for a crop: the mask it was cropped with (its kind + variant); "" for full
    variant: Mapped[str] = mapped_column(String(200), default="")
    mask_id: Mapped[int | None] = mapped_column(ForeignKey("masks.id", ondelete="SET NULL"))
    dim: Mapped[int] = mapped_column(Integer)
    #: float32 little-endian
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class Head(Timestamped, Base):
    """A trained severity head (MLP) with everything needed to trust and reuse it."""

    __tablename__ = "heads"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    classes: Mapped[list[Any]] = mapped_column()
    embedder_model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    segmenter_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    #: how crops were made for its features: seggpt | none | manual
    segmenter_mode: Mapped[str] = mapped_column(String(16))
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    training_image_ids: Mapped[list[Any]] = mapped_column(default=list)
    #: safetensors bytes of the MLP's weights
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    digest: Mapped[str] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean, default=False)


class Prediction(Timestamped, Base):
    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("image_id", "head_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    head_id: Mapped[int] = mapped_column(ForeignKey("heads.id", ondelete="CASCADE"), index=True)
    embedding_id: Mapped[int | None] = mapped_column(
        ForeignKey("embeddings.id", ondelete="SET NULL")
    )
    severity: Mapped[int] = mapped_column(Integer)
    #: JSONB on PostgreSQL: reports read every element of 300,000 of these, and plain JSON is
    #: parsed again for each one
    probabilities: Mapped[list[Any]] = mapped_column(JSON().with_variant(JSONB(), "postgresql"))


class Run(Timestamped, Base):
    """One `eczema-batch run`: the settings it planned with and how it ended."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    executor: Mapped[str] = mapped_column(String(16))
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: a RunState (jobs/states.py), stored as its string
    state: Mapped[str] = mapped_column(String(16), default=RunState.RUNNING)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Timestamped, Base):
    """A unit of work: a chunk of image ids and the stages they need. The truth, not the broker."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_queue", "state", "queue"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    stage: Mapped[str] = mapped_column(String(32))
    queue: Mapped[str] = mapped_column(String(32), default="local")
    image_ids: Mapped[list[Any]] = mapped_column()
    #: a JobState (jobs/states.py: what each means, and the moves allowed), stored as its string
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Event(Base):
    """The audit trail: who did what to which row, and when."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.now(), index=True
    )
    kind: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str | None] = mapped_column(String(64))
    subject_type: Mapped[str | None] = mapped_column(String(32))
    subject_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
