"""Several raters: the manifest's rater column, the reference-label rules, the blinded pass and
the agreement statistics (hand-computed cases, checked against the libraries)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import krippendorff
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.labels import (
    REVIEW_REPEAT,
    ImageRatings,
    RatedLabel,
    ReferenceRule,
    parse_reference_rule,
    read_ratings,
    reference_label,
)
from eczema_batch.catalogue.models import Label, Rejection
from eczema_batch.cli import app
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.errors import UsageError
from eczema_batch.ingest.manifest import read_manifest
from eczema_batch.ingest.service import ingest_study
from eczema_batch.report.blinded import REPEAT_GAP
from eczema_batch.training.agreement import (
    agreement_report,
    evaluation_agreement,
    icc_2_1,
    ordinal_alpha,
    quadratic_kappa,
)
from eczema_batch.training.data import labelled_images
from tests._model_fixtures import tiny_model_dir  # noqa: F401
from tests.factories import write_jpeg, write_manifest
from tests.report_factories import (
    make_head,
    make_image,
    make_patient,
    make_prediction,
    make_study,
    make_visit,
)

#: A 2-rater, 6-image case (3 patients, two images each).
RATER_A = [0, 1, 2, 3, 1, 0]
RATER_B = [0, 1, 3, 3, 2, 1]


# --- the statistics -----------------------------------------------------------------------------


def test_quadratic_kappa_by_hand_and_by_sklearn() -> None:
    # Weights (i-j)^2/9. Observed: three images one class apart, 3 * 1/9 over 6 images = 18/324.
    # Expected: marginals A (2,2,1,1)/6, B (1,2,1,2)/6; sum_ij a_i b_j (i-j)^2 = 94, over 36 * 9.
    by_hand = 1 - 18 / 94
    assert quadratic_kappa(RATER_A, RATER_B, 4) == pytest.approx(by_hand)
    assert by_hand == pytest.approx(cohen_kappa_score(RATER_A, RATER_B, weights="quadratic"))
    assert quadratic_kappa([1, 1], [1, 1], 4) is None  # no variation: undefined, not NaN
    assert quadratic_kappa([], [], 4) is None


def test_ordinal_alpha_by_hand_and_by_the_package() -> None:
    # Two raters, three images: (0,0), (1,1), (0,1). n0 = n1 = 3 of 6 pairable values; the
    # ordinal distance of 0 and 1 is (n0 + n1 - (n0 + n1)/2)^2 = 9. D_o = (9 + 9)/6 = 3,
    # D_e = 2 * 3 * 3 * 9 / (6 * 5) = 5.4: alpha = 1 - 3/5.4 = 4/9.
    tiny = np.array([[0, 1, 0], [0, 1, 1]], dtype=float)
    assert ordinal_alpha(tiny, 4) == pytest.approx(4 / 9)
    data = np.array([RATER_A, RATER_B], dtype=float)
    data[1, 5] = np.nan  # a gap: that image has one rating, it is not pairable
    expected = krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal",
                                  value_domain=[0, 1, 2, 3])
    assert ordinal_alpha(data, 4) == pytest.approx(expected)
    assert ordinal_alpha(np.array([[0.0, np.nan], [np.nan, 1.0]]), 4) is None


def test_icc_2_1_reproduces_shrout_and_fleiss() -> None:
    # Shrout & Fleiss (1979), Table 2: 6 targets, 4 judges; ICC(2,1) = .29 (pingouin's
    # intraclass_corr gives 0.290 as "ICC2" on the same data).
    table = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9],
                      [6, 2, 4, 7]], dtype=float)
    assert icc_2_1(table) == pytest.approx(0.2898, abs=1e-4)
    assert icc_2_1(table[:1]) is None


def _ratings() -> list[ImageRatings]:
    return [ImageRatings(i, i // 2, {"a": a, "b": b}, {}) for i, (a, b) in
            enumerate(zip(RATER_A, RATER_B, strict=True))]


def test_agreement_report_pairs_alpha_icc_intra_and_model() -> None:
    ratings = _ratings()
    ratings[0] = ImageRatings(0, 0, {"a": 0, "b": 0}, {"a": 1})
    ratings[1] = ImageRatings(1, 0, {"a": 1, "b": 1}, {"a": 1})
    predictions = [(i, i // 2, k) for i, k in enumerate([0, 1, 2, 2, 1, 0])] * 2  # two repeats
    report = agreement_report(ratings, predictions=predictions, bootstrap=200, seed=3)
    pair = report.pairs[0]
    assert (pair.a, pair.b, pair.kappa.images, pair.kappa.patients) == ("a", "b", 6, 3)
    assert pair.kappa.value == pytest.approx(1 - 18 / 94)
    assert pair.kappa.ci95 is not None and pair.kappa.ci95[0] <= pair.kappa.ci95[1]
    assert report.alpha.value == pytest.approx(krippendorff.alpha(
        reliability_data=np.array([RATER_A, RATER_B], float), level_of_measurement="ordinal",
        value_domain=[0, 1, 2, 3]))
    assert report.icc.images == 6 and report.icc.raters == 2
    assert [(p.a, p.kappa.images) for p in report.intra] == [("a", 2)]
    model = {p.b: p for p in report.model}
    assert model["a"].kappa.value == pytest.approx(
        cohen_kappa_score([0, 1, 2, 2, 1, 0] * 2, RATER_A * 2, weights="quadratic"))
    assert model["a"].kappa.images == 6
    again = agreement_report(ratings, predictions=predictions, bootstrap=200, seed=3)
    assert again == report  # seeded
    assert type(report).from_dict(json.loads(json.dumps(report.as_dict()))) == report


# --- the reference rule -------------------------------------------------------------------------


def _labels(*rows: tuple[str, str | None, int]) -> list[RatedLabel]:
    return [RatedLabel(1, k, source, rater, n) for n, (source, rater, k) in enumerate(rows)]


def test_reference_rules() -> None:
    labels = _labels(("manifest", "dr-a", 1), ("manifest", "dr-b", 3), ("review", "dr-c", 1),
                     ("review", "dr-b", 2), (REVIEW_REPEAT, "dr-a", 0))
    newest, majority = parse_reference_rule("newest"), parse_reference_rule("majority")
    assert reference_label(labels, newest) == 2  # the repeat never counts
    # Votes (own labels): dr-a 1, dr-b 2 (their newest), dr-c 1: class 1.
    assert reference_label(labels, majority) == 1
    tie = _labels(("manifest", "dr-a", 1), ("manifest", "dr-b", 3))
    assert reference_label(tie, majority) == 3  # a tie goes to the more severe class
    assert reference_label(labels, parse_reference_rule("adjudicator:dr-c")) == 1
    assert reference_label(labels, parse_reference_rule("adjudicator:dr-z")) == 2
    assert reference_label(labels, parse_reference_rule("adjudicator:dr-z:majority")) == 1
    anonymous = _labels(("manifest", None, 2), ("review", "dr-a", 0))
    assert reference_label(anonymous, majority) == 2  # manifest 2, dr-a 0: tie, more severe
    assert parse_reference_rule("adjudicator:x:y") == ReferenceRule("adjudicator", "x:y")
    assert str(parse_reference_rule(" adjudicator:dr-a:majority ")) == "adjudicator:dr-a:majority"
    for bad in ("oldest", "adjudicator:", ""):
        with pytest.raises(UsageError, match="newest, majority, adjudicator:NAME"):
            parse_reference_rule(bad)


# --- the manifest's rater column ----------------------------------------------------------------

COLUMNS = ("path", "patient", "severity", "rater")


def _study(tmp_path: Path, rows: list[dict[str, str]]) -> Path:
    root = tmp_path / "study"
    for n, rel in enumerate(("P1/2024-01-01/a.jpg", "P1/2024-01-01/b.jpg", "P2/2024-01-02/c.jpg")):
        write_jpeg(root / rel, seed=n)
    write_manifest(root, rows, columns=COLUMNS)
    return root


def test_manifest_rater_column_rows_per_rater(tmp_path: Path) -> None:
    root = _study(tmp_path, [
        {"path": "P1/2024-01-01/a.jpg", "severity": "1", "rater": "dr-a"},
        {"path": "P1/2024-01-01/a.jpg", "severity": "2", "rater": "dr-b", "patient": "P1"},
        {"path": "P1/2024-01-01/b.jpg", "severity": "0", "rater": "dr-a"},
        {"path": "P1/2024-01-01/b.jpg", "severity": "0", "rater": "dr-a"},
        {"path": "P2/2024-01-02/c.jpg", "severity": "3", "patient": "P2"},
        {"path": "P2/2024-01-02/c.jpg", "severity": "3", "patient": "P9", "rater": "dr-b"},
    ])
    manifest = read_manifest(root / "manifest.csv")
    assert manifest.rows["P1/2024-01-01/a.jpg"].ratings == (("dr-a", 1), ("dr-b", 2))
    assert manifest.rows["P1/2024-01-01/a.jpg"].patient == "P1"
    assert manifest.problems == {
        "P1/2024-01-01/b.jpg": "manifest.csv line 5: P1/2024-01-01/b.jpg is listed twice for "
                               "rater 'dr-a' (first on line 4): keep one row per image and rater",
        "P2/2024-01-02/c.jpg": "manifest.csv line 7: patient 'P9' differs from 'P2' on line 6 of "
                               "the same path: the rows of one image must agree",
    }


def test_ingest_stores_each_raters_label_and_a_changed_one_again(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    rows = [{"path": "P1/2024-01-01/a.jpg", "severity": "1", "rater": "dr-a"},
            {"path": "P1/2024-01-01/a.jpg", "severity": "mild", "rater": "dr-b"},
            {"path": "P1/2024-01-01/b.jpg", "severity": "3", "rater": "dr-a"},
            {"path": "P1/2024-01-01/b.jpg", "severity": "3", "rater": "dr-a"},
            {"path": "P2/2024-01-02/c.jpg", "severity": "2"}]
    root = _study(tmp_path, rows)
    ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    with factory() as session:
        labels = sorted(session.execute(select(Label.rater, Label.severity, Label.source)).all(),
                        key=str)
        assert labels == sorted([("dr-a", 1, "manifest"), ("dr-b", 1, "manifest"),
                                 (None, 2, "manifest")], key=str)
        rejected = session.execute(select(Rejection.path, Rejection.reason)).all()
        assert [(p, "listed twice for rater 'dr-a'" in r) for p, r in rejected] == [
            ("P1/2024-01-01/b.jpg", True)]
    rows[1]["severity"] = "3"  # dr-b changes their mind; dr-a's row is unchanged
    write_manifest(root, rows, columns=COLUMNS)
    report = ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    assert report.updated == 1
    with factory() as session:
        data = labelled_images(session, rule="majority")  # a: dr-a 1, dr-b 3: tie -> 3
        assert sorted(data.labels.tolist()) == [2, 3]
        data = labelled_images(session, rule="adjudicator:dr-a")
        assert sorted(data.labels.tolist()) == [1, 2]


# --- the blinded pass ---------------------------------------------------------------------------


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def rated(factory: sessionmaker[Session]) -> list[int]:
    """Eight predicted images of eight patients, dr-a's manifest label (n % 4) on each."""
    with factory() as s, s.begin():
        head = make_head(s)
        study = make_study(s, root="/data/trial")
        ids = []
        for n in range(8):
            visit = make_visit(s, make_patient(s, study, f"P{n}"), dt.date(2024, 1, 1))
            image = make_image(s, visit, body_site="left-arm", path=f"P{n}/v1/img{n}.jpg")
            make_prediction(s, image, head, [0.1, 0.2, 0.6, 0.1])
            s.add(Label(image_id=image.id, severity=n % 4, source="manifest", rater="dr-a"))
            ids.append(image.id)
        s.flush()
        return ids


