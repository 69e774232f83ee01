"""The catalogue reads behind reports, exports and the review queue (Core selects, streamed).

Every report reads one of two shapes of the same join: image -> its prediction by the chosen head
-> the crop embedding the prediction was made from -> the mask that crop was cut with, plus the
image's newest reviewed label. Per image (`iter_image_records`), or aggregated per visit in SQL
(`iter_patient_visits`): the mean of the effective probability vectors, counts of images, scored,
flagged and reviewed ones. A reviewed label replaces its image's prediction by a one-hot vector.
Rows come in patient order (no ORM object per row), so a 300,000-image cohort is read once: image
rows stream in constant memory per patient; the visit aggregates (one row per visit) are fetched
whole on PostgreSQL so that it may plan them in parallel (see `_stream`).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Float,
    Select,
    String,
    and_,
    case,
    cast,
    distinct,
    func,
    literal,
    null,
    or_,
    select,
)
from sqlalchemy.orm import Session, aliased

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
)
from eczema_batch.errors import UnknownPatientError, UsageError
from eczema_batch.pipeline.records import FLAG_NO_REFERENCES
from eczema_batch.report.trends import VisitScore
from eczema_batch.severity import DEFAULT_CLASSES
from eczema_batch.studyfiles import CataloguedFile

#: Rows fetched per round trip while streaming.
STREAM_ROWS = 5000
#: PostgreSQL sort memory for report queries (SET LOCAL: this transaction only).
PG_WORK_MEM = "64MB"
#: A head id no row has: the joins then find no prediction (a catalogue without a head).
_NO_HEAD = -1


@dataclass(frozen=True)
class ModelRef:
    name: str
    digest: str
    #: fp32 | bf16 | fp16 | unrecorded (catalogue revision 0004)
    precision: str = ""
    #: the registered model a derived (adapted, tuned) one was trained from; "" if none
    derived_from: str = ""


@dataclass(frozen=True)
class HeadInfo:
    """The severity head a report reads predictions of, and the models its features came from."""

    id: int
    name: str
    digest: str
    classes: tuple[str, ...]
    embedder: ModelRef | None
    segmenter: ModelRef | None


@dataclass(frozen=True)
class ReviewThresholds:
    """When an unreviewed prediction is flagged for review (Settings: ECZEMA_BATCH_REVIEW_*)."""

    min_confidence: float = 0.5
    min_prompt_similarity: float = 0.5


@dataclass(frozen=True)
class PatientKey:
    study: str
    patient: str
    patient_id: int


@dataclass(frozen=True)
class PatientVisits:
    key: PatientKey
    visits: list[VisitScore]
    #: visit id -> the model that made the masks its predictions were cropped with
    segmenter_ids: dict[int, int | None]
    #: where the subject code came from (manifest, ClinicalTrialSubjectID, PatientID-HMAC, folder)
    code_source: str | None = None


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    study: str
    patient: str
    patient_id: int
    visit_id: int
    visit_label: str
    visit_date: date | None
    body_site: str | None
    format: str
    #: the head's probabilities, None when the image has no prediction by it
    probabilities: tuple[float, ...] | None
    predicted: int | None
    reviewed: int | None
    rater: str | None
    note: str | None
    mask_id: int | None
    mask_flag: str | None
    prompt_similarity: float | None
    segmenter_id: int | None
    #: where the subject code and the visit date came from (patients / visits tables)
    code_source: str | None = None
    date_source: str | None = None
    #: the share of the image the lesion mask covers (`lesion_area`), None without a measurement
    lesion_area: float | None = None
    #: why the image-quality gate flagged the photograph (images.quality_flag), None when not
    quality_flag: str | None = None
    #: the camera, the manifest's Fitzpatrick type and the estimated ITA (images table)
    device: str | None = None
    fitzpatrick: int | None = None
    skin_ita: float | None = None

    @property
    def effective(self) -> tuple[float, ...] | None:
        """What the visit mean uses: the reviewer's class as one-hot, else the prediction."""
        if self.reviewed is not None:
            n = len(self.probabilities) if self.probabilities else len(DEFAULT_CLASSES)
            n = max(n, self.reviewed + 1)
            return tuple(1.0 if k == self.reviewed else 0.0 for k in range(n))
        return self.probabilities

    @property
    def severity(self) -> int | None:
        return self.reviewed if self.reviewed is not None else self.predicted


