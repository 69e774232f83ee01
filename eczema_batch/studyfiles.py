"""Read one file of a study folder: inside the folder, the file the scan saw, and nothing else.

Every read of a study file goes through here (ingest, `run`, `report --html`, `export
--format dicom-seg`), so one set of rules holds everywhere (README, "Safety"):

- A path is relative to the study folder and opened from the folder's descriptor one component at
  a time with O_NOFOLLOW: no symbolic link is followed at any level, so a file or a folder swapped
  for a link after the scan is refused, never followed out of the study.
- Only regular files are read. The type is checked with lstat before the open (opening a FIFO
  blocks, a device can stream forever, some devices act on open) and again with fstat on the
  descriptor, which is opened O_NONBLOCK so that even a FIFO swapped in between cannot block.
- The opened file must be the one the scan saw (device and inode); its size is checked before a
  byte is read and its first bytes (`check_head`) before the rest is read.
- A file may have more hard links than one only when all its names are inside the study (the scan
  counts them): a name outside means its content is someone else's file.
- The file is read to the size fstat gave and no further: a file that grows, shrinks or is
  rewritten while it is read (a copy still in progress) is refused.
- After ingest, a catalogued file is read only at its catalogued size and used only when its
  SHA-256 is still the catalogue's (`read_catalogued`).

Reasons never name the file: callers file them under the path, and logs carry ids only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eczema_batch.errors import RejectedFileError

#: Folders on the way: never a link, always a folder.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: The file itself: never a link; O_NONBLOCK so that a FIFO swapped in after the lstat cannot
#: block the open; O_NOCTTY so that a terminal device never becomes ours.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

CheckHead = Callable[[bytes], str | None]


class StudyFileGoneError(RejectedFileError):
    """the file is gone from the study folder (moved or deleted)"""


@dataclass(frozen=True)
class FileId:
    """Which file a name led to: device and inode, as the scan saw it."""

    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino)


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "a special file"


def not_regular(mode: int) -> str:
    return f"{kind_of(mode)}, not a regular file: only image files are read"


def escaped(name: str) -> str:
    """A name as UTF-8 text, undecodable bytes shown as \\xNN (`bad\\xff.jpg`)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode's surrogate escapes: bytes that are not UTF-8
        return False
    return True