def test_review_next_is_blinded(rated: list[int]) -> None:
    _invoke("review", "set", str(rated[0]), "--severity", "3", "--by", "dr-c")
    code, stdout, _ = _invoke("review", "next", "--by", "dr-b", "--json")
    assert code == 0
    doc = json.loads(stdout)
    assert set(doc) == {"rater", "remaining", "image"}
    assert set(doc["image"]) == {"image_id", "study", "patient", "visit", "visit_date",
                                 "body_site", "path"}
    assert doc["remaining"] == 8
    assert doc["image"]["path"].startswith("/data/trial/P")
    code, _, err = _invoke("review", "next", "--by", "dr-b")
    assert code == 0 and f"image    {doc['image']['image_id']}" in err
    for leak in ("moderate", "0.6", "severe", "dr-a", "dr-c", "predict"):
        assert leak not in err and leak not in stdout
    # Recording it blinded shows nothing of the image's earlier labels or prediction.
    code, stdout, err = _invoke("review", "set", str(doc["image"]["image_id"]), "--severity",
                                "mild", "--by", "dr-b", "--blinded", "--json")
    decision = json.loads(stdout)
    assert code == 0 and "previous" not in decision and decision["source"] == "review"
    code, _, err = _invoke("review", "set", str(rated[1]), "--severity", "1", "--by", "dr-b",
                           "--blinded")
    assert code == 0 and "was" not in err and "moderate" not in err