def flag_reasons(record: ImageRecord, thresholds: ReviewThresholds) -> list[str]:
    """Why an unreviewed image needs a rater, its prediction's reasons first, then the quality
    gate's (a flagged photograph needs one with or without a prediction); the same rule as
    `_Join.flagged` in SQL."""
    if record.reviewed is not None:
        return []
    quality = [f"quality: {record.quality_flag}"] if record.quality_flag else []
    if record.probabilities is None:
        return quality
    reasons = []
    top = max(record.probabilities)
    if top < thresholds.min_confidence:
        reasons.append(f"low confidence: top probability {top:.2f} < "
                       f"{thresholds.min_confidence:.2f}")
    if record.mask_flag:
        reasons.append(f"mask: {record.mask_flag}")
    sim = record.prompt_similarity
    if sim is not None and sim < thresholds.min_prompt_similarity:
        reasons.append(f"weak prompts: mean similarity {sim:.2f} < "
                       f"{thresholds.min_prompt_similarity:.2f}")
    return reasons + quality


# --- heads and scope ---------------------------------------------------------------------------


def model_refs(session: Session) -> dict[int, ModelRef]:
    return {mid: ModelRef(name, digest, precision, str((config or {}).get("derived_from") or ""))
            for mid, name, digest, precision, config in session.execute(
                select(Model.id, Model.name, Model.digest, Model.precision, Model.config))}


def choose_head(session: Session, *, head_id: int | None = None) -> HeadInfo | None:
    """The given head; else the newest active head with predictions; else the newest with any."""
    if head_id is not None:
        row = session.execute(select(Head).where(Head.id == head_id)).scalar_one_or_none()
        if row is None:
            raise UsageError(f"no head {head_id} in the catalogue: `eczema-batch train` makes one")
    else:
        has_predictions = select(Prediction.id).where(Prediction.head_id == Head.id).exists()
        row = session.execute(
            select(Head).where(has_predictions)
            .order_by(Head.active.desc(), Head.id.desc()).limit(1)
        ).scalar_one_or_none()
        if row is None:
            return None
    refs = model_refs(session)
    return HeadInfo(
        id=row.id, name=row.name, digest=row.digest,
        classes=tuple(str(c) for c in row.classes) or DEFAULT_CLASSES,
        embedder=refs.get(row.embedder_model_id),
        segmenter=refs.get(row.segmenter_model_id) if row.segmenter_model_id else None,
    )


def check_scope(session: Session, *, study: str | None, patient: str | None) -> None:
    """UsageError for an unknown study, UnknownPatientError (exit 2) for an unknown patient."""
    if study is not None and session.scalar(select(Study.id).where(Study.name == study)) is None:
        raise UsageError(f"no study named {study!r}: `eczema-batch status` lists the studies")
    if patient is not None:
        stmt = select(Patient.id).where(Patient.subject_code == patient)
        if study is not None:
            stmt = stmt.join(Study).where(Study.name == study)
        if session.scalar(stmt.limit(1)) is None:
            where = f"study {study!r}" if study else "the catalogue"
            raise UnknownPatientError(
                f"no patient {patient!r} in {where}: `eczema-batch report` lists the patients"
            )


# --- the join ----------------------------------------------------------------------------------