def split_relative(rel: str) -> list[str]:
    """The components of a path inside the study; anything that could climb out is refused."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise RejectedFileError("not a path inside the study folder")
    return parts


def open_root(root: Path, *, expect: FileId | None = None) -> int:
    """The study folder's descriptor (the caller closes it).

    The folder's own path may hold links (the user named it); with `expect`, it must still be the
    folder that was scanned.
    """
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise StudyFileGoneError(
            "the study folder is gone (moved or deleted): ingest it again, or mount it where the "
            "catalogue says (ECZEMA_BATCH_IMAGE_ROOT)"
        ) from exc
    except OSError as exc:
        raise RejectedFileError(f"the study folder cannot be opened: {_why(exc)}") from exc
    if expect is not None and FileId.of(os.fstat(fd)) != expect:
        os.close(fd)
        raise RejectedFileError("the study folder was replaced while it was read: ingest again")
    return fd


def open_folder(root_fd: int, parts: list[str]) -> int:
    """The descriptor of root/parts..., following no link (the caller closes it)."""
    fd = os.dup(root_fd)
    try:
        for name in parts:
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as exc:
        os.close(fd)
        raise _folder_error(exc) from exc
    return fd


def _folder_error(exc: OSError) -> RejectedFileError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return RejectedFileError(
            "a folder on its path is now a symbolic link or not a folder: links are never "
            "followed (nothing outside the study folder is read)"
        )
    if exc.errno == errno.ENOENT:
        return StudyFileGoneError(
            "the file is gone from the study folder (moved or deleted): a folder on its path "
            "no longer exists"
        )
    return RejectedFileError(f"file cannot be read: a folder on its path cannot be opened "
                             f"({_why(exc)})")


def open_regular(dir_fd: int, name: str) -> tuple[int, os.stat_result]:
    """Open `name` in the folder `dir_fd` if it is a regular file: (descriptor, its fstat)."""
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        raise _file_error(exc) from exc
    if stat.S_ISLNK(before.st_mode):
        raise RejectedFileError(_NOW_A_LINK)
    if not stat.S_ISREG(before.st_mode):
        raise RejectedFileError(not_regular(before.st_mode))
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _file_error(exc) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or FileId.of(st) != FileId.of(before):
        os.close(fd)
        raise RejectedFileError("the file was replaced while it was opened: ingest again")
    return fd, st


def _file_error(exc: OSError) -> RejectedFileError:
    if exc.errno == errno.ELOOP:
        return RejectedFileError(_NOW_A_LINK)
    if exc.errno == errno.ENOENT:
        return StudyFileGoneError("the file is gone from the study folder (moved or deleted)")
    if exc.errno == errno.ENXIO:  # open() of a socket
        return RejectedFileError(not_regular(stat.S_IFSOCK))
    return RejectedFileError(f"file cannot be read: {_why(exc)}")


_NOW_A_LINK = ("the file is now a symbolic link: links are never followed (nothing outside the "
               "study folder is read)")


def _why(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def size_text(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def read_study_file(
    root: Path,
    rel: str,
    *,
    max_bytes: int,
    expect: FileId | None = None,
    root_id: FileId | None = None,
    names_inside: int | None = None,
    check_head: CheckHead | None = None,
    head_bytes: int = 0,
    exact_size: int | None = None,
) -> bytes:
    """The content of root/rel under the rules above. Raises RejectedFileError with the reason.

    `expect` (and `root_id`) are what the scan saw; `names_inside` is how many of the file's hard
    links the scan found in the study (more links than that: refused). `check_head` gets the
    first `head_bytes` bytes (or the whole file, if shorter) and returns a reason to refuse it,
    or None; an empty file is returned as b"" without calling it. With `exact_size`, a file of
    any other size is refused as changed since it was catalogued.
    """
    parts = split_relative(rel)
    root_fd = open_root(root, expect=root_id)
    try:
        dir_fd = open_folder(root_fd, parts[:-1])
    finally:
        os.close(root_fd)
    try:
        fd, st = open_regular(dir_fd, parts[-1])
    finally:
        os.close(dir_fd)
    try:
        if expect is not None and FileId.of(st) != expect:
            raise RejectedFileError(
                "the file was replaced after the folder was scanned: ingest again"
            )
        if names_inside is not None and st.st_nlink > names_inside:
            raise RejectedFileError(hard_link_reason(st.st_nlink, names_inside))
        if exact_size is not None and st.st_size != exact_size:
            raise RejectedFileError(_changed_since(size_text(st.st_size)))
        if st.st_size > max_bytes:
            raise RejectedFileError(
                f"file of {size_text(st.st_size)} exceeds the limit of {size_text(max_bytes)} "
                "(ECZEMA_BATCH_MAX_FILE_BYTES)"
            )
        return _read_exactly(fd, st, check_head, head_bytes)
    finally:
        os.close(fd)


def hard_link_reason(links: int, inside: int) -> str:
    return (
        f"a hard link to a file with a name outside the study folder ({links} names, {inside} "
        "inside): copy the file into the study instead of linking it"
    )


def _read_exactly(fd: int, st: os.stat_result, check_head: CheckHead | None,
                  head_bytes: int) -> bytes:
    size = st.st_size
    if size == 0:
        return b""
    if check_head is not None:
        # The head decides most non-images (a 3 GB video named .jpg) before the rest is read.
        head = os.pread(fd, min(size, head_bytes), 0)
        if (reason := check_head(head)) is not None:
            raise RejectedFileError(reason)
    parts = []
    remaining = size
    while remaining > 0:
        # A regular file's read returns all it is asked for but at EOF: one read, one buffer.
        chunk = os.read(fd, remaining)
        if not chunk:
            raise RejectedFileError(_CHANGED)
        parts.append(chunk)
        remaining -= len(chunk)
    after = os.fstat(fd)
    if os.read(fd, 1) or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise RejectedFileError(_CHANGED)
    return parts[0] if len(parts) == 1 else b"".join(parts)


_CHANGED = ("the file changed while it was read (still being copied?): ingest again once it is "
            "complete")


@dataclass(frozen=True)
class CataloguedFile:
    """Where a catalogued image is (its study folder and its path inside) and what it holds."""

    root: Path
    rel: str
    size_bytes: int
    sha256: str

    def read(self) -> bytes:
        return read_catalogued(self.root, self.rel, size_bytes=self.size_bytes,
                               sha256=self.sha256)


def read_catalogued(root: Path, rel: str, *, size_bytes: int, sha256: str) -> bytes:
    """A catalogued file's content, refused unless it is still what ingest catalogued.

    The catalogued size bounds the read (a file swapped for an 8 GB one is refused from fstat);
    the SHA-256 decides. Hard links are not counted here: the hash already says the content is
    the catalogued picture.
    """
    data = read_study_file(root, rel, max_bytes=size_bytes, exact_size=size_bytes)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RejectedFileError(
            "the file's content changed since it was catalogued (its SHA-256 is not the "
            "catalogue's): restore the original file; a new picture needs a new name and an ingest"
        )
    return data


def _changed_since(now: str) -> str:
    return (f"the file changed since it was catalogued (it is {now} now, not its catalogued "
            "size): restore the original file; a new picture needs a new name and an ingest")