def test_review_next_order_repeats_and_intra_rater_agreement(
    rated: list[int], factory: sessionmaker[Session]
) -> None:
    seen: list[int] = []
    for _ in range(8 + REPEAT_GAP):
        code, stdout, _ = _invoke("review", "next", "--by", "dr-b", "--repeat-share", "1",
                                  "--json")
        item = json.loads(stdout)["image"]
        if item is None:
            break
        seen.append(item["image_id"])
        image = item["image_id"]
        severity = str(rated.index(image) % 4)
        _invoke("review", "set", str(image), "--severity", severity, "--by", "dr-b", "--blinded")
    # Every image once, then each again: the first repeat comes after REPEAT_GAP other readings.
    assert sorted(seen[:REPEAT_GAP + 1]) == sorted(set(seen[:REPEAT_GAP + 1]))
    assert seen[REPEAT_GAP + 1] == seen[0]
    code, stdout, _ = _invoke("review", "next", "--by", "dr-b", "--repeat-share", "1", "--json")
    while json.loads(stdout)["image"] is not None:
        image = json.loads(stdout)["image"]["image_id"]
        _invoke("review", "set", str(image), "--severity", "0", "--by", "dr-b", "--blinded")
        code, stdout, _ = _invoke("review", "next", "--by", "dr-b", "--repeat-share", "1",
                                  "--json")
    assert json.loads(stdout) == {"rater": "dr-b", "remaining": 0, "image": None}
    with factory() as session:
        repeats = session.scalars(select(Label.id).where(Label.source == REVIEW_REPEAT)).all()
        assert len(repeats) == 8
        ratings = {r.image_id: r for r in read_ratings(session)}
        # The repeats (some 0) never replace dr-b's first reading (n % 4).
        assert all(ratings[i].own["dr-b"] == n % 4 for n, i in enumerate(rated))
        assert labelled_images(session, rule="adjudicator:dr-b").labels.tolist() == [
            n % 4 for n in range(8)]
    code, stdout, _ = _invoke("agreement", "--json", "--bootstrap", "50")
    doc = json.loads(stdout)
    assert code == 0 and doc["raters"] == {"dr-a": 8, "dr-b": 8} and doc["multi_rated"] == 8
    assert doc["pairs"][0]["kappa"]["value"] == pytest.approx(1.0)
    assert [p["a"] for p in doc["intra"]] == ["dr-b"] and doc["intra"][0]["kappa"]["images"] == 8
    assert doc["model"] == []
    code, _, err = _invoke("agreement")
    assert code == 0 and "dr-a vs dr-b" in err and "Krippendorff" in err