class _Join:
    """Columns and FROM clause shared by the per-image and per-visit selects."""

    def __init__(self, session: Session, head: HeadInfo | None) -> None:
        self.dialect = session.get_bind().dialect.name
        self.n_classes = len(head.classes) if head else len(DEFAULT_CLASSES)
        head_id = head.id if head else _NO_HEAD
        latest = (
            select(Label.image_id.label("image_id"), func.max(Label.id).label("label_id"))
            .where(Label.source == "review").group_by(Label.image_id).subquery("latest_review")
        )
        review = self.review = aliased(Label, name="review")

        def results(stmt: Select[Any]) -> Select[Any]:
            # An image -> its prediction by the head -> the crop -> its mask; its newest review.
            return (
                stmt.outerjoin(Prediction, and_(Prediction.image_id == Image.id,
                                                Prediction.head_id == head_id))
                .outerjoin(Embedding, Embedding.id == Prediction.embedding_id)
                .outerjoin(Mask, Mask.id == Embedding.mask_id)
                .outerjoin(latest, latest.c.image_id == Image.id)
                .outerjoin(review, review.id == latest.c.label_id)
            )

        self.results = results
        #: the same for every image of every patient (patients without visits or images too)
        self.from_ = results(
            select().select_from(Patient)
            .join(Study, Patient.study_id == Study.id)
            .outerjoin(Visit, Visit.patient_id == Patient.id)
            .outerjoin(Image, Image.visit_id == Visit.id)
        )
        self.p = [Prediction.probabilities[k].as_float() for k in range(self.n_classes)]
        self.similarity = Mask.prompt_similarity
        # The lesion area is the area of the mask the prediction was cropped with. A mask made
        # because no reference could prompt SegGPT is the whole image standing in for a lesion,
        # not a measurement of one: no area. (SegGPT finding no lesion is a measured 0.)
        self.lesion_area = case((Mask.flag == FLAG_NO_REFERENCES, null()),
                                else_=Mask.area_fraction)

    def top_probability(self) -> ColumnElement[float]:
        """The probability of the predicted class (the pipeline stores the argmax as severity)."""
        if self.dialect == "postgresql":
            return cast(Prediction.probabilities.op("->>")(Prediction.severity), Float)
        path = literal("$[") + cast(Prediction.severity, String) + literal("]")
        return func.json_extract(Prediction.probabilities, path)

    def effective(self, k: int) -> ColumnElement[float]:
        reviewed = self.review.severity
        return case(
            (reviewed.is_not(None), case((reviewed == k, literal(1.0)), else_=literal(0.0))),
            else_=self.p[k],
        )

    def flagged(self, thresholds: ReviewThresholds) -> ColumnElement[bool]:
        return and_(
            self.review.id.is_(None),
            or_(
                and_(
                    Prediction.id.is_not(None),
                    or_(
                        self.top_probability() < thresholds.min_confidence,
                        Mask.flag.is_not(None),
                        self.similarity < thresholds.min_prompt_similarity,
                    ),
                ),
                Image.quality_flag.is_not(None),
            ),
        )

    def sites(self) -> ColumnElement[str]:
        if self.dialect == "postgresql":
            return func.string_agg(distinct(Image.body_site), ",")
        return func.group_concat(distinct(Image.body_site))

    def scoped(self, stmt: Select[Any], *, study: str | None, patient: str | None,
               patient_ids: Sequence[int] | None = None) -> Select[Any]:
        if study is not None:
            stmt = stmt.where(Study.name == study)
        if patient is not None:
            stmt = stmt.where(Patient.subject_code == patient)
        if patient_ids is not None:
            stmt = stmt.where(Patient.id.in_(list(patient_ids)))
        return stmt

    def patient_order(self) -> list[Any]:
        """Study, subject code, patient, visit: the order every report streams in.

        Byte order on PostgreSQL too (COLLATE "C", SQLite's order): the same catalogue lists
        patients in the same order on either database, whatever the server's locale, and the
        sort of 100,000 visits no longer pays for locale-aware comparison.
        """
        if self.dialect == "postgresql":
            return [Study.name.collate("C"), Patient.subject_code.collate("C"), Patient.id,
                    Visit.id]
        return [Study.name, Patient.subject_code, Patient.id, Visit.id]


