"""The image-quality gate end to end: ingest stores the camera, the manifest's Fitzpatrick type and
the quality measures; the review queue shows a flag; `run --quality skip` leaves a flagged image
unscored until a reviewer clears its flag. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from PIL import Image as PilImage
from PIL import ImageFilter
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Embedding, Event, Image, Rejection, Run
from eczema_batch.cli import app
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.ingest.manifest import read_manifest
from eczema_batch.ingest.service import IngestReport, ingest_study
from eczema_batch.synth import write_synthetic_study
from tests._model_fixtures import tiny_model_dir  # noqa: F401
from tests.factories import write_manifest
from tests.test_quality import skin_checkerboard

runner = CliRunner()
COLUMNS = ("path", "fitzpatrick", "severity")
SHARP = "P001/2024-01-15/sharp.jpg"
SOFT = "P001/2024-01-15/soft.jpg"
SCAN = "P001/2024-01-15/scan.dcm"
UNTYPED = "P001/2024-01-15/untyped.jpg"


def run_ingest(root: Path, factory: sessionmaker[Session]) -> IngestReport:
    return ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def study(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    visit = root / "P001" / "2024-01-15"
    visit.mkdir(parents=True)
    exif = PilImage.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS R5"
    sharp = PilImage.fromarray(skin_checkerboard())
    sharp.save(root / SHARP, format="JPEG", quality=92, exif=exif)
    sharp.filter(ImageFilter.GaussianBlur(4)).save(root / SOFT, format="JPEG", quality=92)
    sharp.save(root / UNTYPED, format="JPEG", quality=80)
    # A real DICOM: pydicom's CT test file says GE MEDICAL SYSTEMS made it, model RHAPSODE.
    shutil.copyfile(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm",
                    root / SCAN)
    write_manifest(root, [
        {"path": SHARP, "fitzpatrick": "IV"},
        {"path": SOFT, "fitzpatrick": "2"},
        {"path": SCAN, "fitzpatrick": "vi"},
        {"path": UNTYPED, "fitzpatrick": "7", "severity": "1"},
    ], columns=COLUMNS)
    return root


@pytest.mark.parametrize(("cell", "value"), [
    ("1", 1), ("VI", 6), ("iii", 3), (" Type IV ", 4), ("", None)])
def test_fitzpatrick_cells_are_read_as_types(tmp_path: Path, cell: str, value: int | None) -> None:
    write_manifest(tmp_path, [{"path": SHARP, "fitzpatrick": cell}], columns=COLUMNS)
    manifest = read_manifest(tmp_path / "manifest.csv")
    assert manifest.rows[SHARP].fitzpatrick == value and manifest.rows[SHARP].parts == ()


def test_raters_rows_must_agree_on_the_fitzpatrick_type(tmp_path: Path) -> None:
    write_manifest(tmp_path, [
        {"path": SHARP, "fitzpatrick": "II", "rater": "a", "severity": "1"},
        {"path": SHARP, "fitzpatrick": "", "rater": "b", "severity": "2"},
        {"path": SOFT, "fitzpatrick": "II", "rater": "a"},
        {"path": SOFT, "fitzpatrick": "3", "rater": "b"},
    ], columns=(*COLUMNS, "rater"))
    manifest = read_manifest(tmp_path / "manifest.csv")
    assert manifest.rows[SHARP].fitzpatrick == 2
    assert manifest.problems[SOFT] == (
        "manifest.csv line 5: fitzpatrick '3' differs from '2' on line 4 of the same path: the "
        "rows of one image must agree")


def test_a_bad_severity_and_a_bad_type_on_one_row_are_both_said(
    study: Path, factory: sessionmaker[Session]
) -> None:
    write_manifest(study, [{"path": SHARP, "fitzpatrick": "VII", "severity": "sever"}],
                   columns=COLUMNS)
    report = run_ingest(study, factory)
    assert sorted(r["kind"] for r in report.rejected) == ["fitzpatrick", "label"]
    with factory() as session:
        [stored] = session.execute(select(Rejection.path, Rejection.reason)).all()
    assert stored.path == SHARP
    assert "severity 'sever'" in stored.reason and "fitzpatrick 'VII'" in stored.reason


def images(factory: sessionmaker[Session]) -> dict[str, Image]:
    with factory() as session:
        return {image.path: image for image in session.scalars(select(Image))}


def test_ingest_stores_camera_fitzpatrick_and_quality(
    study: Path, factory: sessionmaker[Session]
) -> None:
    report = run_ingest(study, factory)

    # The bad Fitzpatrick cell is refused on its own: the photograph and its label are in.
    assert report.catalogued == 4 and report.quality_flagged == 1
    [refused] = report.rejected
    assert refused == {
        "path": UNTYPED, "kind": "fitzpatrick",
        "reason": "manifest.csv line 5: fitzpatrick '7' is not a Fitzpatrick skin type: use 1 to 6 "
                  "or I to VI; the photograph is catalogued without a Fitzpatrick type: correct "
                  "the row and ingest again to add it"}
    by_path = images(factory)
    assert {p: (i.device, i.fitzpatrick) for p, i in by_path.items()} == {
        SHARP: ("Canon EOS R5", 4), SOFT: (None, 2), SCAN: ("GE MEDICAL SYSTEMS RHAPSODE", 6),
        UNTYPED: (None, None)}
    assert by_path[SHARP].quality_flag is None
    flag = by_path[SOFT].quality_flag
    assert flag is not None and flag.startswith("blurred (Laplacian variance ")
    for image in by_path.values():
        assert image.quality is not None and image.quality["thresholds"]["min_sharpness"] == 3.0
    assert by_path[SOFT].quality["sharpness"] < 3.0 < by_path[SHARP].quality["sharpness"]
    with factory() as session:
        assert session.scalars(select(Rejection.kind)).all() == ["fitzpatrick"]
    code, stdout, err = invoke("status", "--json")
    assert code == 0, err
    assert [c["quality_flagged"] for c in json.loads(stdout)["studies"]] == [1]
    assert "1 photograph(s) the quality gate flagged" in invoke("status")[2]


def test_reingest_updates_fitzpatrick_and_measures_images_from_before_the_gate(
    study: Path, factory: sessionmaker[Session]
) -> None:
    run_ingest(study, factory)
    # As catalogued before revision 0006: no measures, no camera.
    with factory() as session, session.begin():
        session.execute(update(Image).values(quality=None, quality_flag=None, device=None))
    write_manifest(study, [
        {"path": SHARP, "fitzpatrick": "III"}, {"path": UNTYPED, "fitzpatrick": "5"},
    ], columns=COLUMNS)

    again = run_ingest(study, factory)

    assert (again.catalogued, again.already_catalogued, again.updated) == (0, 4, 2)
    assert again.rejected == [] and again.quality_flagged == 1
    by_path = images(factory)
    # A blank cell leaves the stored type alone; a changed one replaces it.
    assert {p: i.fitzpatrick for p, i in by_path.items()} == {
        SHARP: 3, SOFT: 2, SCAN: 6, UNTYPED: 5}
    assert by_path[SHARP].device == "Canon EOS R5"
    assert all(i.quality is not None for i in by_path.values())
    assert (by_path[SOFT].quality_flag or "").startswith("blurred")


def test_the_review_queue_shows_the_flag_until_a_rater_clears_it(
    study: Path, factory: sessionmaker[Session]
) -> None:
    run_ingest(study, factory)
    soft = images(factory)[SOFT]

    # No head, no predictions: the flagged photograph is in the queue all the same.
    code, stdout, err = invoke("review", "list", "--json")
    assert code == 0, err
    [item] = json.loads(stdout)["items"]
    assert item["image_id"] == soft.id
    assert item["reasons"] == [f"quality: {soft.quality_flag}"]
    code, _, err = invoke("review", "list")
    assert code == 0 and "review queue: 1 images" in err and "clear-quality" in err

    code, stdout, err = invoke("review", "clear-quality", str(soft.id), "--by", "rater-07",
                               "--note", "sharp enough where the lesion is", "--json")
    assert code == 0, err
    assert json.loads(stdout)["flag"] == soft.quality_flag
    assert json.loads(invoke("review", "list", "--json")[1])["items"] == []
    with factory() as session:
        cleared = session.get_one(Image, soft.id)
        assert cleared.quality_flag is None and cleared.quality is not None
        assert cleared.quality["cleared"]["by"] == "rater-07"
        event = session.scalars(select(Event).where(Event.kind == "review.quality_cleared")).one()
        assert (event.subject_id, event.detail["flag"]) == (soft.id, soft.quality_flag)
    code, _, err = invoke("review", "clear-quality", str(soft.id), "--by", "rater-07")
    assert code == 2 and "no quality flag to clear" in err


# -- run --quality ------------------------------------------------------------------------------


@pytest.fixture
def synthetic(tmp_path: Path, factory: sessionmaker[Session]) -> int:
    """A small synthetic study, one of its photographs flagged; returns that image's id."""
    root = tmp_path / "synthetic"
    write_synthetic_study(root, patients=3, visits=2, seed=3, size=(64, 48),
                          reference_fraction=0.4)
    assert run_ingest(root, factory).exit_code == 0
    with factory() as session, session.begin():
        session.execute(update(Image).values(quality_flag=None))
        flagged = session.scalars(select(Image.id).order_by(Image.id.desc()).limit(1)).one()
        session.execute(update(Image).where(Image.id == flagged).values(
            quality_flag="underexposed (mean luminance 0.08 < 0.15)"))
    return flagged