def test_evaluation_agreement_uses_the_out_of_fold_rows(
    rated: list[int], factory: sessionmaker[Session]
) -> None:
    rows = [{"image_id": i, "segmenter": mode, "predicted": 2, "repeat": r}
            for i in rated for r in range(2) for mode in ("seggpt", "none")]
    with factory() as session:
        assert evaluation_agreement(session, study=None, classes=("a", "b", "c", "d"),
                                    reference_rule="newest", predictions=rows,
                                    segmenter="seggpt", bootstrap=10, seed=0) is None
    _invoke("review", "set", str(rated[0]), "--severity", "0", "--by", "dr-b")
    with factory() as session:
        report = evaluation_agreement(session, study=None, classes=("a", "b", "c", "d"),
                                      reference_rule="majority", predictions=rows,
                                      segmenter="seggpt", bootstrap=10, seed=0)
    assert report is not None and report.reference_rule == "majority"
    assert [(p.b, p.kappa.images, p.kappa.exact) for p in report.model] == [
        ("dr-a", 8, 0.25), ("dr-b", 1, 0.0)]
    assert report.model_source == "out-of-fold head (seggpt)"


@pytest.mark.slow
def test_evaluate_reports_raters_and_the_model_beside_them(
    tmp_path: Path, factory: sessionmaker[Session], tiny_model_dir: Path  # noqa: F811
) -> None:
    """The whole `evaluate` with a second rater on half the labelled images: the report carries
    the rater-vs-rater kappa and the out-of-fold model against each rater, and reads back."""
    from eczema_batch.measuring.config import RunConfig
    from eczema_batch.pipeline.train import TrainSettings
    from eczema_batch.synth import write_synthetic_study
    from eczema_batch.training.evaluate import EvaluationSettings, run_evaluation
    from eczema_batch.training.report import report_json, summary_tables
    from eczema_batch.training.results import EvaluationReport

    root = tmp_path / "study"
    write_synthetic_study(root, patients=8, visits=3, seed=0, size=(64, 48))
    ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    same = 0
    with factory() as session, session.begin():
        first = session.execute(select(Label.image_id, Label.severity).order_by(Label.id)).all()
        for index, (image_id, severity) in enumerate(first[::2]):
            other = severity if index % 3 else min(3, severity + 1)  # one class up on a third
            same += other == severity
            session.add(Label(image_id=image_id, severity=other, source="review", rater="dr-b"))
    config = RunConfig(segmenter_model="tiny-seggpt", embedder_model="tiny-dino",
                       model_dir=str(tiny_model_dir), device="cpu")
    settings = EvaluationSettings(folds=3, repeats=1, fractions=(1.0,), bootstrap=50,
                                  ablation=False, train=TrainSettings(epochs=5),
                                  reference_label="adjudicator:dr-b")
    report = run_evaluation(factory, config=config, settings=settings).report
    agreement = report.agreement
    assert agreement is not None and agreement.reference_rule == "adjudicator:dr-b"
    assert agreement.multi_rated == len(first[::2])
    [pair] = agreement.pairs
    assert {pair.a, pair.b} == {"manifest", "dr-b"}
    assert pair.kappa.value is not None and pair.kappa.value < 1.0
    assert pair.kappa.exact == pytest.approx(same / len(first[::2]))
    assert {p.b for p in agreement.model} == {"manifest", "dr-b"}
    assert {p.b: p.kappa.images for p in agreement.model} == {
        "manifest": len(first), "dr-b": len(first[::2])}
    assert EvaluationReport.from_dict(json.loads(report_json(report))).as_dict() \
        == report.as_dict()
    titles = [title for title, _, _ in summary_tables(report)]
    assert any("agree" in title.lower() for title in titles)


def test_the_html_report_shows_the_raters_agreement_once_two_raters_label(
    rated: list[int], tmp_path: Path
) -> None:
    html = tmp_path / "html"
    code, _, err = _invoke("report", "--html", str(html))
    assert code == 0, err
    assert "agreement" not in (html / "index.html").read_text()  # one rater only
    for n, image in enumerate(rated):
        _invoke("review", "set", str(image), "--severity", str((n + n // 4) % 4), "--by",
                "<i>dr-b</i>", "--blinded")
    code, _, err = _invoke("report", "--html", str(html))
    assert code == 0, err
    index = (html / "index.html").read_text()
    assert "<h2>Agreement</h2>" in index and "Quadratic-weighted kappa with its 95%" in index
    assert "&lt;i&gt;dr-b&lt;/i&gt; vs dr-a" in index and "<i>dr-b</i>" not in index
    assert "From the catalogue&#39;s labels: 8 images labelled by two raters" in index
    assert "Krippendorff" in index
