"""Walk a study folder: which files are images, which are masks, what the layout says.

Layout: `PATIENT/VISIT/NAME.ext` (deeper folders keep the first two levels), `NAME.mask.png` beside
an image is its manual mask, `manifest.csv` at the top is read by `manifest.py`. Hidden files and
folders (a leading dot: .DS_Store, .git) are not part of a study and are skipped.

Every other name found ends up a file to read or a rejection with its reason; nothing stops the
walk (the rules are in `eczema_batch/studyfiles.py`, which reads what is listed here):

- The walk opens each folder from the study folder's descriptor without following links, and
  records each file's device and inode, so the reader can tell the file it opens is this one.
- No symbolic link is followed, to a file or a folder: a link is rejected, saying whether it leads
  outside the study, loops or is broken (a target inside the study is catalogued from where it is).
- Only regular files are read: a FIFO, socket or device is rejected from its type, unopened.
- A file with hard links is read only when all its names are in the study (counted here).
- A name that is not valid UTF-8 is rejected (the catalogue stores text), shown with `\\xNN`
  escapes for the bytes that are not; a folder that cannot be listed is rejected, not skipped.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from eczema_batch.errors import RejectedFileError, StudyFolderError
from eczema_batch.studyfiles import (
    FileId,
    escaped,
    hard_link_reason,
    is_utf8,
    not_regular,
    open_folder,
    open_root,
)

MANIFEST_NAME = "manifest.csv"
MASK_SUFFIX = ".mask.png"
#: Files that operating systems and photo tools drop into folders; not study content.
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "DICOMDIR"})

NOT_UTF8 = ("its name is not valid UTF-8 (shown with \\x escapes): rename it, e.g. with "
            "`convmv -f latin1 -t utf8`, and ingest again")


@dataclass(frozen=True)
class Layout:
    """What the folder names say about a file."""

    patient: str | None
    visit_folder: str | None


@dataclass(frozen=True)
class ScanEntry:
    """A regular file as the scan saw it."""

    id: FileId
    #: how many of its hard links are names inside the study (the reader refuses more links)
    names_inside: int


@dataclass
class StudyScan:
    root: Path
    root_id: FileId | None = None
    #: relative POSIX path -> absolute path (for messages; reads go through `entries`)
    images: dict[str, Path] = field(default_factory=dict)
    #: image relative path -> mask relative path, from `NAME.mask.png` beside `NAME.ext`
    masks: dict[str, str] = field(default_factory=dict)
    #: every mask file found, whether or not an image claims it
    mask_files: dict[str, Path] = field(default_factory=dict)
    #: relative path -> reason, for things found but not readable as study content
    rejected: dict[str, str] = field(default_factory=dict)
    manifest: Path | None = None
    #: relative path -> what the scan saw, for every image, mask and the manifest
    entries: dict[str, ScanEntry] = field(default_factory=dict)


def layout_of(relpath: str) -> Layout:
    parts = PurePosixPath(relpath).parts[:-1]
    return Layout(
        patient=parts[0] if len(parts) >= 1 else None,
        visit_folder=parts[1] if len(parts) >= 2 else None,
    )


def mask_stem(relpath: str) -> str:
    return relpath[: -len(MASK_SUFFIX)]


def _inside(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root).rstrip("/") + "/")


def _link_reason(root: Path, rel: str) -> str:
    """Why a symbolic link is rejected: where it leads, if anywhere (it is never followed)."""
    full = root / rel
    try:
        os.stat(full)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop: links are never followed"
        if not _inside(os.path.realpath(full), root):
            return "outside the study folder (symbolic link)"
        return "broken symbolic link"
    if not _inside(os.path.realpath(full), root):
        return "outside the study folder (symbolic link)"
    return ("symbolic link: not followed (its target is catalogued from where it really is, "
            "inside the study)")


def scan_study(root: Path) -> StudyScan:
    """Find the study's files without reading them (the decoder does that)."""
    root = root.resolve()
    scan = StudyScan(root=root)
    try:
        root_fd = open_root(root)
    except RejectedFileError as exc:
        raise StudyFolderError(f"{root}: {exc}") from exc
    files: dict[str, os.stat_result] = {}
    try:
        scan.root_id = FileId.of(os.fstat(root_fd))
        # Depth first, in name order. Each folder is opened from the study folder's descriptor,
        # never through a link, and must be the folder its parent listed.
        stack: list[tuple[tuple[str, ...], os.stat_result | None]] = [((), None)]
        while stack:
            parts, seen = stack.pop()
            stack.extend(reversed(_scan_folder(scan, root_fd, parts, seen, files)))
    finally:
        os.close(root_fd)
    _classify(scan, files)
    return scan