def run_cli(model_dir: Path, *extra: str) -> dict[str, object]:
    code, stdout, err = invoke(
        "run", "--model-dir", str(model_dir), "--segmenter-model", "tiny-seggpt",
        "--embedder-model", "tiny-dino", "--device", "cpu", "--json", *extra)
    assert code == 0, err
    payload: dict[str, object] = json.loads(stdout)
    return payload


def crops(factory: sessionmaker[Session]) -> set[int]:
    with factory() as session:
        return set(session.scalars(select(Embedding.image_id).where(Embedding.region == "crop")))


def test_run_skip_leaves_flagged_images_unscored_until_the_flag_is_cleared(
    synthetic: int, factory: sessionmaker[Session], tiny_model_dir: Path  # noqa: F811
) -> None:
    with factory() as session:
        every = set(session.scalars(select(Image.id)))

    payload = run_cli(tiny_model_dir, "--quality", "skip")

    assert payload["quality_skipped"] == {"images": 1, "reasons": {"underexposed": 1}}
    assert crops(factory) == every - {synthetic}
    with factory() as session:
        settings = session.get_one(Run, payload["run"]).settings
        assert settings["quality"] == "skip"
        assert settings["quality_skipped"] == {"images": 1, "reasons": {"underexposed": 1}}
    # Planned again with skip: still left out, nothing else to do.
    again = run_cli(tiny_model_dir, "--quality", "skip")
    assert again["jobs"] == 0 and crops(factory) == every - {synthetic}

    code, _, err = invoke("review", "clear-quality", str(synthetic), "--by", "rater-07")
    assert code == 0, err
    cleared = run_cli(tiny_model_dir, "--quality", "skip")
    assert cleared["quality_skipped"] == {"images": 0, "reasons": {}}
    assert crops(factory) == every


