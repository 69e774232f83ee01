"""Hostile study folders at ingest: odd names, special files, links, swaps, huge files.

Every file must end catalogued or rejected with its reason, the batch must go on and never hang,
and nothing outside the study folder may be read (README, "Safety"). Hangs are guarded by running
the real CLI in a subprocess with a generous timeout: a hang fails the test instead of stopping
the suite.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Image, Rejection
from eczema_batch.errors import RejectedFileError, StudyFolderError
from eczema_batch.ingest import read as ingest_read
from eczema_batch.ingest import service
from eczema_batch.ingest.scan import NOT_UTF8, StudyScan, scan_study
from eczema_batch.studyfiles import read_study_file
from tests.factories import write_jpeg, write_manifest, write_png
from tests.memory import peak_rss_above
from tests.test_ingest import run_ingest

#: Seconds after which a CLI call counts as hung (a healthy one takes a few).
HANG = 120
REPO = Path(__file__).resolve().parent.parent
#: Linux capability numbers (linux/capability.h) and prctl's PR_CAPBSET_DROP.
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def cli(*args: str, as_unprivileged: bool = False) -> tuple[int, dict[str, object] | None, str]:
    """The real CLI in a subprocess: (exit code, JSON on stdout or None, stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "eczema_batch", *args], capture_output=True, text=True,
        timeout=HANG, cwd=REPO, env=os.environ.copy(),
        preexec_fn=_drop_file_permission_override if as_unprivileged else None,
    )
    payload = json.loads(result.stdout) if result.stdout.strip() else None
    return result.returncode, payload, result.stderr


def _drop_file_permission_override() -> None:
    """As root, permissions are bypassed: give that up (in the child, before exec) so that an
    unreadable folder is really unreadable, as for any other user."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def reasons(payload: dict[str, object] | None) -> dict[str, str]:
    assert payload is not None
    rejected = payload["rejected"]
    assert isinstance(rejected, list)
    return {r["path"]: r["reason"] for r in rejected}


def stored_shas(factory: sessionmaker[Session]) -> set[str]:
    with factory() as session:
        return set(session.scalars(select(Image.sha256)))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Pictures outside the study folder that nothing may catalogue."""
    folder = tmp_path / "outside"
    for n in range(4):
        write_jpeg(folder / "v1" / f"{n}.jpg", seed=100 + n)
    return folder


# --- names ----------------------------------------------------------------------------------


