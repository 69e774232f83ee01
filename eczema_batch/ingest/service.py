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
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Event, Image, Study
from eczema_batch.config import DEFAULT_MAX_FILE_BYTES
from eczema_batch.errors import RejectedFileError, StudyFolderError, UsageError
from eczema_batch.ingest.manifest import Manifest, read_manifest
from eczema_batch.ingest.read import FileRead, FileReader, ReadTask, StudyRoot
from eczema_batch.ingest.rejections import MASK, PartProblem, rejection
from eczema_batch.ingest.resolve import Identity, resolve_identities
from eczema_batch.ingest.scan import MANIFEST_NAME, StudyScan, scan_study
from eczema_batch.ingest.write import CatalogueWriter, NewImage
from eczema_batch.studyfiles import escaped, is_utf8, read_study_file

log = logging.getLogger(__name__)

#: Below this many files a process pool costs more than it saves.
POOL_THRESHOLD = 64
#: A manifest of 300,000 rows is about 30 MB; a larger "manifest" is not one.
MAX_MANIFEST_BYTES = 256 << 20

Progress = Callable[[int, int], None]


@dataclass
class IngestReport:
    study: str
    study_id: int
    files: int = 0
    catalogued: int = 0
    already_catalogued: int = 0
    #: labels or manual masks added to images catalogued before
    updated: int = 0
    duplicates: list[dict[str, str]] = field(default_factory=list)
    #: files, labels and masks not catalogued: {path, kind, reason} (kinds: `rejections.py`)
    rejected: list[dict[str, str]] = field(default_factory=list)
    #: what stopped nothing but the user should know (a manifest column ignored)
    warnings: list[str] = field(default_factory=list)

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
            "duplicates": sorted(self.duplicates, key=lambda d: d["path"]),
            "rejected": sorted(self.rejected, key=lambda d: d["path"]),
            "warnings": list(self.warnings),
        }


def _study(session: Session, root: Path, name: str) -> Study:
    study = session.scalar(select(Study).where(Study.name == name))
    if study is None:
        study = Study(name=name, root=str(root))
        session.add(study)
        session.flush()
    elif study.root != str(root):
        session.add(
            Event(kind="study.moved", subject_type="study", subject_id=study.id,
                  detail={"from": study.root, "to": str(root)})
        )
        study.root = str(root)
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


def _batches(items: Iterable[FileRead], size: int) -> Iterable[list[FileRead]]:
    batch: list[FileRead] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
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
) -> IngestReport:
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
    name = study_name or root.name
    scan = scan_study(root)
    manifest = _read_study_manifest(scan)

    with factory() as session, session.begin():
        study_id = _study(session, root, name).id
        known = {
            sha: (w, h)
            for sha, w, h in session.execute(select(Image.sha256, Image.width, Image.height))
        }
    report = IngestReport(study=name, study_id=study_id, warnings=list(manifest.warnings))
    plan = _plan(scan, manifest, report)
    tasks = plan.tasks
    report.files = len(tasks) + len(report.rejected)
    log.info("study %s: %d files to read, %d manifest warnings", study_id, len(tasks),
             len(report.warnings))

    if processes <= 0:
        processes = os.cpu_count() or 1
    if len(tasks) < POOL_THRESHOLD:
        processes = 1
    writer = CatalogueWriter(factory=factory, study_id=study_id, present=set(scan.images))
    done = 0
    study_root = StudyRoot(root, scan.root_id, max_file_bytes)
    with FileReader(known=known, max_pixels=max_pixels, processes=processes,
                    root=study_root) as reader:
        for batch in _batches(reader.read(tasks), batch_files):
            _write_batch(batch, manifest, plan.parts, writer, report)
            done += len(batch)
            if progress is not None:
                progress(done, len(tasks))
    writer.record_rejections(report.rejected, report.duplicates)
    with factory() as session, session.begin():
        session.add(Event(kind="ingest", subject_type="study", subject_id=study_id,
                          detail={k: v if isinstance(v, int) else len(v)
                                  for k, v in report.as_dict().items() if k != "study"}))
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
    identities = resolve_identities(new, manifest.rows)
    images: list[NewImage] = []
    for read in new:
        identity = identities[read.rel]
        if not isinstance(identity, Identity):
            report.rejected.append(rejection(read.rel, identity))
            continue
        row = manifest.rows.get(read.rel)
        images.append(NewImage(read=read, identity=identity,
                               severity=row.severity if row is not None else None))
    outcome = writer.write(images)
    report.catalogued += outcome.catalogued
    report.already_catalogued += outcome.already
    report.updated += outcome.updated
    report.duplicates.extend(outcome.duplicates)
    report.rejected.extend(outcome.rejected)
    # A label or mask is rejected only for a photograph in the catalogue: a file rejected as a
    # whole is reported once, for that, and a duplicate's own label or mask is never used.
    for item in images:
        if item.read.rel in writer.catalogued_paths:
            report.rejected.extend(p.rejection(item.read.rel) for p in parts.pop(item.read.rel, []))
