"""Subgroups: skin tone (ITA) from pixels, the per-group metrics, and evaluate's section."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from kornia.color import rgb_to_lab
from sklearn.metrics import cohen_kappa_score, f1_score
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Image, Mask
from eczema_batch.cli import app
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.imaging.skintone import (
    fitzpatrick_group,
    ita_category,
    ita_degrees,
    skin_ita,
    srgb_to_lab,
    tone_order,
)
from eczema_batch.ingest.service import ingest_study
from eczema_batch.measuring.skintone import NO_MASK, estimate_skin_tones
from eczema_batch.pipeline.evaluate import expected_calibration_error
from eczema_batch.synth import write_synthetic_study
from eczema_batch.training.subgroups import (
    ImageAttributes,
    quadratic_kappa_from_confusion,
    subgroup_report,
    weighted_ece,
    weighted_f1_from_confusion,
)
from tests._model_fixtures import tiny_model_dir  # noqa: F401

# --- ITA from pixels ------------------------------------------------------------------------------


def test_lab_conversion_is_kornias() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (500, 3), dtype=np.uint8)
    theirs = rgb_to_lab(torch.from_numpy(rgb.T.astype(np.float32) / 255.0)[:, :, None])
    np.testing.assert_allclose(srgb_to_lab(rgb), theirs[:, :, 0].T.numpy(), atol=0.05)
    np.testing.assert_allclose(srgb_to_lab(np.array([255, 255, 255], np.uint8)), [100, 0, 0],
                               atol=0.01)


def test_ita_by_hand_and_its_categories() -> None:
    assert ita_degrees(50.0, 20.0) == 0.0
    assert ita_degrees(70.0, 20.0) == pytest.approx(45.0)
    assert ita_degrees(60.0, 0.0) == 90.0  # defined where b* is 0
    assert [ita_category(v) for v in (60, 55, 45, 30, 20, 0, -31)] == [
        "very light", "very light", "light", "intermediate", "tan", "brown", "dark"]
    assert [fitzpatrick_group(t) for t in range(1, 7)] == ["I-II", "I-II", "III-IV", "III-IV",
                                                          "V-VI", "V-VI"]
    with pytest.raises(ValueError, match="1 to 6"):
        fitzpatrick_group(7)


def _skin(colour: tuple[int, int, int], size: tuple[int, int] = (40, 60)) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (*size, 3)).copy()


def test_ita_is_the_skins_outside_the_lesion_and_its_background() -> None:
    light, deep = (233, 196, 170), (120, 80, 58)
    lab = srgb_to_lab(np.array(light, np.uint8))
    expected = math.degrees(math.atan2(lab[0] - 50, lab[2]))
    plain = skin_ita(_skin(light), None)
    assert plain == pytest.approx(expected, abs=1e-6)
    assert ita_category(plain) in ("very light", "light")
    dark = skin_ita(_skin(deep), None)
    assert dark is not None and dark < 10.0  # brown or dark

    # A red lesion over half the picture: masked, it changes nothing; unmasked, it does.
    picture = _skin(light)
    lesion = np.zeros(picture.shape[:2], bool)
    lesion[:, :30] = True
    picture[lesion] = (200, 40, 40)
    assert skin_ita(picture, lesion) == pytest.approx(plain)
    assert skin_ita(picture, None) != pytest.approx(plain)
    # A blue-grey background band and clipped highlights are not skin.
    picture = _skin(light)
    picture[:12] = (90, 110, 140)
    picture[-3:] = (255, 255, 255)
    assert skin_ita(picture, None) == pytest.approx(plain)
    with pytest.raises(ValueError, match="differ in size"):
        skin_ita(picture, np.zeros((3, 3), bool))
    assert skin_ita(_skin(light), np.ones((40, 60), bool)) is None


# --- metrics on a weighted confusion matrix --------------------------------------------------


def test_confusion_metrics_are_scikit_learns_with_weights() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.integers(0, 4, 60)
        p = np.where(rng.random(60) < 0.6, y, rng.integers(0, 4, 60))
        w = rng.integers(0, 4, 60).astype(float)
        confusion = np.bincount(y * 4 + p, weights=w, minlength=16).reshape(4, 4)
        assert weighted_f1_from_confusion(confusion) == pytest.approx(f1_score(
            y, p, labels=[0, 1, 2, 3], average="weighted", sample_weight=w, zero_division=0))
        assert quadratic_kappa_from_confusion(confusion) == pytest.approx(cohen_kappa_score(
            y, p, labels=[0, 1, 2, 3], weights="quadratic", sample_weight=w))
    # One class on both sides: kappa is undefined, not 0 or 1.
    assert quadratic_kappa_from_confusion(np.diag([5.0, 0, 0, 0])) is None


def test_weighted_ece_with_unit_weights_is_the_reports_and_weights_count() -> None:
    rng = np.random.default_rng(2)
    proba = rng.dirichlet(np.ones(4), 50)
    y = rng.integers(0, 4, 50)
    ones = np.ones(50)
    args = (y, proba.argmax(1), proba.max(1))
    assert weighted_ece(*args, ones) == pytest.approx(expected_calibration_error(y, proba))
    twice = np.concatenate([np.arange(50), np.arange(25)])
    weights = np.where(np.arange(50) < 25, 2.0, 1.0)
    assert weighted_ece(*args, weights) == pytest.approx(
        expected_calibration_error(y[twice], proba[twice]))


def test_subgroup_rows_by_hand() -> None:
    # Patients 1-3 "light" (the head is right), patients 4-5 "deep" (one class too severe).
    image_ids = np.arange(10)
    patients = np.repeat([1, 2, 3, 4, 5], 2)
    labels = np.array([0, 1, 1, 2, 0, 3, 1, 1, 2, 2])
    predicted = labels.copy()
    predicted[6:] += 1
    proba = np.eye(4)[predicted]  # sure of every class: the expected score is the class
    attributes = {i: ImageAttributes("arm" if i % 2 else None, None,
                                     None if i < 6 else 6, 60.0 if i < 6 else None)
                  for i in range(10)}
    report = subgroup_report(image_ids=image_ids, patient_ids=patients, labels=labels,
                             proba=proba, attributes=attributes, segmenter="seggpt",
                             bootstrap=200, seed=0)
    rows = {(r.grouping, r.group): r for r in report.rows}
    assert report.tone_sources == {"manifest": 4, "estimated": 6, "unknown": 0}
    light, deep = rows[("skin tone", "ITA very light")], rows[("skin tone", "Fitzpatrick V-VI")]
    assert (light.source, deep.source) == ("estimated", "manifest")
    assert (light.images, light.patients, deep.images, deep.patients) == (6, 3, 4, 2)
    assert light.weighted_f1.value == 1.0 and light.score_bias.value == pytest.approx(0.0)
    assert deep.weighted_f1.value == 0.0 and deep.score_bias.value == pytest.approx(1.0)
    assert deep.few and deep.score_bias.ci95 is not None
    assert deep.score_bias.ci95[0] > 0  # every resample of these patients is too severe
    # Body site: images without one are a group of their own, listed last.
    assert [r.group for r in report.rows if r.grouping == "body site"] == ["arm", "not recorded"]
    assert [r.group for r in report.rows if r.grouping == "device"] == ["not recorded"]
    one = subgroup_report(image_ids=image_ids[:2], patient_ids=patients[:2], labels=labels[:2],
                          proba=proba[:2], attributes=attributes, segmenter="none",
                          bootstrap=50, seed=0)
    assert one.rows[0].weighted_f1.ci95 is None  # one patient: no interval
    assert type(report).from_dict(json.loads(json.dumps(report.as_dict()))) == report


# --- the catalogue: estimates recorded with their mask, evaluate's section --------------------


@pytest.fixture
def toned_study(tmp_path: Path, factory: sessionmaker[Session]) -> tuple[Path, Path]:
    root, truth = tmp_path / "study", tmp_path / "truth"
    write_synthetic_study(root, patients=12, visits=3, seed=3, size=(96, 72), truth=truth)
    assert ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).exit_code == 0
    return root, truth


def test_estimates_follow_the_mask_and_the_painted_tone(
        toned_study: tuple[Path, Path], factory: sessionmaker[Session]) -> None:
    root, truth = toned_study
    with factory() as session, session.begin():
        ids = session.scalars(select(Image.id)).all()
        first = estimate_skin_tones(session, ids, image_root=None,
                                    max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    assert first.estimated == len(ids) and not first.failed
    with factory() as session:
        rows = session.execute(select(Image.id, Image.path, Image.skin_ita,
                                      Image.skin_ita_mask)).all()
        manual = set(session.scalars(select(Mask.image_id).where(Mask.kind == "manual")))
    assert {iid for iid, _, _, key in rows if key == "manual:"} == manual
    assert all(key == NO_MASK for iid, _, _, key in rows if iid not in manual)
    # The estimate orders patients by the tone the study painted (Fitzpatrick I..VI).
    with (truth / "truth.csv").open() as handle:
        painted = {r["path"]: r["tone"] for r in csv.DictReader(handle)}
    roman = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}
    pairs = np.array([(roman[painted[path]], ita) for _, path, ita, _ in rows])
    ranks = [np.argsort(np.argsort(pairs[:, k])) for k in (0, 1)]
    assert np.corrcoef(*ranks)[0, 1] < -0.7  # deeper types, lower ITA

    with factory() as session, session.begin():
        again = estimate_skin_tones(session, ids, image_root=None,
                                    max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
        assert (again.estimated, again.reused) == (0, len(ids))
        # A predicted mask on an image without a manual one: estimated again, outside it.
        target = next(i for i in ids if i not in manual)
        session.execute(update(Image).where(Image.id == target).values(skin_ita_mask="stale"))
        third = estimate_skin_tones(session, ids, image_root=None,
                                    max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
        assert (third.estimated, third.reused) == (1, len(ids) - 1)


@pytest.mark.one_database
def test_evaluate_reports_subgroups(toned_study: tuple[Path, Path],
                                    factory: sessionmaker[Session],
                                    tiny_model_dir: Path,  # noqa: F811
                                    tmp_path: Path) -> None:
    out = tmp_path / "evaluation.json"
    with factory() as session, session.begin():  # a camera name that is markup
        session.execute(update(Image).where(Image.id == 1).values(device="<b>Cam</b> X"))
    result = CliRunner().invoke(app, [
        "evaluate", "--folds", "3", "--repeats", "1", "--fractions", "1.0", "--bootstrap", "50",
        "--epochs", "5", "--segmenter", "none", "--no-ablation",
        "--model-dir", str(tiny_model_dir), "--embedder-model", "tiny-dino", "-o", str(out),
    ])
    assert result.exit_code == 0, result.stderr
    assert "subgroups (head, segmenter none)" in result.stderr
    section = json.loads(out.read_text())["subgroups"]
    with factory() as session:
        labelled = len(session.scalars(select(Image.id).where(Image.skin_ita.is_not(None))).all())
    assert labelled == sum(section["tone_sources"].values()) == section["tone_sources"]["estimated"]
    for grouping in ("skin tone", "body site", "device"):
        groups = [r for r in section["rows"] if r["grouping"] == grouping]
        assert sum(r["images"] for r in groups) == labelled
    tones = {r["group"] for r in section["rows"] if r["grouping"] == "skin tone"}
    assert tones <= {f"ITA {c}" for c in ("very light", "light", "intermediate", "tan", "brown",
                                          "dark")}
    assert len(tones) >= 3
    assert "<b>Cam</b> X" in {r["group"] for r in section["rows"] if r["grouping"] == "device"}

    # The image export carries each image's subgroups, as evaluate named them.
    result = CliRunner().invoke(app, ["export", "--level", "image", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    exported = {r["image_id"]: r for r in json.loads(result.stdout)}
    assert exported[1]["device"] == "<b>Cam</b> X"
    estimated = [r for r in exported.values() if r["skin_ita"] is not None]
    assert len(estimated) == labelled
    assert all(r["skin_tone_source"] == "estimated" and r["skin_tone"] in tones
               for r in estimated)

    # The HTML report shows the saved evaluation's subgroup table, as text.
    html = tmp_path / "html"
    result = CliRunner().invoke(app, ["report", "--html", str(html), "--evaluation", str(out)])
    assert result.exit_code == 0, result.stderr
    index = (html / "index.html").read_text()
    assert "<h2>Subgroups (head, segmenter none)</h2>" in index and "tiny-dino" in index
    assert "Pooled out-of-fold predictions; 95% intervals" in index
    assert "&lt;b&gt;Cam&lt;/b&gt; X" in index and "<b>Cam</b>" not in index
    bad = tmp_path / "not-an-evaluation.json"
    bad.write_text('{"settings": {}}')
    for args, message in ((["--html", str(html), "--evaluation", str(bad)],
                           "not an evaluation report"),
                          (["--evaluation", str(out)], "give --html FOLDER"),
                          (["--html", str(html), "--evaluation", str(tmp_path / "nope.json")],
                           "no such file")):
        result = CliRunner().invoke(app, ["report", *args])
        assert result.exit_code == 2 and message in result.stderr, result.stderr
    result = CliRunner().invoke(app, [
        "evaluate", "--folds", "3", "--repeats", "1", "--fractions", "1.0", "--bootstrap", "50",
        "--epochs", "5", "--segmenter", "none", "--no-ablation", "--no-subgroups",
        "--model-dir", str(tiny_model_dir), "--embedder-model", "tiny-dino", "-o", str(out),
    ])
    assert result.exit_code == 0, result.stderr
    assert "subgroups" not in json.loads(out.read_text())


def test_skin_tone_command_estimates_every_image_and_counts_the_groups(
        toned_study: tuple[Path, Path], factory: sessionmaker[Session]) -> None:
    with factory() as session, session.begin():
        ids = session.scalars(select(Image.id).order_by(Image.id)).all()
        session.execute(update(Image).where(Image.id == ids[0]).values(fitzpatrick=5))
    result = CliRunner().invoke(app, ["skin-tone", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["estimated"], doc["unchanged"], doc["failed"]) == (len(ids), 0, {})
    groups = {(g["group"], g["source"]): g["images"] for g in doc["groups"]}
    assert groups.pop(("Fitzpatrick V-VI", "manifest")) == 1
    assert sum(groups.values()) == len(ids) - 1
    assert all(source == "estimated" and group.startswith("ITA ") for group, source in groups)
    # Light to dark, the manifest's types first.
    order = [g["group"] for g in doc["groups"]]
    assert order[0] == "Fitzpatrick V-VI" and order == sorted(order, key=tone_order)
    result = CliRunner().invoke(app, ["skin-tone"])
    assert result.exit_code == 0 and f"estimated 0, unchanged {len(ids)}" in result.stderr
    result = CliRunner().invoke(app, ["skin-tone", "--study", "nope"])
    assert result.exit_code == 2 and "no study named 'nope'" in result.stderr


def test_a_study_whose_manifest_types_some_patients_mixes_both_sources(
        tmp_path: Path, factory: sessionmaker[Session]) -> None:
    root, truth = tmp_path / "study", tmp_path / "truth"
    result = CliRunner().invoke(app, [
        "synth", str(root), "--patients", "6", "--visits", "2", "--images-per-visit", "1",
        "--width", "96", "--height", "72", "--truth", str(truth), "--fitzpatrick-share", "0.5"])
    assert result.exit_code == 0, result.stderr
    with (root / "manifest.csv").open() as handle:
        manifest = list(csv.DictReader(handle))
    with (truth / "truth.csv").open() as handle:
        painted = {r["path"]: r["tone"] for r in csv.DictReader(handle)}
    typed = [r for r in manifest if r["fitzpatrick"]]
    assert len({r["patient"] for r in typed}) == 3 and len(typed) == 6
    assert all(r["fitzpatrick"] == painted[r["path"]] for r in typed)  # the painted type
    assert ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS
                        ).exit_code == 0
    result = CliRunner().invoke(app, ["skin-tone", "--json"])
    assert result.exit_code == 0, result.stderr
    groups = json.loads(result.stdout)["groups"]
    by_source = {s: sum(g["images"] for g in groups if g["source"] == s)
                 for s in ("manifest", "estimated")}
    assert by_source == {"manifest": 6, "estimated": 6}
    assert [g["source"] for g in groups] == sorted((g["source"] for g in groups),
                                                   key=lambda s: s != "manifest")
