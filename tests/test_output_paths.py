"""Nothing is written outside the output folder, or through a link someone placed in it.

Every file eczema-batch writes goes through `eczema_batch.output`: `export -o`, `report --html`
(pages, plots, thumbnails), `export --format dicom-seg`, `evaluate -o/--predictions`. The
"victim" files below stand for what a pre-placed link would point at (`/etc/passwd`, a
colleague's results): after every command they must hold what they held before.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Image
from eczema_batch.cli import app
from eczema_batch.errors import OutputPathError
from eczema_batch.imaging.dicom import is_uid
from eczema_batch.ingest.service import ingest_study
from eczema_batch.output import OutputFolder, output_file, safe_name
from eczema_batch.synth import write_synthetic_study
from tests.factories import write_jpeg
from tests.report_factories import (
    make_head,
    make_image,
    make_patient,
    make_prediction,
    make_study,
    make_visit,
)

SECRET = "root:x:0:0:root:/root:/bin/bash\n"


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "elsewhere" / "passwd"
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_text(SECRET)
    return victim


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- the module ------------------------------------------------------------------------------------


def test_a_link_at_a_files_name_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").symlink_to(victim)
    with OutputFolder(out) as folder:
        folder.write_text("a.txt", "new")
    assert victim.read_text() == SECRET
    assert not (out / "a.txt").is_symlink() and (out / "a.txt").read_text() == "new"
    assert _files(out) == ["a.txt"]  # no temporary file left


@pytest.mark.parametrize("where", ["folder", "subfolder", "dangling"])
def test_a_link_where_a_folder_should_be_is_refused(tmp_path: Path, where: str) -> None:
    elsewhere = _victim(tmp_path).parent
    out = tmp_path / "out"
    if where == "folder":
        out.symlink_to(elsewhere)
    elif where == "dangling":
        out.symlink_to(tmp_path / "not-yet")
    else:
        out.mkdir()
        (out / "sub").symlink_to(elsewhere)
    with pytest.raises(OutputPathError, match="symbolic link"):
        with OutputFolder(out) as folder, folder.folder("sub") as sub:
            sub.write_text("x.txt", "x")
    assert _files(elsewhere) == ["passwd"] and not (tmp_path / "not-yet").exists()


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path: Path) -> None:
    target = tmp_path / "visits.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), output_file(target) as out:
        out.write("half a file")
        raise RuntimeError("the export failed")
    assert target.read_text() == "old\n" and _files(tmp_path) == ["visits.csv"]


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "", "x\0y"])
def test_only_plain_names_are_written(tmp_path: Path, name: str) -> None:
    with OutputFolder(tmp_path / "out") as folder:
        with pytest.raises(OutputPathError):
            folder.write_text(name, "x")
        with pytest.raises(OutputPathError):
            folder.folder(name)
    assert _files(tmp_path) == ["out"]


def test_names_built_from_data_are_plain_and_distinct() -> None:
    hostile = ["..", ".", "../../../../tmp/x", "/etc/passwd", "P 1", "P_1", "P/1", "-rf", ".hidden",
               "a\0b", "\x1b]8;;http://x\x07", "", "x" * 300, "ü", "C:\\Windows", "con"]
    names = [safe_name(h) for h in hostile]
    for name in names:
        assert name and len(name) <= 100 and name[0] not in ".-" and "/" not in name
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name), name
    assert len(set(names)) == len(names)
    assert safe_name("S001") == "S001" and safe_name("trial-2024.a") == "trial-2024.a"


@pytest.mark.parametrize(("value", "valid"), [
    ("1.2.840.10008.5.1.4.1.1.66.4", True), ("0.1", True),
    # A leading zero breaks the standard's letter but is common in real files, and harmless in a
    # file name: it is let through (imaging.dicom).
    ("1.2.03", True),
    ("../../../../tmp/x", False), ("1.2.3/../4", False), ("1..2", False), ("1.2.", False),
    ("", False), ("1" * 65, False), ("1.2\0", False), ("١.٢", False),
])
def test_only_dicom_uids_name_seg_files(value: str, valid: bool) -> None:
    assert is_uid(value) is valid


# -- the commands ----------------------------------------------------------------------------------


@pytest.fixture
def scored(factory: sessionmaker[Session], tmp_path: Path) -> None:
    """One patient with a photograph on disk and a prediction, for `export` and `report --html`."""
    photo = write_jpeg(tmp_path / "study" / "P1" / "v1" / "a.jpg", (64, 48))
    with factory() as s, s.begin():
        head = make_head(s)
        visit = make_visit(s, make_patient(s, make_study(s, root=str(tmp_path / "study")), "P1"),
                           dt.date(2024, 1, 1))
        image = make_image(s, visit, path="P1/v1/a.jpg", file=photo)
        make_prediction(s, image, head, [0.1, 0.2, 0.3, 0.4])
    assert photo.exists()


@pytest.mark.parametrize("name", ["visits.csv", "visits.csv.partial"])
def test_export_writes_through_no_preplaced_link(scored: None, tmp_path: Path, name: str) -> None:
    # `visits.csv.partial` was the fixed name of the temporary file an export wrote first.
    victim = _victim(tmp_path)
    (tmp_path / name).symlink_to(victim)
    out = tmp_path / "visits.csv"
    code, _, err = _invoke("export", "-o", str(out))
    assert code == 0, err
    assert victim.read_text() == SECRET
    assert not out.is_symlink() and out.read_text().startswith("study,patient,visit")


def test_html_report_writes_no_file_through_a_link(scored: None, tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    out = tmp_path / "report"
    out.mkdir()
    (out / "index.html").symlink_to(victim)
    (out / "cohort.png").symlink_to(tmp_path / "elsewhere" / "new-file")
    code, _, err = _invoke("report", "--html", str(out))
    assert code == 0, err
    assert victim.read_text() == SECRET and _files(tmp_path / "elsewhere") == ["passwd"]
    assert not (out / "index.html").is_symlink() and "<html" in (out / "index.html").read_text()
    assert (out / "thumbs").is_dir() and len(list((out / "thumbs").iterdir())) == 1


@pytest.mark.parametrize("link", [".", "patients", "thumbs"])
def test_html_report_refuses_a_link_for_a_folder(scored: None, tmp_path: Path, link: str) -> None:
    elsewhere = _victim(tmp_path).parent
    out = tmp_path / "report"
    if link == ".":
        out.symlink_to(elsewhere, target_is_directory=True)
    else:
        out.mkdir()
        (out / link).symlink_to(elsewhere, target_is_directory=True)
    code, _, err = _invoke("report", "--html", str(out))
    assert code == 2
    assert "is a symbolic link" in err and "never writes through one" in err
    assert _files(elsewhere) == ["passwd"]


def test_dicom_seg_uid_cannot_lead_out_of_the_folder(factory: sessionmaker[Session],
                                                     tmp_path: Path) -> None:
    root = tmp_path / "study"
    write_synthetic_study(root, patients=1, visits=2, images_per_visit=1, dicom_fraction=1.0,
                          size=(64, 48))
    ingest_study(root, factory=factory, max_pixels=10**8, processes=1)
    hostile = "../../../escaped"
    with factory() as s, s.begin():
        head = make_head(s)
        images = s.scalars(select(Image).order_by(Image.id)).all()
        for image in images:
            mask = np.zeros((image.height, image.width), dtype=bool)
            mask[5:30, 10:40] = True
            make_prediction(s, image, head, [0.1, 0.6, 0.2, 0.1], mask=mask)
        # A catalogue and a file that agree on a SOP Instance UID that is a path (as an older
        # ingest, or an edited file, could leave them).
        bad = images[0]
        path = root / bad.path
        ds = pydicom.dcmread(path)
        with pytest.warns(UserWarning, match="Invalid value for VR UI"):
            ds.SOPInstanceUID = hostile
            ds.file_meta.MediaStorageSOPInstanceUID = hostile
            ds.save_as(path)
        content = path.read_bytes()
        s.execute(update(Image).where(Image.id == bad.id).values(
            sop_uid=hostile, sha256=hashlib.sha256(content).hexdigest(), size_bytes=len(content)))
    out = tmp_path / "a" / "b" / "seg"
    code, _, err = _invoke("export", "--format", "dicom-seg", "-o", str(out))
    assert code == 0, err
    assert "wrote 1 DICOM SEG objects" in err
    assert f"image {bad.id}: the source's SOPInstanceUID is not a valid DICOM UID" in err
    written = [p for p in tmp_path.rglob("*") if p.name.endswith(".seg.dcm")]
    assert len(written) == 1 and written[0].is_relative_to(out)


def test_dicom_seg_folders_from_codes_stay_inside(factory: sessionmaker[Session],
                                                  tmp_path: Path) -> None:
    root = tmp_path / "study"
    write_synthetic_study(root, patients=1, visits=1, images_per_visit=1, dicom_fraction=1.0,
                          size=(64, 48))
    ingest_study(root, factory=factory, max_pixels=10**8, processes=1, study_name="..")
    with factory() as s, s.begin():
        head = make_head(s)
        image = s.scalars(select(Image)).one()
        image.visit.patient.subject_code = "../.."
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[5:30, 10:40] = True
        make_prediction(s, image, head, [0.1, 0.6, 0.2, 0.1], mask=mask)
    out = tmp_path / "seg"
    code, _, err = _invoke("export", "--format", "dicom-seg", "-o", str(out))
    assert code == 0, err
    written = [p for p in tmp_path.rglob("*") if p.name.endswith(".seg.dcm")]
    assert len(written) == 1 and written[0].parent.parent.parent == out
    assert (written[0].parent.parent.name, written[0].parent.name) == (safe_name(".."),
                                                                       safe_name("../.."))
