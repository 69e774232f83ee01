"""Write ingested files into the catalogue, one transaction per batch.

The fast path inserts a batch with multi-row statements. If anything in it collides (another
ingest of the same pictures running at the same time), the batch is rolled back and written again
file by file, each in a savepoint, so one bad record never costs the rest of the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Image, Label, Mask, Patient, Rejection, Study, Visit
from eczema_batch.clock import utcnow
from eczema_batch.imaging.quality import QualityThresholds, not_measured, quality_record
from eczema_batch.ingest.read import FileRead
from eczema_batch.ingest.rejections import DUPLICATE, FILE, rejection
from eczema_batch.ingest.resolve import Identity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewImage:
    read: FileRead
    identity: Identity
    #: the manifest's (rater, severity) pairs: one per rater, rater None without a rater column
    labels: tuple[tuple[str | None, int], ...] = ()
    #: the manifest's Fitzpatrick skin type (None: not given)
    fitzpatrick: int | None = None


@dataclass
class WriteOutcome:
    catalogued: int = 0
    already: int = 0
    updated: int = 0
    #: images measured now whose quality is out of range
    quality_flagged: int = 0
    duplicates: list[dict[str, str]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Known:
    id: int
    path: str
    study_id: int


#: Content hashes per lookup of new ids: SQLite takes at most 32,766 parameters a statement.
ID_LOOKUP_CHUNK = 1000


class CatalogueWriter:
    def __init__(
        self, *, factory: sessionmaker[Session], study_id: int, present: set[str] | None = None,
        thresholds: QualityThresholds | None = None,
    ) -> None:
        self._factory = factory
        self._study_id = study_id
        self._thresholds = thresholds or QualityThresholds()
        #: flagged by _quality since the last outcome
        self._flagged = 0
        #: image paths present in the folder now (a catalogued path missing from it has moved)
        self._present = present or set()
        #: paths in the catalogue after this ingest's writes (new or catalogued before)
        self.catalogued_paths: set[str] = set()
        #: duplicate path -> id of the catalogued image it repeats
        self.duplicate_of: dict[str, int] = {}
        self._load()

    def _load(self) -> None:
        with self._factory() as session:
            self._study_names = dict(session.execute(select(Study.id, Study.name)).all())
            self._patients = {
                code: pid
                for pid, code in session.execute(
                    select(Patient.id, Patient.subject_code).where(
                        Patient.study_id == self._study_id
                    )
                )
            }
            self._visits = {
                (pid, label): vid
                for vid, pid, label in session.execute(
                    select(Visit.id, Visit.patient_id, Visit.label)
                    .join(Patient)
                    .where(Patient.study_id == self._study_id)
                )
            }
            self._by_sha = {
                sha: _Known(iid, path, sid)
                for iid, sha, path, sid in session.execute(
                    select(Image.id, Image.sha256, Image.path, Image.study_id)
                )
            }

    # -- batches ---------------------------------------------------------------------------

    def write(self, images: list[NewImage]) -> WriteOutcome:
        try:
            with self._factory() as session, session.begin():
                return self._write(session, images, per_file=False)
        except IntegrityError:
            log.warning("batch collided with another writer; writing it file by file")
            self._load()
            with self._factory() as session, session.begin():
                return self._write(session, images, per_file=True)

    def _write(self, session: Session, images: list[NewImage], *, per_file: bool) -> WriteOutcome:
        outcome = WriteOutcome()
        self._flagged = 0  # a batch written again file by file counts afresh
        pending: dict[str, str] = {}  # duplicates within this batch: path -> sha
        fresh: list[NewImage] = []
        known: list[tuple[NewImage, _Known]] = []
        batch_shas: dict[str, str] = {}
        for item in images:
            sha = item.read.sha256
            assert sha is not None
            existing = self._by_sha.get(sha)
            if existing is None and sha in batch_shas:
                outcome.duplicates.append({"path": item.read.rel, "same_as": batch_shas[sha]})
                pending[item.read.rel] = sha
            elif existing is None:
                batch_shas[sha] = item.read.rel
                fresh.append(item)
            elif existing.study_id == self._study_id and existing.path == item.read.rel:
                known.append((item, existing))
            elif existing.study_id == self._study_id and existing.path not in self._present:
                # The same picture under a new name, its old name gone: the file was moved.
                session.execute(
                    update(Image).where(Image.id == existing.id).values(path=item.read.rel)
                )
                self._by_sha[sha] = _Known(existing.id, item.read.rel, existing.study_id)
                known.append((item, self._by_sha[sha]))
            else:
                same_as = existing.path
                if existing.study_id != self._study_id:
                    same_as = f"{self._study_names.get(existing.study_id, '?')}:{existing.path}"
                outcome.duplicates.append({"path": item.read.rel, "same_as": same_as})
                self.duplicate_of[item.read.rel] = existing.id
        inserted = fresh
        if per_file:
            inserted = []
            for item in fresh:
                try:
                    with session.begin_nested():
                        self._insert(session, [item])
                    inserted.append(item)
                except IntegrityError as exc:
                    outcome.rejected.append(rejection(
                        item.read.rel,
                        f"catalogue refused the record: {str(exc.orig).splitlines()[0]}",
                    ))
        else:
            self._insert(session, fresh)
        outcome.catalogued += len(inserted)
        for rel, sha in pending.items():
            if sha in self._by_sha:
                self.duplicate_of[rel] = self._by_sha[sha].id
        outcome.already += len(known)
        outcome.updated += self._sync_known(session, known)
        outcome.quality_flagged = self._flagged
        self.catalogued_paths.update(item.read.rel for item in inserted)
        self.catalogued_paths.update(item.read.rel for item, _ in known)
        return outcome

    # -- rows ------------------------------------------------------------------------------

    def _ensure_visits(self, session: Session, identities: list[Identity]) -> None:
        """Create the batch's new patients and visits with one statement each."""
        new_patients: dict[str, str] = {}
        for identity in identities:
            if identity.patient not in self._patients:
                new_patients.setdefault(identity.patient, identity.patient_source)
        if new_patients:
            rows = [{"study_id": self._study_id, "subject_code": code, "code_source": source,
                     "created_at": utcnow()}
                    for code, source in new_patients.items()]
            result = session.execute(
                insert(Patient).returning(Patient.id, sort_by_parameter_order=True), rows
            )
            self._patients.update(zip(new_patients, result.scalars(), strict=True))
        new_visits: dict[tuple[int, str], Identity] = {}
        for identity in identities:
            key = (self._patients[identity.patient], identity.visit_label)
            if key not in self._visits:
                new_visits.setdefault(key, identity)
        if new_visits:
            rows = [{"patient_id": pid, "label": label, "visit_date": identity.visit_date,
                     "date_source": identity.date_source, "created_at": utcnow()}
                    for (pid, label), identity in new_visits.items()]
            result = session.execute(
                insert(Visit).returning(Visit.id, sort_by_parameter_order=True), rows
            )
            self._visits.update(zip(new_visits, result.scalars(), strict=True))

    def _visit_id(self, identity: Identity) -> int:
        return self._visits[(self._patients[identity.patient], identity.visit_label)]

    def _insert(self, session: Session, items: list[NewImage]) -> None:
        if not items:
            return
        self._ensure_visits(session, [item.identity for item in items])
        rows: list[dict[str, Any]] = []
        for item in items:
            read, tags = item.read, item.read.dicom
            rows.append({
                "study_id": self._study_id,
                "visit_id": self._visit_id(item.identity),
                "sha256": read.sha256,
                "path": read.rel,
                "format": read.format,
                "size_bytes": read.size_bytes,
                "width": read.width,
                "height": read.height,
                "frames": tags.frames if tags else 1,
                "body_site": item.identity.body_site,
                "study_uid": tags.study_uid if tags else None,
                "series_uid": tags.series_uid if tags else None,
                "sop_uid": tags.sop_uid if tags else None,
                "decode_status": "ok",
                "identifying_pixels": tags.identifying_pixels if tags else None,
                "device": read.device,
                "fitzpatrick": item.fitzpatrick,
                **self._quality(read),
            })
        # One executemany, then the new ids by their (unique) content hash: on PostgreSQL an
        # INSERT ... RETURNING in parameter order took 1.8x as long (one statement of up to
        # 1,000 rows for the server to plan). render_nulls: every row names every column;
        # without it the ORM leaves out each row's None values and starts a new statement
        # wherever that set changes (DICOM UIDs, a camera, a flag): 834 for 2,000 images.
        session.execute(insert(Image).execution_options(render_nulls=True), rows)
        shas = [row["sha256"] for row in rows]
        by_sha: dict[str, int] = {}
        for start in range(0, len(shas), ID_LOOKUP_CHUNK):  # a batch may be any size
            chunk = shas[start:start + ID_LOOKUP_CHUNK]
            by_sha.update(session.execute(
                select(Image.sha256, Image.id).where(Image.sha256.in_(chunk))).all())
        ids = [by_sha[row["sha256"]] for row in rows]
        labels, masks = [], []
        for image_id, item in zip(ids, items, strict=True):
            assert item.read.sha256 is not None
            self._by_sha[item.read.sha256] = _Known(image_id, item.read.rel, self._study_id)
            labels += [_label_row(image_id, severity, rater) for rater, severity in item.labels]
            if item.read.mask is not None and item.read.mask.png is not None:
                masks.append(_mask_row(image_id, item))
        if labels:
            session.execute(insert(Label), labels)
        if masks:
            session.execute(insert(Mask), masks)

    def _quality(self, read: FileRead) -> dict[str, Any]:
        if read.quality is None:
            skipped = None if read.quality_skipped is None else not_measured(read.quality_skipped)
            return {"quality": skipped, "quality_flag": None}
        doc, flag = quality_record(read.quality, self._thresholds)
        self._flagged += flag is not None
        return {"quality": doc, "quality_flag": flag}

    def _sync_known(self, session: Session, known: list[tuple[NewImage, _Known]]) -> int:
        """Add manifest labels and manual masks that appeared since the image was catalogued, a
        Fitzpatrick type the manifest gives now or changed, and the quality measures and camera
        of an image catalogued before they were taken (it was decoded again for them)."""
        if not known:
            return 0
        ids = [existing.id for _, existing in known]
        types: dict[int, int | None] = dict(session.execute(
            select(Image.id, Image.fitzpatrick).where(Image.id.in_(ids))).all())
        changed = 0
        for item, existing in known:
            if item.fitzpatrick is not None and types.get(existing.id) != item.fitzpatrick:
                session.execute(update(Image).where(Image.id == existing.id)
                                .values(fitzpatrick=item.fitzpatrick))
                changed += 1
            # measured now (or found too large to): it had no measures
            if item.read.quality is not None or item.read.quality_skipped is not None:
                session.execute(update(Image).where(Image.id == existing.id,
                                                    Image.quality.is_(None))
                                .values(device=item.read.device, **self._quality(item.read)))
        # Per image and rater: a rater's label changed in the manifest is added again.
        newest: dict[tuple[int, str | None], int] = {}
        for image_id, rater, severity in session.execute(
            select(Label.image_id, Label.rater, Label.severity)
            .where(Label.image_id.in_(ids), Label.source == "manifest")
            .order_by(Label.id)
        ):
            newest[image_id, rater] = severity
        has_mask = set(
            session.scalars(
                select(Mask.image_id).where(Mask.image_id.in_(ids), Mask.kind == "manual")
            )
        )
        labels, masks = [], []
        for item, existing in known:
            labels += [_label_row(existing.id, severity, rater)
                       for rater, severity in item.labels
                       if newest.get((existing.id, rater)) != severity]
            mask = item.read.mask
            if mask is not None and mask.png is not None and existing.id not in has_mask:
                masks.append(_mask_row(existing.id, item))
        if labels:
            session.execute(insert(Label), labels)
        if masks:
            session.execute(insert(Mask), masks)
        return len(labels) + len(masks) + changed

    # -- rejections ------------------------------------------------------------------------

    def record_rejections(
        self, rejected: list[dict[str, str]], duplicates: list[dict[str, str]]
    ) -> None:
        """Replace the study's list of rejections with this ingest's, in one transaction."""
        now = utcnow()
        duplicated = {dup["path"] for dup in duplicates}
        # One row per path (the table's key): a whole file's rejection says more than one about
        # its label, and a duplicate is recorded as such.
        kept = _unique(sorted(rejected, key=lambda r: r.get("kind", FILE) != FILE))
        with self._factory() as session, session.begin():
            session.execute(delete(Rejection).where(Rejection.study_id == self._study_id))
            rows: list[dict[str, Any]] = [
                {"study_id": self._study_id, "path": r["path"], "kind": r.get("kind", FILE),
                 "reason": r["reason"], "same_as_image_id": None, "created_at": now}
                for r in kept
                if r["path"] not in duplicated
            ]
            for dup in _unique(duplicates):
                same = self.duplicate_of.get(dup["path"])
                rows.append({"study_id": self._study_id, "path": dup["path"], "kind": DUPLICATE,
                             "reason": f"same picture as {dup['same_as']}",
                             "same_as_image_id": same, "created_at": now})
            if rows:
                session.execute(insert(Rejection), rows)


