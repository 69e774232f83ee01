"""`eczema-batch ingest`: catalogue a study folder.

Every file ends catalogued, recognised (already catalogued, or a duplicate of a catalogued picture)
or rejected with a reason stored in the catalogue. A photograph whose manifest severity or manual
mask cannot be used is catalogued without it, and that label or mask is rejected on its own
(`rejections.py`). Files are decoded in parallel processes and written in batches, one transaction
each: a kill at any moment leaves whole batches, and running the command again completes the rest
(content SHA-256 says what is already there).
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.db import describe
from eczema_batch.catalogue.faults import explain_database_error
from eczema_batch.catalogue.models import Event, Image, Study
from eczema_batch.catalogue.upsert import insert_ignoring_conflicts
from eczema_batch.clock import utcnow
from eczema_batch.config import DEFAULT_MAX_FILE_BYTES
from eczema_batch.errors import RejectedFileError, StudyFolderError, UsageError
from eczema_batch.identifiers import MAX_STUDY_NAME, IdentifierError, key_check, normalise_label
from eczema_batch.imaging.quality import QualityThresholds
from eczema_batch.ingest.manifest import Manifest, read_manifest
from eczema_batch.ingest.read import FileRead, FileReader, ReadTask, StudyRoot
from eczema_batch.ingest.rejections import MASK, PartProblem, rejection
from eczema_batch.ingest.resolve import Identity, look_alike_folders, resolve_identities
from eczema_batch.ingest.scan import MANIFEST_NAME, StudyScan, scan_study
from eczema_batch.ingest.write import CatalogueWriter, NewImage
from eczema_batch.progress import Progress
from eczema_batch.studyfiles import escaped, is_utf8, read_study_file

log = logging.getLogger(__name__)

#: Below this many files a process pool costs more than it saves.
POOL_THRESHOLD = 64
#: A manifest of 300,000 rows is about 30 MB; a larger "manifest" is not one.
MAX_MANIFEST_BYTES = 256 << 20


@dataclass
class IngestReport:
    study: str
    study_id: int
    files: int = 0
    catalogued: int = 0
    already_catalogued: int = 0
    #: labels, manual masks or Fitzpatrick types added to images catalogued before
    updated: int = 0
    #: images measured by this ingest that the quality gate flagged (`review list` shows why)
    quality_flagged: int = 0
    duplicates: list[dict[str, str]] = field(default_factory=list)
    #: files, labels and masks not catalogued: {path, kind, reason} (kinds: `rejections.py`)
    rejected: list[dict[str, str]] = field(default_factory=list)
    #: what stopped nothing but the user should know (a manifest column ignored)
    warnings: list[str] = field(default_factory=list)
    #: (PATIENT/VISIT folder, what DICOM and the folders disagree on) -> files
    notes: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def exit_code(self) -> int:
        """0: all catalogued; 3: some files, labels or masks rejected; 1: nothing could be done."""
        if self.catalogued + self.already_catalogued + len(self.duplicates) == 0:
            return 1
        return 3 if self.rejected else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "files": self.files,
            "catalogued": self.catalogued,
            "already_catalogued": self.already_catalogued,
            "updated": self.updated,
            "quality_flagged": self.quality_flagged,
            "duplicates": sorted(self.duplicates, key=lambda d: d["path"]),
            "rejected": sorted(self.rejected, key=lambda d: d["path"]),
            "warnings": list(self.warnings) + self.note_lines(),
        }

    def note_lines(self) -> list[str]:
        return [f"{folder}: {note} ({files} file{'s' if files > 1 else ''})"
                for (folder, note), files in sorted(self.notes.items())]


class StudyRootError(UsageError):
    """the study was catalogued from another folder"""


class PseudonymKeyError(UsageError):
    """the study keys on PatientID with another pseudonym key"""


def study_name_of(root: Path, given: str | None) -> str:
    """The study's name (normalised, as every identifier); UsageError when it cannot be one."""
    try:
        return normalise_label(given if given is not None else root.name, limit=MAX_STUDY_NAME)
    except IdentifierError as exc:
        raise UsageError(f"the study name {exc}: give one with --study NAME") from None


