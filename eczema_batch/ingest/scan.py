"""Walk a study folder: which files are images, which are masks, what the layout says.

Layout: `PATIENT/VISIT/NAME.ext` (deeper folders keep the first two levels), `NAME.mask.png` beside
an image is its manual mask, `manifest.csv` at the top is read by `manifest.py`. Hidden files and
folders (a leading dot: .DS_Store, .git) are not part of a study and are skipped. Nothing outside
the study folder is read: a symbolic link that leads out is rejected, and links to folders are not
followed at all (their files are catalogued from their real place, if that is inside the study).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

MANIFEST_NAME = "manifest.csv"
MASK_SUFFIX = ".mask.png"
#: Files that operating systems and photo tools drop into folders; not study content.
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "DICOMDIR"})


@dataclass(frozen=True)
class Layout:
    """What the folder names say about a file."""

    patient: str | None
    visit_folder: str | None


@dataclass
class StudyScan:
    root: Path
    #: relative POSIX path -> absolute path to read (inside root)
    images: dict[str, Path] = field(default_factory=dict)
    #: image relative path -> mask relative path, from `NAME.mask.png` beside `NAME.ext`
    masks: dict[str, str] = field(default_factory=dict)
    #: every mask file found, whether or not an image claims it
    mask_files: dict[str, Path] = field(default_factory=dict)
    #: relative path -> reason, for things found but not readable as study content
    rejected: dict[str, str] = field(default_factory=dict)
    manifest: Path | None = None


def layout_of(relpath: str) -> Layout:
    parts = PurePosixPath(relpath).parts[:-1]
    return Layout(
        patient=parts[0] if len(parts) >= 1 else None,
        visit_folder=parts[1] if len(parts) >= 2 else None,
    )


def mask_stem(relpath: str) -> str:
    return relpath[: -len(MASK_SUFFIX)]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def scan_study(root: Path) -> StudyScan:
    """Find the study's files without reading them (the decoder does that)."""
    root = root.resolve()
    scan = StudyScan(root=root)
    stems: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        kept_dirs = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            full = base / name
            if full.is_symlink():
                rel = full.relative_to(root).as_posix()
                target_inside = _inside(full.resolve(), root)
                scan.rejected[rel] = (
                    "symbolic link to a folder: not followed (its files are catalogued from where "
                    "they really are)"
                    if target_inside
                    else "outside the study folder (symbolic link)"
                )
                continue
            kept_dirs.append(name)
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            if name.startswith(".") or name in IGNORED_NAMES:
                continue
            full = base / name
            rel = full.relative_to(root).as_posix()
            if rel == MANIFEST_NAME:
                scan.manifest = full
                continue
            if full.is_symlink():
                target = full.resolve()
                if not _inside(target, root):
                    scan.rejected[rel] = "outside the study folder (symbolic link)"
                    continue
                if not target.is_file():
                    scan.rejected[rel] = "broken symbolic link"
                    continue
            if name.lower().endswith(MASK_SUFFIX):
                scan.mask_files[rel] = full
                continue
            scan.images[rel] = full
            stems[os.path.splitext(rel)[0]] = rel
    for mask_rel in scan.mask_files:
        image_rel = stems.get(mask_stem(mask_rel))
        if image_rel is not None:
            scan.masks[image_rel] = mask_rel
    return scan
