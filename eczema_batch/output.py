"""Files eczema-batch writes: inside the output folder, whole or not at all, never through a link.

- `OutputFolder(path)` is the folder a command writes into (the HTML report's, the DICOM SEG
  export's, the folder of `-o FILE`). It is opened once; every subfolder and file below it is
  reached from that open folder (`dir_fd`), one checked name at a time, so neither a `..` in a
  name nor a folder swapped for a link after a check can lead a write out of it.
- A symbolic link is never followed: where the output folder itself or a subfolder should be, a
  link is refused (someone else put it there, and what it points to is not ours to fill); at a
  file's name, the link is replaced by the new file and what it pointed to is left untouched.
  The folders above the output folder are the user's to name, links and all.
- A file is written to a temporary file beside it and renamed over its name (`os.replace`): a
  reader sees the old file or the new one, never half of one, and an error leaves no new file.
- Names built from data go through `safe_name` (study and patient codes) or are checked UIDs
  (`imaging.dicom.is_uid`: digits and dots); `OutputFolder` refuses any other name that is not
  one plain path component.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, TextIO

from eczema_batch.errors import OutputPathError

#: What a name built from data may keep as it is; anything else is replaced.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Longest name `safe_name` makes (file systems allow 255 bytes; room for suffixes).
MAX_NAME = 100
#: A DICOM UID (PS3.5 9.1): numeric components separated by dots, at most 64 characters.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def safe_name(text: str) -> str:
    """A file or folder name for `text`: itself when it is plain, else a readable, distinct one.

    Plain is letters, digits, `.`, `_` and `-`, not starting with `.` or `-`, and short. Anything
    else is replaced by `_` and followed by 8 hex digits of the text's SHA-256, so two codes
    that differ only in unsafe characters (`P 1`, `P/1`) still get two names.
    """
    if 0 < len(text) <= MAX_NAME and not _UNSAFE.search(text) and text[0] not in ".-":
        return text
    readable = _UNSAFE.sub("_", text).strip("._-")[:MAX_NAME - 9] or "unnamed"
    return f"{readable}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def _check_component(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name or (
            os.sep != "/" and os.sep in name):
        raise OutputPathError(f"{name!r} is not a plain file name: this is a bug in eczema-batch")
    return name


def _is_link(error: OSError) -> bool:
    # O_NOFOLLOW on a link fails with ELOOP (Linux, macOS); FreeBSD says EMLINK.
    return error.errno in (errno.ELOOP, errno.EMLINK)


class OutputFolder:
    """An open output folder; use as a context manager, or call `close`."""

    def __init__(self, path: Path, *, create: bool = True, _fd: int | None = None) -> None:
        self.path = path
        if _fd is not None:
            self._fd = _fd
            return
        if create:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                pass  # a file or a dangling link: the open below says which
            except OSError as exc:
                raise OutputPathError(f"cannot create the folder {path}: {exc.strerror}") from None
        self._fd = self._open_dir(str(path), None, str(path))

    @staticmethod
    def _open_dir(name: str, dir_fd: int | None, shown: str) -> int:
        try:
            return os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            if _is_link(exc) or (exc.errno == errno.ENOTDIR and os.path.islink(shown)):
                raise OutputPathError(
                    f"{shown} is a symbolic link: eczema-batch never writes through one; remove "
                    "it, or give the folder it points to") from None
            if exc.errno == errno.ENOTDIR:
                raise OutputPathError(f"{shown} is not a folder: give a folder") from None
            if exc.errno == errno.ENOENT:
                raise OutputPathError(f"{shown} does not exist: create it first") from None
            raise OutputPathError(f"cannot open the folder {shown}: {exc.strerror}") from None

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def folder(self, name: str) -> OutputFolder:
        """The subfolder `name`, made if missing; a link or a file there is refused."""
        _check_component(name)
        try:
            os.mkdir(name, dir_fd=self._fd)
        except FileExistsError:
            pass
        return OutputFolder(self.path / name,
                            _fd=self._open_dir(name, self._fd, str(self.path / name)))

    @contextmanager
    def open_binary(self, name: str) -> Iterator[BinaryIO]:
        """A new file `name`, renamed into place when the block ends without an error."""
        _check_component(name)
        # O_EXCL and a random name: never a file (or link) someone placed there beforehand.
        temp = f".{name}.{secrets.token_hex(6)}.partial"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC,
                         0o666, dir_fd=self._fd)
        except OSError as exc:
            raise OutputPathError(f"cannot write in {self.path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
            self._replace(temp, name)
        except BaseException:
            os.unlink(temp, dir_fd=self._fd)
            raise

    @contextmanager
    def open_text(self, name: str) -> Iterator[TextIO]:
        """`open_binary` as UTF-8 text, line ends as written."""
        with self.open_binary(name) as raw, io.TextIOWrapper(
                raw, encoding="utf-8", newline="") as text:
            yield text

    def write_bytes(self, name: str, data: bytes) -> Path:
        with self.open_binary(name) as handle:
            handle.write(data)
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def _replace(self, temp: str, name: str) -> None:
        try:
            if stat.S_ISDIR(os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode):
                raise OutputPathError(f"{self.path / name} is a folder: cannot write a file there")
        except FileNotFoundError:
            pass
        # rename(2) replaces a link at `name` itself; it never writes to where the link points.
        try:
            os.replace(temp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except OSError as exc:
            raise OutputPathError(f"cannot write {self.path / name}: {exc.strerror}") from None


@contextmanager
def output_file(path: Path) -> Iterator[TextIO]:
    """Write the text file `path` whole or not at all (its folder must exist)."""
    with OutputFolder(path.parent, create=False) as folder, folder.open_text(path.name) as out:
        yield out