def _stream(session: Session, stmt: Select[Any], *, whole: bool = False) -> Iterator[Any]:
    """The rows of `stmt`, streamed: yield_per (a server-side cursor on PostgreSQL).

    SQLite's cursor is lazy anyway. `whole=True` fetches the result in one go on PostgreSQL,
    for results of one row per visit: PostgreSQL never plans a cursor's query in parallel, and
    the cohort's visit aggregate ran 1.4 s as a cursor against 1.1 s in parallel on 2 cores
    (100,000 visits, ~20 MB of rows; the cohort report keeps every patient's trend anyway).
    """
    plain = session.connection()
    if plain.dialect.name == "postgresql":
        # For this transaction only (is_local): grouping 300,000 images by visit spills the
        # default 4 MB sort to disk, so let it sort in memory; and the plan's cost is far above
        # jit_above_cost, but JIT-compiling it took 0.5 s of a 2.5 s query that runs once and
        # gained nothing back (EXPLAIN ANALYZE on the bench/report.py catalogue). One round trip.
        plain.exec_driver_sql(
            f"SELECT set_config('work_mem', '{PG_WORK_MEM}', true), set_config('jit', 'off', true)"
        )
    # Per statement: Connection.execution_options() would change the session's connection.
    options = {} if whole and plain.dialect.name == "postgresql" else {"yield_per": STREAM_ROWS}
    yield from plain.execute(stmt, execution_options=options)


def visit_scores_select(
    session: Session,
    *,
    head: HeadInfo | None,
    thresholds: ReviewThresholds,
    study: str | None = None,
    patient: str | None = None,
    patient_ids: Sequence[int] | None = None,
    sites: bool = True,
) -> Select[Any]:
    """One row per visit: keys, counts, worst class, body sites, segmenter, mean p_0..p_C-1.

    `sites=False` leaves the body sites out (NULL): the cohort report does not show them.
    """
    j = _Join(session, head)
    scored = or_(Prediction.id.is_not(None), j.review.id.is_not(None))
    # Aggregate the images per visit first, then join the (fewer) visits to their patients:
    # grouping by one integer hashes where grouping the whole join sorted 300,000 wide rows.
    images = select().select_from(Image)
    if study is not None or patient is not None or patient_ids is not None:
        # An inner join, not a WHERE ... IN: PostgreSQL then starts from the scope's images
        # (one patient: 6 ms) instead of joining all of them and filtering last (300 ms).
        in_scope = j.scoped(select(Visit.id.label("visit_id"))
                            .join(Patient, Visit.patient_id == Patient.id)
                            .join(Study, Patient.study_id == Study.id),
                            study=study, patient=patient, patient_ids=patient_ids
                            ).subquery("in_scope")
        images = images.join(in_scope, in_scope.c.visit_id == Image.visit_id)
    per_visit = j.results(images).add_columns(
        Image.visit_id.label("visit_id"),
        func.count(Image.id).label("n_images"),
        func.count(case((scored, 1))).label("n_scored"),
        func.count(case((j.flagged(thresholds), 1))).label("n_flagged"),
        func.count(j.review.id).label("n_reviewed"),
        func.max(func.coalesce(j.review.severity, Prediction.severity)).label("worst"),
        (j.sites() if sites else null()).label("sites"),
        func.max(Mask.model_id).label("segmenter_id"),
        func.avg(j.lesion_area).label("area"),
        func.count(j.lesion_area).label("n_area"),
        *[func.avg(j.effective(k)).label(f"p{k}") for k in range(j.n_classes)],
    ).group_by(Image.visit_id)
    v = per_visit.subquery("per_visit")
    keys: list[Any] = [Study.name.label("study"), Patient.subject_code.label("code"),
                       Patient.id.label("patient_id"), Patient.code_source.label("code_source")]
    if j.dialect == "postgresql":
        # Patients ranked in report order first (10,000 rows), so the 100,000 visit rows sort
        # on two integers: sorting them on the study and subject code strings cost 0.15 s.
        keys.append(func.row_number().over(order_by=j.patient_order()[:3]).label("rank"))
    patients = j.scoped(select(*keys).join(Study, Patient.study_id == Study.id),
                        study=study, patient=patient, patient_ids=patient_ids).subquery("pt")
    order = ([patients.c.rank] if j.dialect == "postgresql"
             else [patients.c.study, patients.c.code, patients.c.patient_id])
    zero = literal(0)
    columns: list[Any] = [
        patients.c.study, patients.c.code, patients.c.patient_id, Visit.id, Visit.label,
        Visit.visit_date, func.coalesce(v.c.n_images, zero), func.coalesce(v.c.n_scored, zero),
        func.coalesce(v.c.n_flagged, zero), func.coalesce(v.c.n_reviewed, zero),
        v.c.worst, v.c.sites, v.c.segmenter_id, patients.c.code_source, Visit.date_source,
        v.c.area, func.coalesce(v.c.n_area, zero), *[v.c[f"p{k}"] for k in range(j.n_classes)],
    ]
    return (
        select(*columns)
        .select_from(patients)
        .outerjoin(Visit, Visit.patient_id == patients.c.patient_id)
        .outerjoin(v, v.c.visit_id == Visit.id)
        .order_by(*order, Visit.id)
    )


