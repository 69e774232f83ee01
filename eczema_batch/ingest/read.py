"""Read, hash and fully decode one study file (runs in worker processes).

Each file is read once: the same bytes are hashed and decoded, so a broken image is found at ingest
rather than later on a GPU. The decode is `check_bytes`: all the compressed data, but never the
full-size pixels (ingest keeps only the size and a copy of at most 512 px, which the quality
measures read here, in the worker), so a 200 MP photo costs megabytes, not gigabytes.
A file whose content is already catalogued (and measured) is hashed but not decoded again,
which makes re-running an ingest cheap. Files are opened by `eczema_batch.studyfiles`
(inside the study, no link followed, the file the scan saw, regular, within the size limit, an
image from its first bytes) before anything else is read.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from eczema_batch.config import DEFAULT_MAX_FILE_BYTES
from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging import (
    SNIFF_BYTES,
    DicomTags,
    check_bytes,
    encode_mask_png,
    read_mask,
    sniff_format,
)
from eczema_batch.imaging.photo import NOT_AN_IMAGE, PNG_MAGIC, PNG_SAMPLE_MAX_PIXELS
from eczema_batch.imaging.quality import SAMPLE_SIDE, QualityMeasures, measure
from eczema_batch.ingest.scan import ScanEntry
from eczema_batch.studyfiles import FileId, read_study_file


@dataclass(frozen=True)
class ReadTask:
    rel: str
    entry: ScanEntry
    mask_rel: str | None = None
    mask_entry: ScanEntry | None = None


@dataclass(frozen=True)
class StudyRoot:
    """Where the files are and what the scan saw of the folder itself."""

    path: Path
    id: FileId | None = None
    max_bytes: int = DEFAULT_MAX_FILE_BYTES


@dataclass(frozen=True)
class MaskRead:
    rel: str | None
    png: bytes | None
    area_fraction: float
    #: why the mask cannot be used (its image still can), or None
    error: str | None


@dataclass(frozen=True)
class FileRead:
    rel: str
    sha256: str | None = None
    size_bytes: int = 0
    #: why the file cannot be catalogued, or None
    error: str | None = None
    #: content already catalogued: not decoded again
    known: bool = False
    format: str | None = None
    width: int = 0
    height: int = 0
    dicom: DicomTags | None = None
    mask: MaskRead | None = None
    #: the camera (EXIF or DICOM), None when the file does not say or was not decoded
    device: str | None = None
    #: blur, exposure and colour cast of the decoded picture; None when it was not decoded
    quality: QualityMeasures | None = None
    #: why a decoded picture was not measured (a PNG too large to sample), else None
    quality_skipped: str | None = None


#: Set once per worker process: sha256 -> (width, height) of everything already catalogued,
#: the pixel limit, the study folder.
_KNOWN: dict[str, tuple[int, int]] = {}
_MAX_PIXELS = 0
#: the key of PatientID pseudonyms when the study keys on PatientID, else None
_PSEUDONYM_KEY: bytes | None = None
_ROOT = StudyRoot(Path("."))


def _init_worker(known: dict[str, tuple[int, int]], max_pixels: int, root: StudyRoot,
                 pseudonym_key: bytes | None = None) -> None:
    global _KNOWN, _MAX_PIXELS, _ROOT, _PSEUDONYM_KEY
    _KNOWN = known
    _MAX_PIXELS = max_pixels
    _ROOT = root
    _PSEUDONYM_KEY = pseudonym_key


def _image_head(head: bytes) -> str | None:
    return NOT_AN_IMAGE if sniff_format(head) is None else None


def _mask_head(head: bytes) -> str | None:
    return None if head.startswith(PNG_MAGIC) else "mask is not a PNG image"


def _read(rel: str, entry: ScanEntry, check_head: Callable[[bytes], str | None]) -> bytes:
    return read_study_file(
        _ROOT.path, rel, max_bytes=_ROOT.max_bytes, expect=entry.id, root_id=_ROOT.id,
        names_inside=entry.names_inside, check_head=check_head, head_bytes=SNIFF_BYTES,
    )


def _read_mask(task: ReadTask, size: tuple[int, int]) -> MaskRead | None:
    if task.mask_rel is None or task.mask_entry is None:
        return None
    # A mask's error rejects the mask, filed under its own path, not the image.
    try:
        mask = read_mask(_read(task.mask_rel, task.mask_entry, _mask_head), image_size=size)
    except RejectedFileError as exc:
        return MaskRead(task.mask_rel, png=None, area_fraction=0.0, error=str(exc))
    return MaskRead(
        task.mask_rel, png=encode_mask_png(mask), area_fraction=float(mask.mean()), error=None
    )


def read_file(task: ReadTask) -> FileRead:
    try:
        data = _read(task.rel, task.entry, _image_head)
    except RejectedFileError as exc:
        return FileRead(rel=task.rel, error=str(exc))
    sha = hashlib.sha256(data).hexdigest()
    if sha in _KNOWN:
        width, height = _KNOWN[sha]
        return FileRead(
            rel=task.rel, sha256=sha, size_bytes=len(data), known=True, width=width,
            height=height, mask=_read_mask(task, (width, height)),
        )
    if not data:
        return FileRead(rel=task.rel, sha256=sha, error="empty file")
    try:
        decoded = check_bytes(data, max_pixels=_MAX_PIXELS, pseudonym_key=_PSEUDONYM_KEY,
                              sample_side=SAMPLE_SIDE)
    except RejectedFileError as exc:
        return FileRead(rel=task.rel, sha256=sha, size_bytes=len(data), error=str(exc))
    skipped = None
    if decoded.sample is None:
        skipped = (f"not measured: a PNG of {decoded.width} x {decoded.height} px, which ingest "
                   f"would have to decode in full (over {PNG_SAMPLE_MAX_PIXELS:,} pixels)")
    return FileRead(
        rel=task.rel,
        sha256=sha,
        size_bytes=len(data),
        format=decoded.format,
        width=decoded.width,
        height=decoded.height,
        dicom=decoded.dicom,
        mask=_read_mask(task, (decoded.width, decoded.height)),
        device=decoded.device,
        # here, in the decode process, on the small copy: a few ms beside the decode itself
        quality=None if decoded.sample is None else measure(decoded.sample),
        quality_skipped=skipped,
    )


def _read_many(tasks: list[ReadTask]) -> list[FileRead]:
    return [read_file(task) for task in tasks]


class FileReader:
    """Reads files in this process or in a pool of decode processes, in order."""

    def __init__(
        self, *, known: dict[str, tuple[int, int]], max_pixels: int, processes: int,
        root: StudyRoot,
        pseudonym_key: bytes | None = None,
    ) -> None:
        self._known = known
        self._max_pixels = max_pixels
        self._processes = processes
        self._root = root
        self._pseudonym_key = pseudonym_key
        self._pool: Executor | None = None

    def __enter__(self) -> FileReader:
        _init_worker(self._known, self._max_pixels, self._root, self._pseudonym_key)
        if self._processes > 1:
            # fork: the decoders import nothing heavy, and children start in milliseconds.
            context = multiprocessing.get_context("fork")
            self._pool = ProcessPoolExecutor(
                max_workers=self._processes,
                mp_context=context,
                initializer=_init_worker,
                initargs=(self._known, self._max_pixels, self._root, self._pseudonym_key),
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def read(self, tasks: list[ReadTask], *, chunk: int = 16) -> Iterator[FileRead]:
        """Yield FileReads in the order of `tasks`."""
        if self._pool is None:
            for task in tasks:
                yield read_file(task)
            return
        batches = [tasks[i : i + chunk] for i in range(0, len(tasks), chunk)]
        for results in self._pool.map(_read_many, batches):
            yield from results
