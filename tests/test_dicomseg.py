"""`eczema-batch export --format dicom-seg`: DICOM Segmentation objects read back and validated.

The SEGs are read with pydicom and highdicom and checked with `dciodvfy` (Debian's dicom3tools),
which must report no errors; without dciodvfy that check skips (fails in CI).
"""

from __future__ import annotations

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
        assert (ds.PatientID, ds.StudyInstanceUID) == (src.PatientID, src.StudyInstanceUID)
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