def _study(
    session: Session, root: Path, name: str, *, moved: bool, pseudonym_key: bytes | None
) -> Study:
    """The study of that name, created or checked: one name, one folder, one pseudonym key.

    Two folders with the same name (siteA/trial, siteB/trial) are two studies: merging them would
    make both sites' P001 one patient and read one site's files for the other's records. So a
    second folder for a name is refused unless the user says the study moved.
    """
    check = key_check(pseudonym_key) if pseudonym_key is not None else None
    study = session.scalar(select(Study).where(Study.name == name))
    if study is None:
        # Two ingests of a new study at once both find no row: the second one's insert does
        # nothing (instead of failing on the unique name) and both go on with the same row,
        # checked below like any existing study.
        session.execute(insert_ignoring_conflicts(session, Study, ["name"])
                        .values(name=name, root=str(root), pseudonym_key_check=check,
                                created_at=utcnow()))
        study = session.scalars(select(Study).where(Study.name == name)).one()
    if study.root != str(root):
        if not moved:
            raise StudyRootError(
                f"study {name!r} was catalogued from {study.root}, not {root}. If it is the same "
                "study in a new place, run again with --moved; if it is another study, give it "
                "a name of its own with --study NAME"
            )
        session.add(
            Event(kind="study.moved", subject_type="study", subject_id=study.id,
                  detail={"from": study.root, "to": str(root)})
        )
        study.root = str(root)
    if study.pseudonym_key_check is not None and check is None:
        raise PseudonymKeyError(
            f"study {name!r} keys on DICOM PatientID: ingest it with --patient-id-pseudonyms "
            "and the same key (ECZEMA_BATCH_PSEUDONYM_KEY), or its new files would be catalogued "
            "under other codes"
        )
    if check is not None and study.pseudonym_key_check not in (None, check):
        raise PseudonymKeyError(
            f"the pseudonym key is not the one study {name!r} was ingested with: every patient "
            "would get a new code. Set ECZEMA_BATCH_PSEUDONYM_KEY to the study's key"
        )
    if check is not None and study.pseudonym_key_check is None:
        study.pseudonym_key_check = check
        session.add(Event(kind="study.keys_on_patient_id", subject_type="study",
                          subject_id=study.id, detail={}))
    return study


@dataclass
class _Plan:
    tasks: list[ReadTask]
    #: image -> problems with its label or mask, rejected once the image itself is catalogued
    parts: defaultdict[str, list[PartProblem]]


def _plan(scan: StudyScan, manifest: Manifest, report: IngestReport) -> _Plan:
    """Pair images with masks; reject what the manifest or layout already rules out."""
    images = dict(scan.images)
    masks = dict(scan.masks)
    parts: defaultdict[str, list[PartProblem]] = defaultdict(list)
    for rel, row in manifest.rows.items():
        parts[rel].extend(row.parts)
        if row.mask is not None:
            # The manifest may name a mask file that does not follow the NAME.mask.png rule.
            if row.mask in images:
                scan.mask_files[row.mask] = images.pop(row.mask)
            if row.mask not in scan.mask_files:
                parts[rel].append(PartProblem(
                    MASK, row.mask,
                    f"{MANIFEST_NAME} line {row.line}: mask {row.mask} is not in the study folder",
                ))
            else:
                masks[rel] = row.mask
        if rel not in images and rel not in manifest.problems and rel not in scan.rejected:
            report.rejected.append(rejection(
                rel,
                f"{MANIFEST_NAME} line {row.line} names {rel}, which is not in the study folder",
            ))
    claimed = set(masks.values())
    for mask_rel in sorted(set(scan.mask_files) - claimed):
        report.rejected.append(rejection(
            mask_rel,
            "mask without an image: put NAME.mask.png beside NAME.jpg (or .png, .dcm) "
            "or name it in the mask column of manifest.csv",
        ))
    for rel, reason in scan.rejected.items():
        report.rejected.append(rejection(rel, reason))
    tasks = []
    for rel in sorted(images):
        if rel in manifest.problems:
            report.rejected.append(rejection(rel, manifest.problems[rel]))
            continue
        mask_of = masks.get(rel)
        tasks.append(
            ReadTask(rel=rel, entry=scan.entries[rel], mask_rel=mask_of,
                     mask_entry=scan.entries[mask_of] if mask_of else None)
        )
    for key, reason in manifest.problems.items():
        if key not in images and key not in scan.images:
            report.rejected.append(rejection(key, reason))
    return _Plan(tasks, parts)


