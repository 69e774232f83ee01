"""`eczema-batch export --format dicom-seg`: DICOM Segmentation objects read back and validated.

The SEGs are read with pydicom and highdicom and checked with `dciodvfy` (Debian's dicom3tools),
which must report no errors; without dciodvfy that check skips (fails in CI).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch import __version__
from eczema_batch.catalogue.models import Image
from eczema_batch.cli import app
from eczema_batch.ingest.service import ingest_study
from eczema_batch.synth import write_synthetic_study
from tests.conftest import service_missing
from tests.factories import write_dicom
from tests.report_factories import make_head, make_prediction

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture
def dicom_study(factory: sessionmaker[Session], tmp_path: Path) -> dict[str, np.ndarray]:
    """Three DICOM photographs (uncompressed and JPEG), two with a predicted mask, one flagged."""
    root = tmp_path / "study"
    write_synthetic_study(root, patients=1, visits=3, images_per_visit=1, dicom_fraction=1.0,
                          size=(64, 48))
    ingest_study(root, factory=factory, max_pixels=10**8, processes=1)
    masks: dict[str, np.ndarray] = {}
    with factory() as s, s.begin():
        head = make_head(s)
        images = s.scalars(select(Image).order_by(Image.id)).all()
        assert [i.format for i in images] == ["dicom"] * 3
        for n, image in enumerate(images):
            mask = np.zeros((image.height, image.width), dtype=bool)
            mask[5 + n: 30, 10: 40 + n] = True
            flag = "SegGPT found no lesion: the whole image was used" if n == 2 else None
            make_prediction(s, image, head, [0.1, 0.6, 0.2, 0.1], mask=mask, mask_flag=flag)
            assert image.sop_uid is not None
            masks[image.sop_uid] = mask
    return masks


def test_seg_objects_read_back(dicom_study: dict[str, np.ndarray], tmp_path: Path) -> None:
    out = tmp_path / "seg"
    result = CliRunner().invoke(app, ["export", "--format", "dicom-seg", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "wrote 2 DICOM SEG objects" in result.stderr
    assert "mask flagged: SegGPT found no lesion" in result.stderr
    files = sorted(out.rglob("*.seg.dcm"))
    assert len(files) == 2
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == SEGMENTATION_STORAGE
        source_uid = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        source_uid = source_uid.ReferencedSOPInstanceUID
        assert path.name == f"{source_uid}.seg.dcm"
        segment = ds.SegmentSequence[0]
        assert segment.SegmentAlgorithmName == "eczema-batch"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("eczema-batch",
                                                                        __version__)
        assert "tiny-seggpt@" in algorithm.AlgorithmParameters
        seg = hd.seg.segread(path)
        pixels = seg.get_pixels_by_source_instance([source_uid], segment_numbers=[1])
        assert np.array_equal(pixels[0, :, :, 0].astype(bool), dicom_study[source_uid])
        source = next(p for p in (tmp_path / "study").rglob("*.dcm")
                      if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == source_uid)
        src = pydicom.dcmread(source, stop_before_pixels=True)
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
        # The source's subject code is in PatientID: a SEG carries none of the patient's tags.
        assert src.PatientID and ds.PatientID == "" and "ClinicalTrialSubjectID" not in ds
    again = CliRunner().invoke(app, ["export", "--format", "dicom-seg", "-o", str(out)])
    assert again.exit_code == 0
    assert sorted(out.rglob("*.seg.dcm")) == files  # same UIDs, same names: nothing new


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_dciodvfy_finds_no_errors(dicom_study: dict[str, np.ndarray], tmp_path: Path) -> None:
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        service_missing("dciodvfy is not installed (Debian: apt-get install dicom3tools)")
    assert dciodvfy is not None
    out = tmp_path / "seg"
    assert CliRunner().invoke(app, ["export", "--format", "dicom-seg", "-o", str(out)]
                              ).exit_code == 0
    for path in sorted(out.rglob("*.seg.dcm")):
        done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        report = done.stdout + done.stderr
        assert "Segmentation" in report
        assert [line for line in report.splitlines() if line.startswith("Error")] == [], report


def test_dicom_seg_needs_a_folder(dicom_study: dict[str, np.ndarray]) -> None:
    result = CliRunner().invoke(app, ["export", "--format", "dicom-seg"])
    assert result.exit_code == 2 and "-o DIR" in result.stderr


# --- identifying data ---------------------------------------------------------------------------

#: What a hospital's photograph says about its patient; none of it may reach a SEG by default.
IDENTIFYING = {
    "PatientName": "Doe^Jane", "PatientID": "MRN-0042", "PatientBirthDate": "19800101",
    "PatientSex": "F", "ReferringPhysicianName": "Who^Doctor", "AccessionNumber": "ACC-777",
    "StudyID": "STUDY-31", "StudyDate": "20240115", "StudyTime": "093000",
    "InstitutionName": "St Elsewhere Hospital", "StationName": "DERM-CAM-3",
    "OtherPatientIDs": "NHS-999", "PatientAge": "044Y", "PatientComments": "allergic to nuts",
    # the Clinical Trial Subject module, whole (highdicom copies it whole when asked to)
    "ClinicalTrialSponsorName": "Derm Sponsor", "ClinicalTrialProtocolID": "DERM-01",
    "ClinicalTrialProtocolName": "Eczema photos", "ClinicalTrialSiteID": "SITE-9",
    "ClinicalTrialSiteName": "Elsewhere Dermatology", "ClinicalTrialSubjectID": "S-017",
}
MALFORMED = {"PatientBirthDate": "1980-01-01", "PatientName": "Doe^Jane\\Smith^John"}


def _ingest_with_masks(root: Path, factory: sessionmaker[Session]) -> dict[str, int]:
    """Catalogue `root`, give every DICOM image a predicted mask; file name -> image id."""
    ingest_study(root, factory=factory, max_pixels=10**8, processes=1)
    ids: dict[str, int] = {}
    with factory() as s, s.begin():
        head = make_head(s)
        for image in s.scalars(select(Image).order_by(Image.id)):
            mask = np.zeros((image.height, image.width), dtype=bool)
            mask[5:30, 10:40] = True
            make_prediction(s, image, head, [0.1, 0.6, 0.2, 0.1], mask=mask)
            ids[Path(image.path).name] = image.id
    return ids


@pytest.fixture
def hospital_study(factory: sessionmaker[Session], tmp_path: Path) -> dict[str, int]:
    """Photographs as a hospital's PACS exports them, one with malformed patient tags, one with an
    odd SOP Instance UID."""
    root = tmp_path / "study"
    visit = root / "S-017" / "2024-01-15"
    write_dicom(visit / "full.dcm", seed=1, **IDENTIFYING)
    write_dicom(visit / "malformed.dcm", seed=2, **{**IDENTIFYING, **MALFORMED})
    write_dicom(visit / "odd-uid.dcm", seed=3, **IDENTIFYING, SOPInstanceUID="1.2.3/../../x")
    return _ingest_with_masks(root, factory)


def _values_in(path: Path) -> list[str]:
    data = path.read_bytes()
    values = {**IDENTIFYING, **MALFORMED}
    return [v for k, v in values.items() if k not in ("ClinicalTrialSubjectID", "PatientSex")
            and v.split("^")[0].encode() in data]  # PatientSex "F": one letter, found anywhere


def test_seg_carries_only_the_uids_that_reference_its_source(
    hospital_study: dict[str, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")  # what --verbose would print
    out = tmp_path / "seg"
    result = CliRunner().invoke(app, ["-v", "export", "--format", "dicom-seg", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    files = sorted(out.rglob("*.seg.dcm"))
    assert len(files) == 2  # full.dcm and malformed.dcm: its tags are never read
    for path in files:
        assert _values_in(path) == []
        ds = pydicom.dcmread(path)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "ReferringPhysicianName", "AccessionNumber", "StudyID", "StudyDate"):
            assert keyword in ds and ds[keyword].value in ("", None), keyword  # type 2: empty
        for keyword in ("InstitutionName", "StationName", "OtherPatientIDs", "PatientAge",
                        "PatientComments", "ClinicalTrialSubjectID", "ClinicalTrialSiteName"):
            assert keyword not in ds
        assert not any("InstitutionName" in item for item in
                       ds.get("ContributingEquipmentSequence", []))
    odd = hospital_study["odd-uid.dcm"]
    assert f"image {odd}: the source's SOPInstanceUID is not a valid DICOM UID" in result.stderr
    assert "1.2.3/" not in result.stderr and "x.seg.dcm" not in str(files)
    for keyword, value in {**IDENTIFYING, **MALFORMED}.items():
        # PatientSex "F" is in every other word; the subject code names the output folder
        if keyword not in ("PatientSex", "ClinicalTrialSubjectID"):
            assert value.split("^")[0] not in result.stderr + result.stdout + caplog.text


def test_keep_patient_tags_round_trips_them_and_skips_a_malformed_source_quietly(
    hospital_study: dict[str, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")  # what --verbose would print
    out = tmp_path / "seg"
    result = CliRunner().invoke(app, ["-v", "export", "--format", "dicom-seg", "-o", str(out),
                                      "--keep-patient-tags"])
    assert result.exit_code == 0, result.stderr
    [path] = sorted(out.rglob("*.seg.dcm"))
    ds = pydicom.dcmread(path)
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber) == (
        "Doe^Jane", "MRN-0042", "19800101", "ACC-777")
    malformed = hospital_study["malformed.dcm"]
    assert re.search(rf"image {malformed}: the source's Patient(BirthDate|Name) "
                     r"(is not a valid DICOM value|has several values)", result.stderr)
    assert "1980-01-01" not in result.stderr and "Smith" not in result.stderr
    assert "Traceback" not in result.stderr
    assert "1980-01-01" not in caplog.text and "Smith" not in caplog.text
    code = CliRunner().invoke(app, ["export", "--keep-patient-tags"]).exit_code
    assert code == 2  # rows never carry patient tags: the option is refused, not ignored


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("keep", [False, True])
def test_dciodvfy_finds_no_errors_in_a_hospital_source_seg(
    hospital_study: dict[str, int], tmp_path: Path, keep: bool
) -> None:
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        service_missing("dciodvfy is not installed (Debian: apt-get install dicom3tools)")
    assert dciodvfy is not None
    out = tmp_path / "seg"
    args = ["export", "--format", "dicom-seg", "-o", str(out)]
    assert CliRunner().invoke(app, args + (["--keep-patient-tags"] if keep else [])
                              ).exit_code == 0
    files = sorted(out.rglob("*.seg.dcm"))
    assert files
    for path in files:
        done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        report = done.stdout + done.stderr
        assert "Segmentation" in report
        assert [line for line in report.splitlines() if line.startswith("Error")] == [], report