def test_run_flag_scores_flagged_images(
    synthetic: int, factory: sessionmaker[Session], tiny_model_dir: Path  # noqa: F811
) -> None:
    payload = run_cli(tiny_model_dir)
    assert payload["quality"] == "flag" and payload["quality_skipped"]["images"] == 0  # type: ignore[index]
    assert synthetic in crops(factory)
    with factory() as session:
        assert session.get_one(Run, payload["run"]).settings["quality"] == "flag"
    # Scored already: a skip run has nothing to leave out (it counts only what needed work).
    assert run_cli(tiny_model_dir, "--quality", "skip")["quality_skipped"] == {
        "images": 0, "reasons": {}}


def test_a_wrong_quality_mode_is_refused(
    synthetic: int, tiny_model_dir: Path  # noqa: F811
) -> None:
    code, _, err = invoke("run", "--model-dir", str(tiny_model_dir), "--quality", "drop")
    assert code == 2 and "--quality 'drop': use one of flag, skip" in err


def test_a_png_too_large_to_sample_is_recorded_unmeasured_and_not_decoded_again(
    tmp_path: Path, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    from eczema_batch.imaging import photo

    root = tmp_path / "study"
    (root / "P001" / "v1").mkdir(parents=True)
    PilImage.fromarray(skin_checkerboard()).save(root / "P001" / "v1" / "big.png")
    monkeypatch.setattr(photo, "PNG_SAMPLE_MAX_PIXELS", 100)  # this PNG is "too large"
    assert run_ingest(root, factory).exit_code == 0
    with factory() as session:
        quality, flag = session.execute(select(Image.quality, Image.quality_flag)).one()
    assert flag is None and set(quality) == {"method", "not_measured"}
    assert "which ingest would have to decode in full" in quality["not_measured"]
    # Known now, and not a "never measured" row: ingest does not decode it again.
    monkeypatch.setattr(photo, "PNG_SAMPLE_MAX_PIXELS", 10**9)
    assert run_ingest(root, factory).exit_code == 0
    with factory() as session:
        assert session.scalar(select(Image.quality)) == quality
