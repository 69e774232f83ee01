"""Read, hash and fully decode one study file (runs in worker processes).

Each file is read once: the same bytes are hashed and decoded, so a broken image is found at ingest
rather than later on a GPU. A file whose content is already catalogued is hashed but not decoded
again, which makes re-running an ingest cheap.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging import DicomTags, decode_bytes, encode_mask_png, read_mask


@dataclass(frozen=True)
class ReadTask:
    rel: str
    path: Path
    mask_rel: str | None = None
    mask_path: Path | None = None


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


#: sha256 -> (width, height) of everything already catalogued; set once per worker process.
_KNOWN: dict[str, tuple[int, int]] = {}
_MAX_PIXELS = 0
#: the key of PatientID pseudonyms when the study keys on PatientID, else None
_PSEUDONYM_KEY: bytes | None = None


def _init_worker(
    known: dict[str, tuple[int, int]], max_pixels: int, pseudonym_key: bytes | None = None
) -> None:
    global _KNOWN, _MAX_PIXELS, _PSEUDONYM_KEY
    _KNOWN = known
    _MAX_PIXELS = max_pixels
    _PSEUDONYM_KEY = pseudonym_key


def _read_bytes(path: Path) -> bytes:
    # O_NOFOLLOW: a regular file swapped for a link after the scan is refused, not followed out.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) if not path.is_symlink() else os.O_RDONLY
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _read_mask(task: ReadTask, size: tuple[int, int]) -> MaskRead | None:
    if task.mask_path is None:
        return None
    # A mask's error rejects the mask, filed under its own path, not the image.
    try:
        mask = read_mask(_read_bytes(task.mask_path), image_size=size)
    except RejectedFileError as exc:
        return MaskRead(task.mask_rel, png=None, area_fraction=0.0, error=str(exc))
    except OSError as exc:
        return MaskRead(task.mask_rel, png=None, area_fraction=0.0,
                        error=f"cannot read the mask: {exc.strerror}")
    return MaskRead(
        task.mask_rel, png=encode_mask_png(mask), area_fraction=float(mask.mean()), error=None
    )


def read_file(task: ReadTask) -> FileRead:
    try:
        data = _read_bytes(task.path)
    except OSError as exc:
        return FileRead(rel=task.rel, error=f"cannot read the file: {exc.strerror}")
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
        decoded = decode_bytes(data, max_pixels=_MAX_PIXELS, pseudonym_key=_PSEUDONYM_KEY)
    except RejectedFileError as exc:
        return FileRead(rel=task.rel, sha256=sha, size_bytes=len(data), error=str(exc))
    return FileRead(
        rel=task.rel,
        sha256=sha,
        size_bytes=len(data),
        format=decoded.format,
        width=decoded.width,
        height=decoded.height,
        dicom=decoded.dicom,
        mask=_read_mask(task, (decoded.width, decoded.height)),
    )


def _read_many(tasks: list[ReadTask]) -> list[FileRead]:
    return [read_file(task) for task in tasks]


class FileReader:
    """Reads files in this process or in a pool of decode processes, in order."""

    def __init__(
        self, *, known: dict[str, tuple[int, int]], max_pixels: int, processes: int,
        pseudonym_key: bytes | None = None,
    ) -> None:
        self._known = known
        self._max_pixels = max_pixels
        self._processes = processes
        self._pseudonym_key = pseudonym_key
        self._pool: Executor | None = None

    def __enter__(self) -> FileReader:
        _init_worker(self._known, self._max_pixels, self._pseudonym_key)
        if self._processes > 1:
            # fork: the decoders import nothing heavy, and children start in milliseconds.
            context = multiprocessing.get_context("fork")
            self._pool = ProcessPoolExecutor(
                max_workers=self._processes,
                mp_context=context,
                initializer=_init_worker,
                initargs=(self._known, self._max_pixels, self._pseudonym_key),
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
