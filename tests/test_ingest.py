"""Ingest against a real catalogue (SQLite and PostgreSQL): layouts, rejections, re-runs, kills."""

from __future__ import annotations

import csv
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Image, Label, Mask, Patient, Rejection, Visit
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.errors import UsageError
from eczema_batch.ingest import write
from eczema_batch.ingest.manifest import read_manifest
from eczema_batch.ingest.read import FileRead
from eczema_batch.ingest.service import MIN_BATCH_FILES, IngestReport, _batches, ingest_study
from eczema_batch.synth import write_synthetic_study
from tests.factories import (
    png_header_only,
    truncated_jpeg,
    write_jpeg,
    write_manifest,
    write_mask,
    write_png,
)

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def run_ingest(root: Path, factory: sessionmaker[Session], **kwargs: object) -> IngestReport:
    return ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, **kwargs)  # type: ignore[arg-type]


def count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


@pytest.fixture
def small_study(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    write_jpeg(root / "P001" / "2024-01-15" / "left-arm.jpg", (64, 48), seed=1)
    write_mask(root / "P001" / "2024-01-15" / "left-arm.mask.png", (64, 48))
    write_png(root / "P001" / "2024-02-12" / "left-arm.png", (40, 30), seed=2)
    write_jpeg(root / "P002" / "visit-02" / "img0001.jpg", (32, 32), seed=3)
    write_manifest(root, [
        {"path": "P001/2024-01-15/left-arm.jpg", "severity": "2", "body_site": "left arm"},
        {"path": "P001/2024-02-12/left-arm.png", "severity": "mild"},
    ])
    return root


def test_ingest_catalogues_layout_manifest_and_masks(
    small_study: Path, factory: sessionmaker[Session]
) -> None:
    report = run_ingest(small_study, factory)
    assert (report.catalogued, report.already_catalogued, report.rejected) == (3, 0, [])
    assert report.exit_code == 0
    with factory() as session:
        patients = {p.subject_code: p for p in session.scalars(select(Patient))}
        assert set(patients) == {"P001", "P002"}
        assert {p.code_source for p in patients.values()} == {"folder"}
        visits = {(v.patient.subject_code, v.label): v for v in session.scalars(select(Visit))}
        assert set(visits) == {("P001", "2024-01-15"), ("P001", "2024-02-12"),
                               ("P002", "visit-02")}
        assert visits[("P001", "2024-01-15")].date_source == "folder"
        assert visits[("P002", "visit-02")].visit_date is None
        image = session.scalars(select(Image).where(Image.path.like("%left-arm.jpg"))).one()
        assert (image.width, image.height, image.format) == (64, 48, "jpeg")
        assert image.body_site == "left arm"
        labels = sorted(session.execute(select(Label.severity, Label.source)).all())
        assert labels == [(1, "manifest"), (2, "manifest")]
        mask = session.scalars(select(Mask)).one()
        assert mask.kind == "manual" and mask.image_id == image.id
        assert mask.area_fraction == pytest.approx(0.25 * 0.25 * 4 / 4, rel=0.05)


def test_rerun_adds_nothing_and_moves_are_followed(
    small_study: Path, factory: sessionmaker[Session]
) -> None:
    run_ingest(small_study, factory)
    again = run_ingest(small_study, factory)
    assert (again.catalogued, again.already_catalogued, again.updated) == (0, 3, 0)
    assert again.exit_code == 0
    # A file renamed in the folder is the same picture: its path follows, nothing is added.
    old = small_study / "P002" / "visit-02" / "img0001.jpg"
    old.rename(old.with_name("renamed.jpg"))
    moved = run_ingest(small_study, factory)
    assert (moved.catalogued, moved.already_catalogued, moved.duplicates) == (0, 3, [])
    with factory() as session:
        assert count(session, Image) == 3
        assert count(session, Label) == 2
        assert session.scalar(select(Image.path).where(Image.path.like("P002%"))) == (
            "P002/visit-02/renamed.jpg"
        )


def test_manifest_changes_on_rerun_add_labels_and_masks(
    small_study: Path, factory: sessionmaker[Session]
) -> None:
    run_ingest(small_study, factory)
    write_mask(small_study / "P002" / "visit-02" / "img0001.mask.png", (32, 32))
    write_manifest(small_study, [
        {"path": "P001/2024-01-15/left-arm.jpg", "severity": "3"},
        {"path": "P001/2024-02-12/left-arm.png", "severity": "mild"},
    ])
    report = run_ingest(small_study, factory)
    assert report.updated == 2  # one new label (2 -> 3), one new manual mask
    with factory() as session:
        assert count(session, Mask) == 2
        assert sorted(session.scalars(select(Label.severity))) == [1, 2, 3]


def test_duplicate_picture_is_reported_not_catalogued(
    small_study: Path, factory: sessionmaker[Session]
) -> None:
    shutil.copyfile(small_study / "P001" / "2024-01-15" / "left-arm.jpg",
                    small_study / "P002" / "visit-02" / "copy.jpg")
    report = run_ingest(small_study, factory)
    assert report.catalogued == 3
    assert report.duplicates == [
        {"path": "P002/visit-02/copy.jpg", "same_as": "P001/2024-01-15/left-arm.jpg"}
    ]
    assert report.exit_code == 0
    with factory() as session:
        dup = session.scalars(select(Rejection)).one()
        assert dup.kind == "duplicate" and dup.same_as_image_id is not None


def test_bad_files_are_rejected_with_reasons_and_the_rest_is_catalogued(
    tmp_path: Path, small_study: Path, factory: sessionmaker[Session]
) -> None:
    visit = small_study / "P003" / "2024-03-01"
    visit.mkdir(parents=True)
    (visit / "empty.jpg").write_bytes(b"")
    (visit / "cut.jpg").write_bytes(truncated_jpeg((256, 192)))
    (visit / "notes.dcm").write_text("this is a text file, not DICOM\n")
    (visit / "noise.jpg").write_bytes(os.urandom(4096))
    (visit / "bomb.png").write_bytes(png_header_only(40_000, 40_000))
    outside = write_jpeg(tmp_path / "elsewhere" / "secret.jpg", seed=9)
    (visit / "link.jpg").symlink_to(outside)
    write_jpeg(visit / "wrongmask.jpg", (320, 240), seed=4)
    write_mask(visit / "wrongmask.mask.png", (50, 50))
    write_jpeg(visit / "orphan-image.jpg", (32, 32), seed=5)
    write_mask(visit / "stray.mask.png", (32, 32))
    write_jpeg(small_study / "P004" / "v1" / "baddate.jpg", seed=6)
    write_jpeg(small_study / "P004" / "v1" / "badpatient.jpg", seed=7)
    write_manifest(small_study, [
        {"path": "P004/v1/baddate.jpg", "visit_date": "2024-13-45"},
        {"path": "P004/v1/badpatient.jpg", "patient": "Jane Doe"},
        {"path": "P009/v1/ghost.jpg", "severity": "1"},
    ])

    report = run_ingest(small_study, factory)

    reasons = {r["path"]: r["reason"] for r in report.rejected}
    assert reasons["P003/2024-03-01/empty.jpg"] == "empty file"
    assert "truncated" in reasons["P003/2024-03-01/cut.jpg"].lower()
    assert "not" in reasons["P003/2024-03-01/notes.dcm"].lower()
    assert "not" in reasons["P003/2024-03-01/noise.jpg"].lower()
    assert reasons["P003/2024-03-01/bomb.png"].startswith(
        "image of 1.6 gigapixels (40000x40000) exceeds the limit"
    )
    assert reasons["P003/2024-03-01/link.jpg"] == "outside the study folder (symbolic link)"
    # The mask that does not fit is rejected; its photograph is catalogued without it.
    assert "mask is 50x50 but its image is 320x240" in reasons[
        "P003/2024-03-01/wrongmask.mask.png"]
    assert "mask without an image" in reasons["P003/2024-03-01/stray.mask.png"]
    assert "'2024-13-45' is not a date" in reasons["P004/v1/baddate.jpg"]
    assert "not a subject code" in reasons["P004/v1/badpatient.jpg"]
    assert "not in the study folder" in reasons["P009/v1/ghost.jpg"]
    assert len(reasons) == 11
    assert report.catalogued == 5  # the three good ones, orphan-image.jpg and wrongmask.jpg
    assert report.exit_code == 3
    with factory() as session:
        stored = dict(session.execute(select(Rejection.path, Rejection.reason)).all())
        assert stored == reasons
        assert count(session, Image) == 5
    # Fixing a file and ingesting again catalogues it and clears its rejection.
    (small_study / "P003" / "2024-03-01" / "empty.jpg").unlink()
    write_jpeg(small_study / "P003" / "2024-03-01" / "empty.jpg", seed=11)
    again = run_ingest(small_study, factory)
    assert again.catalogued == 1
    with factory() as session:
        assert "P003/2024-03-01/empty.jpg" not in set(session.scalars(select(Rejection.path)))


def test_nothing_outside_the_folder_is_read(tmp_path: Path, factory: sessionmaker[Session]) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P001" / "v1" / "a.jpg")
    elsewhere = tmp_path / "elsewhere" / "P002" / "v1"
    write_jpeg(elsewhere / "b.jpg", seed=2)
    (root / "P002").symlink_to(tmp_path / "elsewhere" / "P002")
    report = run_ingest(root, factory)
    assert report.catalogued == 1
    assert report.rejected == [
        {"path": "P002", "kind": "rejected", "reason": "outside the study folder (symbolic link)"}
    ]


def test_every_pydicom_test_file_is_catalogued_or_rejected(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    root = tmp_path / "dicom-study"
    files = [p for p in PYDICOM_FILES.rglob("*") if p.is_file()]
    assert len(files) > 150
    for source in files:
        target = root / "X001" / "visit-1" / source.relative_to(PYDICOM_FILES).as_posix().replace(
            "/", "__")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    report = run_ingest(root, factory)
    accounted = report.catalogued + len(report.duplicates) + len(report.rejected)
    assert accounted == len(files)
    assert report.catalogued >= 60
    assert all(r["reason"] for r in report.rejected)
    reasons = {r["reason"] for r in report.rejected}
    assert any("no pixel data" in reason for reason in reasons)
    with factory() as session:
        assert count(session, Image) == report.catalogued
        dicom_patients = set(session.scalars(select(Patient.code_source)))
        assert dicom_patients <= {"PatientID", "ClinicalTrialSubjectID", "folder"}


def test_kill_then_rerun_completes_a_consistent_catalogue(
    tmp_path: Path, db_url: str, factory: sessionmaker[Session]
) -> None:
    root = tmp_path / "study"
    for i in range(240):
        write_jpeg(root / f"P{i % 12:03d}" / f"2024-01-{1 + i % 20:02d}" / f"img{i}.jpg",
                   (48, 32), seed=i)
    env = {**os.environ, "ECZEMA_BATCH_DATABASE_URL": db_url,
           "ECZEMA_BATCH_INGEST_BATCH_FILES": "20", "ECZEMA_BATCH_INGEST_WORKERS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "eczema_batch", "ingest", str(root)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        with factory() as session:
            seen = count(session, Image)
        if seen >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with factory() as session:
        partial = count(session, Image)
    assert partial % 20 == 0, "a kill must leave whole batches only"
    report = run_ingest(root, factory)
    assert report.catalogued + report.already_catalogued == 240
    assert report.already_catalogued == partial
    with factory() as session:
        assert count(session, Image) == 240
        orphans = session.scalar(
            select(func.count()).select_from(Visit).where(~Visit.images.any())
        )
        assert orphans == 0


# -- manifests as spreadsheets save them --------------------------------------------------------


def one_photo_study(root: Path, size: tuple[int, int] = (64, 48)) -> str:
    rel = "P001/2024-01-15/arm.jpg"
    write_jpeg(root / rel, size, seed=1)
    return rel


@pytest.mark.parametrize("delimiter", [";", "\t"], ids=["semicolon", "tab"])
def test_manifest_from_a_european_spreadsheet_is_read(
    tmp_path: Path, factory: sessionmaker[Session], delimiter: str
) -> None:
    root = tmp_path / "study"
    rel = one_photo_study(root)
    # What Excel saves where the comma is the decimal separator: `;` (or tabs), a BOM, CRLF.
    write_manifest(root, [{"path": rel, "patient": "S-042", "visit_date": "2023-05-06",
                           "body_site": "left arm", "severity": "moderate"}],
                   delimiter=delimiter, bom=True, line_end="\r\n")
    report = run_ingest(root, factory)
    assert (report.catalogued, report.rejected, report.warnings) == (1, [], [])
    with factory() as session:
        image = session.scalars(select(Image)).one()
        assert image.body_site == "left arm"
        assert image.visit.patient.subject_code == "S-042"
        assert image.visit.visit_date == dt.date(2023, 5, 6)
        assert session.scalars(select(Label.severity)).all() == [2]


def test_manifest_with_quoted_header_and_trailing_semicolons(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    path.write_bytes(
        b'\xef\xbb\xbf"path";"patient";"severity";\r\n'
        b'"P001/v1/a.jpg";"S-1";"2";\r\n'
        b'"P001/v1/b.jpg";"S-1";"mild";\r\n'
        b';;;\r\n'
    )
    manifest = read_manifest(path)
    assert manifest.warnings == []
    assert manifest.problems == {}
    assert {rel: (row.patient, row.severity, row.line) for rel, row in manifest.rows.items()} == {
        "P001/v1/a.jpg": ("S-1", 2, 2), "P001/v1/b.jpg": ("S-1", 1, 3)}


#: Characters `str.splitlines` breaks at that are text to CSV, and quoted line breaks.
CELL_BREAKS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r", "\r\n",
               "\n"]


def test_manifest_cells_keep_every_line_separator(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    # Each body site hides a line that would name a phantom file if a line break ended the row.
    root = tmp_path / "study"
    lines = ["path,patient,body_site,severity"]
    sites = {}
    for n, brk in enumerate(CELL_BREAKS):
        rel = f"P001/2024-01-15/img{n}.jpg"
        write_jpeg(root / rel, seed=n)
        sites[rel] = f"left arm{brk}P009/2024-01-15/ghost{n}.jpg,P009,trunk,3"
        lines.append(f'{rel},P001,"{sites[rel]}",{n % 4}')
    (root / "manifest.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    report = run_ingest(root, factory)
    assert (report.catalogued, report.rejected) == (len(CELL_BREAKS), [])
    with factory() as session:
        got = dict([tuple(r) for r in session.execute(select(Image.path, Image.body_site))])
        assert got == sites
        labels = dict(session.execute(select(Image.path, Label.severity).join(Label)).all())
        assert labels == {f"P001/2024-01-15/img{n}.jpg": n % 4 for n in range(len(CELL_BREAKS))}


def test_manifest_cell_with_a_nul_rejects_its_photograph(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    # PostgreSQL cannot store NUL: it once failed the whole batch. Other controls are kept.
    root = tmp_path / "study"
    bad, good = "P001/2024-01-15/a.jpg", "P001/2024-01-15/b.jpg"
    write_jpeg(root / bad, seed=1)
    write_jpeg(root / good, seed=2)
    write_manifest(root, [{"path": bad, "body_site": "arm\x00", "severity": "1"},
                          {"path": good, "body_site": "leg\x1b[8m", "severity": "2"},
                          {"path": "P001/\x00/c.jpg"}])
    report = run_ingest(root, factory)
    assert report.catalogued == 1 and report.exit_code == 3
    assert {(r["path"], r["reason"]) for r in report.rejected} == {
        (bad, "manifest.csv line 2: the body_site cell holds a NUL character: fix the cell and "
              "ingest again"),
        ("manifest.csv:4", "manifest.csv line 4: the path cell holds a NUL character: fix the "
                           "cell and ingest again"),
    }
    with factory() as session:
        assert [tuple(r) for r in session.execute(select(Image.path, Image.body_site))] == [
            (good, "leg\x1b[8m")]


@pytest.mark.parametrize(("content", "message"), [
    ("filename\nP001/v1/a.jpg\n", "tried comma, semicolon and tab"),
    ("file;who\nx.jpg;P1\n", "no 'path' column"),
    ("", "is empty"),
    ("path,severity,severity\nx.jpg,1,2\n", "'severity' twice"),
])
def test_manifest_that_cannot_be_read_says_why(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "manifest.csv"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        read_manifest(path)


# -- a bad label or mask costs that part, not the photograph ---------------------------------------


def test_misspelt_severity_rejects_the_label_not_the_photograph(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    root = tmp_path / "study"
    good = one_photo_study(root)
    visit = root / "P001" / "2024-01-15"
    (visit / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    write_jpeg(visit / "undated.jpg", seed=5)
    shutil.copyfile(root / good, visit / "copy.jpg")
    write_manifest(root, [
        {"path": good, "patient": "S-042", "body_site": "left arm", "severity": "moderat"},
        # A file that is rejected as a whole is rejected for that, once, not for its label.
        {"path": "P001/2024-01-15/broken.jpg", "severity": "sever"},
        # A wrong date still rejects the file: it would be catalogued under the wrong visit.
        {"path": "P001/2024-01-15/undated.jpg", "visit_date": "15.01.2024", "severity": "sever"},
        # A copy of a catalogued picture is a duplicate; it has no label of its own to reject.
        {"path": "P001/2024-01-15/copy.jpg", "severity": "sever"},
    ])

    report = run_ingest(root, factory)

    assert report.catalogued == 1
    assert [d["path"] for d in report.duplicates] == ["P001/2024-01-15/copy.jpg"]
    rejected = {r["path"]: r for r in report.rejected}
    assert set(rejected) == {good, "P001/2024-01-15/broken.jpg", "P001/2024-01-15/undated.jpg"}
    label = rejected[good]
    assert label["kind"] == "label"
    assert label["reason"] == (
        "manifest.csv line 2: severity 'moderat' is not a class: use one of 0 (clear), 1 (mild), "
        "2 (moderate), 3 (severe); the photograph is catalogued without a severity label: correct "
        "the row and ingest again to add it"
    )
    assert rejected["P001/2024-01-15/broken.jpg"]["kind"] == "rejected"
    assert "not a date" in rejected["P001/2024-01-15/undated.jpg"]["reason"]
    assert report.exit_code == 3
    with factory() as session:
        image = session.scalars(select(Image)).one()
        assert (image.path, image.body_site) == (good, "left arm")
        assert image.visit.patient.subject_code == "S-042"
        assert count(session, Label) == 0
        stored = dict(session.execute(select(Rejection.path, Rejection.kind)).all())
        assert stored == {good: "label", "P001/2024-01-15/broken.jpg": "rejected",
                          "P001/2024-01-15/undated.jpg": "rejected",
                          "P001/2024-01-15/copy.jpg": "duplicate"}
    # Correcting the severity adds the label to the catalogued image and clears its rejection.
    write_manifest(root, [
        {"path": good, "patient": "S-042", "body_site": "left arm", "severity": "moderate"},
        {"path": "P001/2024-01-15/broken.jpg", "severity": "sever"},
        {"path": "P001/2024-01-15/undated.jpg", "visit_date": "15.01.2024", "severity": "sever"},
    ])
    again = run_ingest(root, factory)
    assert (again.catalogued, again.already_catalogued, again.updated) == (0, 1, 1)
    assert {r["path"] for r in again.rejected} == {"P001/2024-01-15/broken.jpg",
                                                   "P001/2024-01-15/undated.jpg"}
    with factory() as session:
        assert session.scalars(select(Label.severity)).all() == [2]


def _mask_wrong_size(path: Path) -> None:
    write_mask(path, (50, 50))


def _mask_not_png(path: Path) -> None:
    write_jpeg(path, (320, 240))  # a JPEG saved under a .png name


def _mask_truncated(path: Path) -> None:
    write_mask(path, (320, 240))
    path.write_bytes(path.read_bytes()[:-40])


def _mask_empty(path: Path) -> None:
    write_mask(path, (320, 240), box=(0, 0, 0, 0))


@pytest.mark.parametrize(("write_bad_mask", "problem"), [
    (_mask_wrong_size, "mask is 50x50 but its image is 320x240"),
    (_mask_not_png, "mask is not a PNG image"),
    (_mask_truncated, "mask PNG"),
    (_mask_empty, "mask has no lesion pixels"),
], ids=["wrong-size", "not-png", "truncated", "no-lesion"])
def test_bad_mask_rejects_the_mask_not_the_photograph(
    tmp_path: Path, factory: sessionmaker[Session], write_bad_mask: object, problem: str
) -> None:
    root = tmp_path / "study"
    rel = one_photo_study(root, (320, 240))
    mask_rel = "P001/2024-01-15/arm.mask.png"
    write_bad_mask(root / mask_rel)  # type: ignore[operator]
    write_manifest(root, [{"path": rel, "severity": "2", "body_site": "arm"}])

    report = run_ingest(root, factory)

    assert report.catalogued == 1
    [rejection] = report.rejected
    assert (rejection["path"], rejection["kind"]) == (mask_rel, "mask")
    assert problem in rejection["reason"]
    assert f"{rel} is catalogued without this mask" in rejection["reason"]
    assert report.exit_code == 3
    with factory() as session:
        image = session.scalars(select(Image)).one()
        assert (image.path, image.width, image.height, image.body_site) == (rel, 320, 240, "arm")
        assert session.scalars(select(Label.severity)).all() == [2]
        assert count(session, Mask) == 0
        assert session.execute(select(Rejection.path, Rejection.kind, Rejection.reason)).all() == [
            (mask_rel, "mask", rejection["reason"])]
    # The image is catalogued now; the mask, still bad, is rejected again on its own.
    still = run_ingest(root, factory)
    assert (still.already_catalogued, [r["path"] for r in still.rejected]) == (1, [mask_rel])
    # Fixing the mask and ingesting again adds it to the image catalogued before.
    (root / mask_rel).unlink()
    write_mask(root / mask_rel, (320, 240))
    fixed = run_ingest(root, factory)
    assert (fixed.catalogued, fixed.already_catalogued, fixed.updated) == (0, 1, 1)
    assert (fixed.rejected, fixed.exit_code) == ([], 0)
    with factory() as session:
        mask = session.scalars(select(Mask)).one()
        assert (mask.image_id, mask.kind, mask.source_path) == (image.id, "manual", mask_rel)
        assert count(session, Rejection) == 0


def test_manifest_mask_that_is_missing_rejects_the_mask_not_the_photograph(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    root = tmp_path / "study"
    rel = one_photo_study(root)
    write_jpeg(root / "P001" / "2024-01-15" / "leg.jpg", seed=2)
    write_manifest(root, [
        {"path": rel, "mask": "masks/arm.png"},
        {"path": "P001/2024-01-15/leg.jpg", "mask": "../leg.png"},
    ])
    report = run_ingest(root, factory)
    assert report.catalogued == 2
    rejected = {r["path"]: r for r in report.rejected}
    assert {p: r["kind"] for p, r in rejected.items()} == {"masks/arm.png": "mask",
                                                           "../leg.png": "mask"}
    assert rejected["masks/arm.png"]["reason"].startswith(
        "manifest.csv line 2: mask masks/arm.png is not in the study folder")
    assert "must be relative to the study folder" in rejected["../leg.png"]["reason"]
    with factory() as session:
        assert count(session, Image) == 2


def test_a_mixed_batch_is_one_insert_of_images_and_every_id_is_its_own(
    tmp_path: Path, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Photos and DICOM, with and without a camera, flagged and not: rows whose None values differ
    # once made the ORM start a new INSERT at every change (834 for 2,000 images).
    root = tmp_path / "study"
    write_synthetic_study(root, patients=3, visits=2, seed=4, dicom_fraction=0.4)
    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.startswith("INSERT INTO images"):
            statements.append(statement)

    monkeypatch.setattr(write, "ID_LOOKUP_CHUNK", 5)  # the new ids read back in 3 lookups
    engine = factory.kw["bind"]
    event.listen(engine, "before_cursor_execute", seen)
    try:
        report = run_ingest(root, factory, processes=1)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert report.catalogued == 12 and len(statements) == 1
    with factory() as session:
        rows = session.execute(select(Image.id, Image.path, Image.format)).all()
        # each image's label and mask went to its own id
        labelled = dict(session.execute(
            select(Image.path, Label.severity).join(Label, Label.image_id == Image.id)).all())
        masked = set(session.execute(
            select(Image.path).join(Mask, Mask.image_id == Image.id)).scalars())
    manifest = list(csv.DictReader((root / "manifest.csv").open(encoding="utf-8")))
    assert labelled == {row["path"]: int(row["severity"]) for row in manifest}
    assert masked == {row["path"] for row in manifest if row["mask"]} != set()
    files = {p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.suffix in {".jpg", ".png", ".dcm"} and ".mask." not in p.name}
    assert {path for _, path, _ in rows} == files
    assert {fmt for _, _, fmt in rows} >= {"jpeg", "dicom"}


def test_batches_shrink_towards_the_end_and_keep_every_read() -> None:
    reads = [FileRead(rel=str(i)) for i in range(2000)]
    sizes = [len(batch) for batch in _batches(iter(reads), 500, len(reads))]
    assert sum(sizes) == 2000 and sizes[0] == 500 and max(sizes) == 500
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-1] <= MIN_BATCH_FILES
    flat = [read.rel for batch in _batches(iter(reads), 500, len(reads)) for read in batch]
    assert flat == [read.rel for read in reads]