def iter_patient_visits(
    session: Session,
    *,
    head: HeadInfo | None,
    thresholds: ReviewThresholds,
    study: str | None = None,
    patient: str | None = None,
    patient_ids: Sequence[int] | None = None,
    sites: bool = True,
) -> Iterator[PatientVisits]:
    """Per patient (by study, subject code), its visits' aggregates, computed in SQL."""
    stmt = visit_scores_select(session, head=head, thresholds=thresholds, study=study,
                               patient=patient, patient_ids=patient_ids, sites=sites)
    # Rows come in patient order; a patient id is unique across studies.
    for _pid, rows in itertools.groupby(_stream(session, stmt, whole=True),
                                        key=operator.itemgetter(2)):
        visits, segmenters = [], {}
        for row in rows:
            (study_name, code, pid, vid, label, vdate, n_images, n_scored, n_flagged, n_reviewed,
             worst, joined_sites, segmenter_id, code_source, date_source, area,
             n_area) = row[:17]
            if vid is None:  # a patient without visits: listed, with nothing to score
                continue
            visits.append(VisitScore(
                vid, label, vdate if vdate is None or type(vdate) is date else _as_date(vdate),
                n_images, n_scored, n_flagged, n_reviewed,
                tuple(row[17:]) if n_scored else None, worst,
                _sites(joined_sites), date_source=date_source,
                lesion_area=None if area is None else float(area), n_area=n_area,
            ))
            segmenters[vid] = segmenter_id
        yield PatientVisits(PatientKey(study_name, code, pid), visits, segmenters, code_source)


def _sites(joined: str | None) -> tuple[str, ...]:
    if not joined:
        return ()
    if "," not in joined:
        return (joined,)
    return tuple(sorted(set(joined.split(","))))


def image_records_select(
    session: Session, *, head: HeadInfo | None, thresholds: ReviewThresholds | None = None,
    study: str | None = None, patient: str | None = None,
    patient_ids: Sequence[int] | None = None, image_ids: Sequence[int] | None = None,
) -> tuple[_Join, Select[Any]]:
    j = _Join(session, head)
    stmt = j.scoped(
        j.from_.add_columns(
            Image.id, Study.name, Patient.subject_code, Patient.id, Visit.id, Visit.label,
            Visit.visit_date, Image.body_site, Image.format, Prediction.id,
            Prediction.severity, j.review.severity, j.review.rater, j.review.note, Mask.id,
            Mask.flag, j.similarity, Mask.model_id, Patient.code_source, Visit.date_source,
            j.lesion_area, Image.quality_flag, Image.device, Image.fitzpatrick, Image.skin_ita,
            *j.p,
        ).where(Image.id.is_not(None))
        .order_by(*j.patient_order(), Image.id),
        study=study, patient=patient, patient_ids=patient_ids,
    )
    if thresholds is not None:
        stmt = stmt.where(j.flagged(thresholds))
    if image_ids is not None:
        stmt = stmt.where(Image.id.in_(list(image_ids)))
    return j, stmt