def test_names_that_are_not_utf8_are_rejected_and_the_batch_goes_on(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P1" / "v1" / "a.jpg", seed=1)
    write_jpeg(Path(os.fsdecode(bytes(root / "P1" / "v1") + b"/bad\xff.jpg")), seed=2)
    write_jpeg(Path(os.fsdecode(bytes(root / "P1") + b"/visit\xe9/b.jpg")), seed=3)
    for n in range(4):  # later batches (one file each) must still be written
        write_jpeg(root / "P2" / "v1" / f"{n}.jpg", seed=10 + n)
    report = run_ingest(root, factory, batch_files=1)
    assert report.catalogued == 5
    assert {r["path"]: r["reason"] for r in report.rejected} == {
        "P1/v1/bad\\xff.jpg": NOT_UTF8, "P1/visit\\xe9/b.jpg": NOT_UTF8,
    }
    assert report.exit_code == 3
    with factory() as session:
        stored = dict(session.execute(select(Rejection.path, Rejection.reason)).all())
    assert stored == {"P1/v1/bad\\xff.jpg": NOT_UTF8, "P1/visit\\xe9/b.jpg": NOT_UTF8}
    # Renamed, the file is catalogued and its rejection cleared.
    os.rename(bytes(root / "P1" / "v1") + b"/bad\xff.jpg", root / "P1" / "v1" / "bad.jpg")
    again = run_ingest(root, factory)
    assert again.catalogued == 1 and len(again.rejected) == 1


def test_a_study_folder_whose_path_is_not_utf8_is_refused_up_front(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    root = Path(os.fsdecode(bytes(tmp_path) + b"/\xffstudy"))
    write_jpeg(root / "P1" / "v1" / "a.jpg")
    with pytest.raises(StudyFolderError, match=r"\\xffstudy is not valid UTF-8"):
        run_ingest(root, factory)


# --- special files ----------------------------------------------------------------------------


def _special_files(visit: Path) -> dict[str, str]:
    """A FIFO, a socket and (as root) a character device, named as photos; their reasons."""
    os.mkfifo(visit / "fifo.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(visit / "socket.jpg"))
    server.close()  # the socket file stays
    expected = {
        "P1/v1/fifo.jpg": "a named pipe (FIFO), not a regular file: only image files are read",
        "P1/v1/socket.jpg": "a socket, not a regular file: only image files are read",
    }
    if os.geteuid() == 0:  # mknod needs root; /dev/zero is character device 1,5
        os.mknod(visit / "zero.jpg", stat.S_IFCHR | 0o644, os.makedev(1, 5))
        expected["P1/v1/zero.jpg"] = (
            "a character device, not a regular file: only image files are read")
    return expected


def test_fifos_sockets_and_devices_are_rejected_without_being_opened(
    tmp_path: Path, db_url: str, factory: sessionmaker[Session]
) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P1" / "v1" / "a.jpg", seed=1)
    expected = _special_files(root / "P1" / "v1")
    write_jpeg(root / "P2" / "v1" / "b.jpg", seed=2)
    code, payload, err = cli("ingest", str(root), "--json")
    assert code == 3, err
    assert payload is not None and payload["catalogued"] == 2
    assert reasons(payload) == expected


def test_an_unusable_manifest_stops_ingest_before_any_file(
    tmp_path: Path, db_url: str, outside: Path
) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P1" / "v1" / "a.jpg")
    os.mkfifo(root / "manifest.csv")
    code, _, err = cli("ingest", str(root))
    assert code == 2
    assert "manifest.csv cannot be used: a named pipe (FIFO), not a regular file" in err
    (root / "manifest.csv").unlink()
    write_manifest(outside, [{"path": "P1/v1/a.jpg", "patient": "X9"}])
    (root / "manifest.csv").symlink_to(outside / "manifest.csv")
    code, _, err = cli("ingest", str(root))
    assert code == 2
    assert "manifest.csv cannot be used: outside the study folder (symbolic link)" in err


# --- links ------------------------------------------------------------------------------------


def test_symbolic_links_are_never_followed_and_never_stop_the_scan(
    tmp_path: Path, factory: sessionmaker[Session], outside: Path
) -> None:
    root = tmp_path / "study"
    visit = root / "P1" / "v1"
    write_jpeg(visit / "a.jpg", seed=1)
    (visit / "loop1.jpg").symlink_to("loop2.jpg")
    (visit / "loop2.jpg").symlink_to("loop1.jpg")
    (visit / "self.jpg").symlink_to("self.jpg")
    (visit / "gone.jpg").symlink_to("nothing-here.jpg")
    (visit / "again.jpg").symlink_to("a.jpg")
    (visit / "secret.jpg").symlink_to(outside / "v1" / "0.jpg")
    (root / "P2").symlink_to(root / "P1")
    (root / "P3").symlink_to(outside)
    (root / "P4").mkdir()
    (root / "P4" / "loop").symlink_to(root / "P4" / "loop")
    write_jpeg(root / "P5" / "v1" / "b.jpg", seed=2)
    report = run_ingest(root, factory)
    got = {r["path"]: r["reason"] for r in report.rejected}
    inside = ("symbolic link: not followed (its target is catalogued from where it really is, "
              "inside the study)")
    assert got == {
        "P1/v1/loop1.jpg": "symbolic link loop: links are never followed",
        "P1/v1/loop2.jpg": "symbolic link loop: links are never followed",
        "P1/v1/self.jpg": "symbolic link loop: links are never followed",
        "P1/v1/gone.jpg": "broken symbolic link",
        "P1/v1/again.jpg": inside,
        "P1/v1/secret.jpg": "outside the study folder (symbolic link)",
        "P2": inside,
        "P3": "outside the study folder (symbolic link)",
        "P4/loop": "symbolic link loop: links are never followed",
    }
    assert report.catalogued == 2
    assert not stored_shas(factory) & {sha(p) for p in outside.rglob("*.jpg")}


def test_a_hard_link_is_read_only_when_all_its_names_are_in_the_study(
    tmp_path: Path, factory: sessionmaker[Session], outside: Path
) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P1" / "v1" / "a.jpg", seed=1)
    (root / "P1" / "v2").mkdir()
    os.link(root / "P1" / "v1" / "a.jpg", root / "P1" / "v2" / "a-again.jpg")  # both inside
    (root / "P2" / "v1").mkdir(parents=True)
    os.link(outside / "v1" / "0.jpg", root / "P2" / "v1" / "linked.jpg")
    report = run_ingest(root, factory)
    assert report.catalogued == 1
    assert report.duplicates == [{"path": "P1/v2/a-again.jpg", "same_as": "P1/v1/a.jpg"}]
    assert report.rejected == [{
        "path": "P2/v1/linked.jpg", "kind": "rejected",
        "reason": "a hard link to a file with a name outside the study folder (2 names, 1 "
                  "inside): copy the file into the study instead of linking it",
    }]
    assert sha(outside / "v1" / "0.jpg") not in stored_shas(factory)


# --- unreadable -------------------------------------------------------------------------------


def test_an_unreadable_folder_or_file_is_a_rejection_not_a_silent_skip(
    tmp_path: Path, db_url: str
) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P1" / "v1" / "a.jpg", seed=1)
    write_jpeg(root / "P2" / "v1" / "b.jpg", seed=2)
    write_jpeg(root / "P3" / "v1" / "c.jpg", seed=3)
    (root / "P2").chmod(0)
    (root / "P3" / "v1" / "c.jpg").chmod(0)
    try:
        code, payload, err = cli("ingest", str(root), "--json", as_unprivileged=True)
    finally:
        (root / "P2").chmod(0o755)
    assert code == 3, err
    assert payload is not None and payload["catalogued"] == 1
    assert reasons(payload) == {
        "P2": "folder cannot be read (permission denied): its files are neither catalogued nor "
              "rejected; let eczema-batch read it and ingest again",
        "P3/v1/c.jpg": "file cannot be read: permission denied",
    }


# --- size and content -------------------------------------------------------------------------


def _sparse(path: Path, size: int, head: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        file.write(head)
        file.truncate(size)  # a hole: no disk used, but reading it makes `size` bytes
    return path


def test_huge_files_are_refused_from_their_size_and_non_images_from_their_head(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P1" / "v1" / "a.jpg", seed=1)
    _sparse(root / "P1" / "v1" / "huge.jpg", 8 << 30, head=b"\xff\xd8\xff\xe0")
    _sparse(root / "P1" / "v1" / "video.jpg", 3 << 30)
    report = run_ingest(root, factory, max_file_bytes=4 << 30)
    assert {r["path"]: r["reason"] for r in report.rejected} == {
        "P1/v1/huge.jpg": "file of 8.59 GB exceeds the limit of 4.29 GB "
                          "(ECZEMA_BATCH_MAX_FILE_BYTES)",
        "P1/v1/video.jpg": "not an image: content is neither JPEG, PNG nor DICOM",
    }
    assert report.catalogued == 1
    # The 3 GB non-image was refused from its first bytes: reading it takes 3 GB.
    scan = scan_study(root)
    task = ingest_read.ReadTask("P1/v1/video.jpg", scan.entries["P1/v1/video.jpg"])

    def read() -> None:
        ingest_read._init_worker({}, 10**8, ingest_read.StudyRoot(scan.root, scan.root_id,
                                                                 4 << 30))
        assert ingest_read.read_file(task).error is not None

    assert peak_rss_above(read) < 64 << 20


def test_a_file_that_changes_while_it_is_read_is_refused(tmp_path: Path) -> None:
    photo = write_jpeg(tmp_path / "a.jpg", (64, 48))

    # The head check runs after the size is taken and before the rest is read: a hook there
    # changes the file mid-read, deterministically.
    def grow(head: bytes) -> str | None:
        with photo.open("ab") as file:
            file.write(b"\0" * 100)
        return None

    def shrink(head: bytes) -> str | None:
        os.truncate(photo, 100)
        return None

    def rewrite(head: bytes) -> str | None:
        data = bytearray(photo.read_bytes())
        data[200] ^= 0xFF  # same size, other content
        os.utime(photo, ns=(0, 0))
        photo.write_bytes(bytes(data))
        return None

    for change in (grow, shrink, rewrite):
        with pytest.raises(RejectedFileError, match="the file changed while it was read"):
            read_study_file(tmp_path, "a.jpg", max_bytes=1 << 20, head_bytes=8, check_head=change)
        write_jpeg(photo, (64, 48))
    assert read_study_file(tmp_path, "a.jpg", max_bytes=1 << 20) == photo.read_bytes()


@pytest.mark.parametrize("rel", ["../outside.jpg", "/etc/passwd", "a/../../b.jpg", "a//b.jpg",
                                 "./a.jpg", ""])
def test_a_path_that_could_leave_the_study_is_refused(tmp_path: Path, rel: str) -> None:
    write_jpeg(tmp_path / "study" / "a.jpg")
    write_jpeg(tmp_path / "outside.jpg")
    with pytest.raises(RejectedFileError, match="not a path inside the study folder"):
        read_study_file(tmp_path / "study", rel, max_bytes=1 << 20)


# --- swapped between the scan and the read ------------------------------------------------------


@pytest.fixture
def swap_after_scan(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Callable[[Path], None]]]:
    """Swaps to make after ingest's real scan and before any file is read (a deterministic
    stand-in for an attacker racing the scan)."""
    swaps: list[Callable[[Path], None]] = []
    real = service.scan_study

    def scan_then_swap(root: Path) -> StudyScan:
        scan = real(root)
        for swap in swaps:
            swap(root)
        return scan

    monkeypatch.setattr(service, "scan_study", scan_then_swap)
    yield swaps


def test_files_and_folders_swapped_after_the_scan_are_never_read(
    tmp_path: Path, factory: sessionmaker[Session], outside: Path,
    swap_after_scan: list[Callable[[Path], None]],
) -> None:
    root = tmp_path / "study"
    for p, patient in enumerate(("P1", "P2", "P3", "P4", "P5", "P6")):
        for n in range(2):
            write_jpeg(root / patient / "v1" / f"{n}.jpg", seed=10 * p + n)
    write_png(root / "P7" / "v1" / "keep.png", seed=7)
    spare = tmp_path / "spare"  # a real folder of outside pictures under the same names
    shutil.copytree(outside / "v1", spare)

    def swaps(root: Path) -> None:
        # P1: each file becomes a link to an outside picture
        for n in range(2):
            (root / "P1" / "v1" / f"{n}.jpg").unlink()
            (root / "P1" / "v1" / f"{n}.jpg").symlink_to(outside / "v1" / f"{n}.jpg")
        # P2: the visit folder becomes a link to an outside folder with the same names
        shutil.rmtree(root / "P2" / "v1")
        (root / "P2" / "v1").symlink_to(outside / "v1")
        # P3: the patient folder becomes a link (the swap is one level higher)
        shutil.rmtree(root / "P3")
        (root / "P3").symlink_to(outside.parent / "outside-patient")
        (outside.parent / "outside-patient").mkdir()
        (outside.parent / "outside-patient" / "v1").symlink_to(outside / "v1")
        # P4: a real outside folder is moved in under the same name
        shutil.rmtree(root / "P4" / "v1")
        os.rename(spare, root / "P4" / "v1")
        # P5: a file becomes a hard link to an outside picture
        (root / "P5" / "v1" / "0.jpg").unlink()
        os.link(outside / "v1" / "2.jpg", root / "P5" / "v1" / "0.jpg")
        # P6: a file becomes a FIFO (reading would hang)
        (root / "P6" / "v1" / "0.jpg").unlink()
        os.mkfifo(root / "P6" / "v1" / "0.jpg")

    swap_after_scan.append(swaps)
    report = run_ingest(root, factory)
    got = {r["path"]: r["reason"] for r in report.rejected}
    link = ("the file is now a symbolic link: links are never followed (nothing outside the "
            "study folder is read)")
    folder = ("a folder on its path is now a symbolic link or not a folder: links are never "
              "followed (nothing outside the study folder is read)")
    replaced = "the file was replaced after the folder was scanned: ingest again"
    assert got == {
        "P1/v1/0.jpg": link, "P1/v1/1.jpg": link,
        "P2/v1/0.jpg": folder, "P2/v1/1.jpg": folder,
        "P3/v1/0.jpg": folder, "P3/v1/1.jpg": folder,
        "P4/v1/0.jpg": replaced, "P4/v1/1.jpg": replaced,
        "P5/v1/0.jpg": replaced,
        "P6/v1/0.jpg": "a named pipe (FIFO), not a regular file: only image files are read",
    }
    assert report.catalogued == 3  # P5/v1/1.jpg, P6/v1/1.jpg, P7/v1/keep.png
    assert not stored_shas(factory) & {sha(p) for p in outside.rglob("*.jpg")}