def _scan_folder(
    scan: StudyScan, root_fd: int, parts: tuple[str, ...], seen: os.stat_result | None,
    files: dict[str, os.stat_result],
) -> list[tuple[tuple[str, ...], os.stat_result]]:
    """lstat every name of one folder into `files` or `scan.rejected`; returns its sub-folders."""
    rel = "/".join(parts)
    try:
        dir_fd = open_folder(root_fd, list(parts))
    except RejectedFileError as exc:
        cause = exc.__cause__
        if isinstance(cause, PermissionError):
            scan.rejected[_key(rel)] = _unreadable(cause)
        else:
            scan.rejected[_key(rel)] = f"folder cannot be read: {exc}"
        return []
    subfolders = []
    try:
        if seen is not None and FileId.of(os.fstat(dir_fd)) != FileId.of(seen):
            scan.rejected[_key(rel)] = "folder replaced while the study was scanned: ingest again"
            return []
        try:
            names = sorted(os.listdir(dir_fd))
        except OSError as exc:
            if not parts:
                raise StudyFolderError(f"{scan.root} cannot be read "
                                       f"({(exc.strerror or 'error').lower()}): check its "
                                       "permissions") from exc
            scan.rejected[_key(rel)] = _unreadable(exc)
            return []
        for name in names:
            if name.startswith(".") or name in IGNORED_NAMES:
                continue
            child = "/".join((*parts, name))
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as exc:
                scan.rejected[_key(child)] = f"cannot be read: {(exc.strerror or 'error').lower()}"
                continue
            if stat.S_ISDIR(st.st_mode):
                subfolders.append(((*parts, name), st))
            elif stat.S_ISLNK(st.st_mode):
                scan.rejected[_key(child)] = _link_reason(scan.root, child)
            elif not stat.S_ISREG(st.st_mode):
                scan.rejected[_key(child)] = not_regular(st.st_mode)
            else:
                files[child] = st
    finally:
        os.close(dir_fd)
    return subfolders


def _unreadable(exc: OSError) -> str:
    return (f"folder cannot be read ({(exc.strerror or 'error').lower()}): its files are "
            "neither catalogued nor rejected; let eczema-batch read it and ingest again")


def _key(rel: str) -> str:
    return rel if is_utf8(rel) else escaped(rel)


def _classify(scan: StudyScan, files: dict[str, os.stat_result]) -> None:
    """Regular files -> manifest, masks and images; hard links with names outside are refused."""
    names = Counter(FileId.of(st) for st in files.values())
    stems: dict[str, str] = {}
    for rel in sorted(files):
        st = files[rel]
        if not is_utf8(rel):
            scan.rejected[escaped(rel)] = NOT_UTF8
            continue
        inside = names[FileId.of(st)]
        if st.st_nlink > inside:
            scan.rejected[rel] = hard_link_reason(st.st_nlink, inside)
            continue
        scan.entries[rel] = ScanEntry(FileId.of(st), inside)
        full = scan.root / rel
        if rel == MANIFEST_NAME:
            scan.manifest = full
        elif rel.lower().endswith(MASK_SUFFIX):
            scan.mask_files[rel] = full
        else:
            scan.images[rel] = full
            stems[os.path.splitext(rel)[0]] = rel
    for mask_rel in scan.mask_files:
        image_rel = stems.get(mask_stem(mask_rel))
        if image_rel is not None:
            scan.masks[image_rel] = mask_rel