def iter_image_records(session: Session, *, head: HeadInfo | None, **scope: Any
                       ) -> Iterator[ImageRecord]:
    """One record per image, in patient and visit order; `thresholds=` keeps flagged ones only."""
    _j, stmt = image_records_select(session, head=head, **scope)
    for row in _stream(session, stmt):
        (iid, study_name, code, pid, vid, label, vdate, site, fmt, pred_id, predicted, reviewed,
         rater, note, mask_id, flag, sim, segmenter_id, code_source, date_source, area,
         quality_flag, device, fitzpatrick, skin_ita, *probs) = row
        yield ImageRecord(
            image_id=iid, study=study_name, patient=code, patient_id=pid, visit_id=vid,
            visit_label=label, visit_date=_as_date(vdate), body_site=site, format=fmt,
            probabilities=tuple(float(p) for p in probs) if pred_id is not None else None,
            predicted=predicted, reviewed=reviewed, rater=rater, note=note, mask_id=mask_id,
            mask_flag=flag, prompt_similarity=None if sim is None else float(sim),
            segmenter_id=segmenter_id, code_source=code_source, date_source=date_source,
            lesion_area=None if area is None else float(area), quality_flag=quality_flag,
            device=device, fitzpatrick=fitzpatrick,
            skin_ita=None if skin_ita is None else float(skin_ita),
        )


@dataclass(frozen=True)
class LabelRecord:
    """One rater's label of an image (the `labels` table: manifest labels and reviews)."""

    patient_id: int
    image_id: int
    label_id: int
    severity: int
    #: manifest | review
    source: str
    rater: str | None
    created_at: Any


def iter_image_labels(session: Session, *, study: str | None = None, patient: str | None = None
                      ) -> Iterator[LabelRecord]:
    """Every label, in patient order (as `iter_image_records`), then image, oldest first.

    Oldest first by (created_at, id): an image's last label is its reference label, the rule
    `training.data.newest_labels` trains and evaluates with.
    """
    j = _Join(session, None)
    labels: Select[Any] = (
        select().select_from(Label)
        .add_columns(Patient.id, Label.image_id, Label.id, Label.severity, Label.source,
                     Label.rater, Label.created_at)
        .join(Image, Image.id == Label.image_id)
        .join(Visit, Visit.id == Image.visit_id)
        .join(Patient, Patient.id == Visit.patient_id)
        .join(Study, Study.id == Patient.study_id)
        .order_by(*j.patient_order()[:3], Label.image_id, Label.created_at, Label.id)
    )
    for row in _stream(session, j.scoped(labels, study=study, patient=patient)):
        yield LabelRecord(*row)


def image_files(session: Session, image_ids: Sequence[int], *, image_root: str | None = None
                ) -> dict[int, CataloguedFile]:
    """Where each image's file is (its study's folder, or `image_root`/study name, and its path)
    and what it held when catalogued; `.read()` refuses it if it changed since."""
    if not image_ids:
        return {}
    stmt = (select(Image.id, Study.root, Study.name, Image.path, Image.size_bytes, Image.sha256)
            .join(Study, Image.study_id == Study.id).where(Image.id.in_(list(image_ids))))
    return {iid: CataloguedFile(Path(image_root) / name if image_root else Path(root), path,
                                size, sha)
            for iid, root, name, path, size, sha in session.execute(stmt)}


def mask_pngs(session: Session, mask_ids: Sequence[int]) -> dict[int, bytes]:
    if not mask_ids:
        return {}
    stmt = select(Mask.id, Mask.png).where(Mask.id.in_(list(mask_ids)))
    return dict(session.execute(stmt).all())


def _as_date(value: Any) -> date | None:
    if value is None or isinstance(value, date):
        return value
    return date.fromisoformat(str(value))