def _unique(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """One row per path; a photograph's refused label and Fitzpatrick type (two parts filed under
    its path) become one row that says both."""
    seen: dict[str, dict[str, str]] = {}
    kinds: dict[str, set[str]] = {}
    for row in rows:
        first = seen.setdefault(row["path"], row)
        kind = row.get("kind", FILE)
        if first is not row and FILE not in kinds[row["path"]] and kind not in kinds[row["path"]]:
            seen[row["path"]] = {**first, "reason": f"{first['reason']}; {row['reason']}"}
        kinds.setdefault(row["path"], set()).add(kind)
    return list(seen.values())


def _label_row(image_id: int, severity: int, rater: str | None = None) -> dict[str, Any]:
    return {"image_id": image_id, "severity": severity, "source": "manifest", "rater": rater,
            "note": None, "created_at": utcnow()}


def _mask_row(image_id: int, item: NewImage) -> dict[str, Any]:
    mask = item.read.mask
    assert mask is not None and mask.png is not None
    return {
        "image_id": image_id, "kind": "manual", "variant": "", "model_id": None,
        "prompt_ids": [], "prompt_similarities": [], "prompt_similarity": None,
        "width": item.read.width, "height": item.read.height,
        "area_fraction": mask.area_fraction, "png": mask.png,
        "source_path": mask.rel,
        "flag": None, "created_at": utcnow(),
    }