#: The smallest batch ingest writes while files are left to read.
MIN_BATCH_FILES = 25


def _batches(items: Iterable[FileRead], size: int, total: int) -> Iterable[list[FileRead]]:
    """Batches of `size` reads, shrinking to a quarter of those left near the end: writing
    overlaps reading until the last batch, which is written after every file has been read, so
    a short last batch is a short wait (PostgreSQL took 0.4 s for 500 rows)."""
    batch: list[FileRead] = []
    left = total
    for item in items:
        batch.append(item)
        if len(batch) >= min(size, max(MIN_BATCH_FILES, left // 4)):
            left -= len(batch)
            yield batch
            batch = []
    if batch:
        yield batch


def _read_study_manifest(scan: StudyScan) -> Manifest:
    """The manifest, read under the same rules as every study file; unusable, it stops ingest
    (without it, files would be filed under the wrong patients and dates)."""
    if MANIFEST_NAME in scan.rejected:
        raise UsageError(f"{MANIFEST_NAME} cannot be used: {scan.rejected[MANIFEST_NAME]}")
    if scan.manifest is None:
        return Manifest()
    entry = scan.entries[MANIFEST_NAME]
    try:
        data = read_study_file(scan.root, MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES,
                               expect=entry.id, root_id=scan.root_id,
                               names_inside=entry.names_inside)
    except RejectedFileError as exc:
        raise UsageError(f"{MANIFEST_NAME} cannot be used: {exc}") from exc
    return read_manifest(scan.manifest, data=data)


def ingest_study(
    root: Path,
    *,
    factory: sessionmaker[Session],
    study_name: str | None = None,
    max_pixels: int,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    processes: int = 0,
    batch_files: int = 500,
    progress: Progress | None = None,
    moved: bool = False,
    pseudonym_key: bytes | None = None,
    quality: QualityThresholds | None = None,
) -> IngestReport:
    """Catalogue the folder `root` as study `study_name` (default: the folder's name).

    `moved`: the study was catalogued from another folder and now lives here. `pseudonym_key`:
    the study keys on DICOM PatientID, stored as a keyed pseudonym (`identifiers.pseudonym`).
    `quality`: where the image-quality gate flags a photograph (default: QualityThresholds()).
    """
    if not root.exists():
        raise StudyFolderError(f"{root} does not exist: give the folder that holds the study")
    if not root.is_dir():
        raise StudyFolderError(f"{root} is not a folder: give the folder that holds the study")
    root = root.resolve()
    if not is_utf8(str(root)):
        raise StudyFolderError(
            f"the study folder's path {escaped(str(root))} is not valid UTF-8 (shown with \\x "
            "escapes): rename it, e.g. with `convmv -f latin1 -t utf8`"
        )
    name = study_name_of(root, study_name)
    scan = scan_study(root)
    manifest = _read_study_manifest(scan)

    with factory() as session, session.begin():
        study_id = _study(session, root, name, moved=moved, pseudonym_key=pseudonym_key).id
        # Images catalogued before the quality measures existed are decoded again to take them.
        known = {
            sha: (w, h)
            for sha, w, h in session.execute(select(Image.sha256, Image.width, Image.height)
                                             .where(Image.quality.is_not(None)))
        }
    report = IngestReport(study=name, study_id=study_id,
                          warnings=list(manifest.warnings) + look_alike_folders(scan.images))
    plan = _plan(scan, manifest, report)
    tasks = plan.tasks
    report.files = len(tasks) + len(report.rejected)
    log.info("study %s: %d files to read, %d manifest warnings", study_id, len(tasks),
             len(report.warnings))

    if processes <= 0:
        processes = os.cpu_count() or 1
    if len(tasks) < POOL_THRESHOLD:
        processes = 1
    writer = CatalogueWriter(factory=factory, study_id=study_id, present=set(scan.images),
                             thresholds=quality)
    done = 0
    study_root = StudyRoot(root, scan.root_id, max_file_bytes)
    with FileReader(known=known, max_pixels=max_pixels, processes=processes,
                    root=study_root, pseudonym_key=pseudonym_key) as reader:
        for batch in _batches(reader.read(tasks), batch_files, len(tasks)):
            try:
                _write_batch(batch, manifest, plan.parts, writer, report)
            except DBAPIError as exc:
                # Each batch is one transaction: those written before this one are whole.
                problem = explain_database_error(
                    exc, describe(factory.kw["bind"]),
                    done=f"{report.catalogued} of {len(tasks)} files were catalogued before it "
                    "filled" if report.catalogued else "")
                if problem is None:
                    raise
                raise problem from exc
            done += len(batch)
            if progress is not None:
                progress(done, len(tasks))
    writer.record_rejections(report.rejected, report.duplicates)
    with factory() as session, session.begin():
        detail: dict[str, Any] = {k: v if isinstance(v, int) else len(v)
                                  for k, v in report.as_dict().items() if k != "study"}
        # Kept for `status --sources`: a file catalogued now is not resolved again next time.
        detail["notes"] = [{"folder": folder, "note": note, "files": files}
                           for (folder, note), files in sorted(report.notes.items())]
        session.add(Event(kind="ingest", subject_type="study", subject_id=study_id,
                          detail=detail))
    return report


def _write_batch(
    batch: list[FileRead],
    manifest: Manifest,
    parts: defaultdict[str, list[PartProblem]],
    writer: CatalogueWriter,
    report: IngestReport,
) -> None:
    new: list[FileRead] = []
    for read in batch:
        if read.error is not None:
            report.rejected.append(rejection(read.rel, read.error))
            continue
        if read.mask is not None and read.mask.error is not None:
            # The mask is refused, not the photograph: catalogue the image without it.
            parts[read.rel].append(PartProblem(MASK, read.mask.rel or read.rel, read.mask.error))
            read = replace(read, mask=None)
        new.append(read)
    resolution = resolve_identities(new, manifest.rows)
    report.notes.update((n.folder, n.note) for n in resolution.notes)
    images: list[NewImage] = []
    for read in new:
        identity = resolution.identities[read.rel]
        if not isinstance(identity, Identity):
            report.rejected.append(rejection(read.rel, identity))
            continue
        row = manifest.rows.get(read.rel)
        images.append(NewImage(read=read, identity=identity,
                               labels=row.ratings if row is not None else (),
                               fitzpatrick=row.fitzpatrick if row is not None else None))
    outcome = writer.write(images)
    report.catalogued += outcome.catalogued
    report.already_catalogued += outcome.already
    report.updated += outcome.updated
    report.quality_flagged += outcome.quality_flagged
    report.duplicates.extend(outcome.duplicates)
    report.rejected.extend(outcome.rejected)
    # A label or mask is rejected only for a photograph in the catalogue: a file rejected as a
    # whole is reported once, for that, and a duplicate's own label or mask is never used.
    for item in images:
        if item.read.rel in writer.catalogued_paths:
            report.rejected.extend(p.rejection(item.read.rel) for p in parts.pop(item.read.rel, []))
