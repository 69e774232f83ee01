"""`eczema-batch export`: pinned columns, hand-checked values, no identifying data, clear errors."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Image, Mask, Model, Patient, Visit
from eczema_batch.cli import app
from eczema_batch.report.export import TEXT_COLUMNS, columns, fixed
from tests.report_factories import (
    make_head,
    make_image,
    make_patient,
    make_prediction,
    make_review,
    make_study,
    make_visit,
)

IDENTITY = ["head", "head_digest", "embedder", "embedder_digest", "segmenter",
            "segmenter_digest", "segmenter_precision"]
P = ["p_clear", "p_mild", "p_moderate", "p_severe"]
#: The contract with statisticians (README, "Reports and exports"): append, never rename.
IMAGE_COLUMNS = ["study", "patient", "visit", "visit_number", "visit_date",
                 "days_from_baseline", "image_id", "body_site", "format", "severity",
                 "severity_class", *P, "expected_score", "predicted_severity",
                 "reviewed_severity", "change_from_baseline", "review_status", "review_reasons",
                 "prompt_similarity", *IDENTITY, "code_source", "date_source", "lesion_area",
                 "reference_severity", "reference_class", "reference_source", "reference_rater",
                 "n_labels", "n_raters", "rater_labels", "device", "fitzpatrick", "skin_ita",
                 "skin_tone", "skin_tone_source", "quality_flag"]
VISIT_COLUMNS = ["study", "patient", "visit", "visit_number", "visit_date", "days_from_baseline",
                 "body_sites", "n_images", "n_scored", "n_flagged", "n_reviewed", "severity",
                 "severity_class", *P, "expected_score", "worst_severity", "baseline",
                 "change_from_baseline", "change_from_previous", "class_change_from_baseline",
                 "review_status", *IDENTITY, "code_source", "date_source", "lesion_area"]
PATIENT_COLUMNS = ["study", "patient", "n_visits", "n_scored_visits", "n_images", "n_flagged",
                   "n_reviewed", "baseline_date", "baseline_severity", "baseline_score",
                   "last_date", "last_severity", "last_score", "days_followed",
                   "change_from_baseline", "class_change_from_baseline", "slope_per_30d",
                   "slope_ci_low", "slope_ci_high", "slope_n", "status", "responder",
                   "review_status", *IDENTITY, "code_source"]
D0 = dt.date(2024, 1, 1)
ROOT = "/secret/site/study-root"


def test_columns_are_pinned() -> None:
    assert columns("image") == IMAGE_COLUMNS
    assert columns("visit") == VISIT_COLUMNS
    assert columns("patient") == PATIENT_COLUMNS
    assert columns("visit", ("none", "some"))[13:15] == ["p_none", "p_some"]


@pytest.fixture
def cohort(factory: sessionmaker[Session]) -> dict[str, int]:
    """P1: moderate (2.0) -> mild (1.3) -> reviewed mild (1.0) at days 0, 30, 60."""
    with factory() as s, s.begin():
        study = make_study(s, root=ROOT)
        head = make_head(s)
        p = make_patient(s, study, "P1")
        v1 = make_visit(s, p, D0)
        v2 = make_visit(s, p, D0 + dt.timedelta(30))
        v3 = make_visit(s, p, D0 + dt.timedelta(60))
        a = make_image(s, v1, body_site="trunk", path="P1/secret-name.jpg")
        make_prediction(s, a, head, [0.1, 0.2, 0.3, 0.4])
        make_prediction(s, make_image(s, v1), head, [0.0, 0.2, 0.6, 0.2])
        make_prediction(s, make_image(s, v2), head, [0.1, 0.6, 0.2, 0.1])
        reviewed = make_image(s, v3)
        make_prediction(s, reviewed, head, [0.7, 0.2, 0.1, 0.0])
        make_review(s, reviewed, 1, note="patient said her name is Jane")
        q = make_patient(s, study, "Q1")
        make_prediction(s, make_image(s, make_visit(s, q, D0)), head, [0.0, 0.0, 1.0, 0.0])
        return {"flagged": a.id, "reviewed": reviewed.id}


def _export(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["export", *args])
    return result.exit_code, result.stdout, result.stderr


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_visit_rows_by_hand(cohort: dict[str, int], tmp_path: Path) -> None:
    out = tmp_path / "visits.csv"
    code, _, err = _export("--level", "visit", "-o", str(out))
    assert code == 0, err
    assert "wrote 4 visit rows" in err
    text = out.read_text()
    assert text.splitlines()[0] == ",".join(VISIT_COLUMNS)
    rows = _rows(text)
    p1 = [r for r in rows if r["patient"] == "P1"]
    assert [r["visit_date"] for r in p1] == ["2024-01-01", "2024-01-31", "2024-03-01"]
    assert [r["days_from_baseline"] for r in p1] == ["0", "30", "60"]
    assert [r["severity_class"] for r in p1] == ["moderate", "mild", "mild"]
    assert [float(r["expected_score"]) for r in p1] == pytest.approx([2.0, 1.3, 1.0])
    assert [r["change_from_baseline"] for r in p1] == ["0.000000", "-0.700000", "-1.000000"]
    assert [r["change_from_previous"] for r in p1] == ["", "-0.700000", "-0.300000"]
    assert [float(p1[0][c]) for c in P] == pytest.approx([0.05, 0.2, 0.45, 0.3])
    assert (p1[0]["n_images"], p1[0]["n_flagged"], p1[0]["worst_severity"]) == ("2", "1", "3")
    assert p1[0]["body_sites"] == "left-arm;trunk" and p1[0]["baseline"] == "True"
    assert [r["review_status"] for r in p1] == ["pending", "none", "reviewed"]
    assert p1[0]["head"] == "head-test" and p1[0]["embedder"] == "tiny-dino"
    assert p1[0]["segmenter"] == "tiny-seggpt" and p1[0]["head_digest"] == "h" * 64
    assert p1[0]["segmenter_precision"] == "unrecorded"  # made before precision was recorded


def test_patient_rows_by_hand(cohort: dict[str, int]) -> None:
    code, stdout, err = _export("--level", "patient")
    assert code == 0, err
    p1, q1 = _rows(stdout)
    assert (p1["status"], p1["responder"], p1["days_followed"]) == ("improving", "True", "60")
    assert (p1["baseline_severity"], p1["last_severity"]) == ("2", "1")
    assert float(p1["slope_per_30d"]) == pytest.approx(-0.5)
    assert float(p1["slope_ci_low"]) == pytest.approx(-1.967186, abs=1e-6)
    assert p1["slope_n"] == "3" and p1["review_status"] == "pending"
    assert (q1["status"], q1["responder"], q1["slope_per_30d"]) == ("unknown", "", "")


def test_image_rows_json_reviewed_as_one_hot(cohort: dict[str, int]) -> None:
    code, stdout, err = _export("--level", "image", "--format", "json", "--patient", "P1")
    assert code == 0, err
    rows = json.loads(stdout)
    assert list(rows[0]) == IMAGE_COLUMNS and len(rows) == 4
    by_id = {r["image_id"]: r for r in rows}
    reviewed = by_id[cohort["reviewed"]]
    assert [reviewed[c] for c in P] == [0.0, 1.0, 0.0, 0.0]
    assert (reviewed["severity"], reviewed["predicted_severity"]) == (1, 0)
    assert reviewed["review_status"] == "reviewed" and reviewed["change_from_baseline"] == -1.0
    flagged = by_id[cohort["flagged"]]
    assert flagged["review_status"] == "pending"
    assert flagged["review_reasons"] == "low confidence: top probability 0.40 < 0.50"
    assert flagged["visit_date"] == "2024-01-01" and flagged["days_from_baseline"] == 0


def test_csv_and_json_agree_cell_for_cell(factory: sessionmaker[Session],
                                          cohort: dict[str, int]) -> None:
    # Q1's mask came from another segmenter, whose name needs CSV quoting: the identity cells
    # change mid-export and must still be quoted and aligned.
    with factory() as s, s.begin():
        other = Model(kind="segmenter", name='seggpt, retrained "v2"', digest="t" * 64,
                      config={})
        s.add(other)
        s.flush()
        q1_masks = (select(Mask.id).join(Image, Image.id == Mask.image_id)
                    .join(Visit, Visit.id == Image.visit_id)
                    .join(Patient, Patient.id == Visit.patient_id)
                    .where(Patient.subject_code == "Q1"))
        s.execute(update(Mask).where(Mask.id.in_(q1_masks)).values(model_id=other.id))
    for level in ("image", "visit", "patient"):
        code, text, err = _export("--level", level)
        assert code == 0, err
        code, js, err = _export("--level", level, "--format", "json")
        assert code == 0, err
        table, objects = _rows(text), json.loads(js)
        assert len(table) == len(objects) > 0 and list(table[0]) == list(objects[0])
        for row, obj in zip(table, objects, strict=True):
            for key, value in obj.items():
                if value is None:
                    assert row[key] == "", (level, key)
                elif isinstance(value, bool):
                    assert row[key] == str(value), (level, key)
                elif isinstance(value, float):
                    assert float(row[key]) == pytest.approx(value, abs=1e-6), (level, key)
                    assert len(row[key].split(".")[1]) == 6, (level, key, row[key])
                else:
                    assert row[key] == str(value), (level, key)
        q1 = [r for r in table if r["patient"] == "Q1"]
        assert {r["segmenter"] for r in q1} == {'seggpt, retrained "v2"'}
        assert {r["segmenter"] for r in table if r["patient"] == "P1"} == {"tiny-seggpt"}


def test_csv_numbers_have_fixed_decimals_and_no_negative_zero() -> None:
    assert [fixed(x) for x in (0.7, -0.7, 1 / 3, -1e-9, -0.0, 0.0, None)] == [
        "0.700000", "-0.700000", "0.333333", "0.000000", "0.000000", "0.000000", None]
    assert fixed(-10.0) == "-10.000000" and fixed(2.5e-7) == "0.000000"


def test_no_identifying_data_or_paths(cohort: dict[str, int]) -> None:
    for level in ("image", "visit", "patient"):
        code, stdout, _ = _export("--level", level, "--format", "json")
        assert code == 0
        assert ROOT not in stdout and "secret-name" not in stdout and "Jane" not in stdout


def test_unknown_patient_is_exit_2_and_no_file(cohort: dict[str, int], tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    code, stdout, err = _export("--patient", "NOPE", "-o", str(out))
    assert code == 2
    assert "no patient 'NOPE'" in err
    assert not out.exists() and not list(tmp_path.glob("x.csv*"))
    assert _export("--level", "visits")[0] == 2
    assert _export("--format", "xlsx")[0] == 2


def test_patients_in_byte_order_on_every_database(factory: sessionmaker[Session]) -> None:
    # Locale-aware order would put "a2" before "B1" on many PostgreSQL servers; SQLite never does.
    with factory() as s, s.begin():
        head, study = make_head(s), make_study(s)
        for code in ("a2", "B1", "_3"):
            visit = make_visit(s, make_patient(s, study, code), D0)
            make_prediction(s, make_image(s, visit), head, [0.0, 1.0, 0.0, 0.0])
    for level in ("visit", "patient", "image"):
        code, text, err = _export("--level", level)
        assert code == 0, err
        assert [r["patient"] for r in _rows(text)] == ["B1", "_3", "a2"], level


# -- CSV a spreadsheet can open, that reads back as written ------------------------------------

FORMULA_START = tuple("=+-@\t\r\n")
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


@pytest.fixture
def hostile(factory: sessionmaker[Session]) -> None:
    """Names that spreadsheets run (OWASP's examples and more), and cells with line breaks."""
    with factory() as s, s.begin():
        head = make_head(s, name="=HYPERLINK(\"http://evil.example\",\"head\")",
                         classes=("clear", "-mild", "@moderate", "severe"))
        study = make_study(s, name="=1+1")
        p = make_patient(s, study, "+cmd|' /C calc'!A0")
        first = make_visit(s, p, D0, label="@SUM(1+1)*cmd|' /C calc'!A0")
        second = make_visit(s, p, D0 + dt.timedelta(30), label="-2+3+cmd|' /C calc'!A0")
        third = make_visit(s, p, D0 + dt.timedelta(60), label="-1")  # a number: stays one
        for visit, site, probs in (
            (first, "\t=1+1", [0.0, 0.0, 1.0, 0.0]),
            (first, "line\rbreak", [0.0, 0.0, 0.8, 0.2]),
            (second, "\r=2+2", [0.0, 1.0, 0.0, 0.0]),
            (second, "two\nlines", [0.1, 0.9, 0.0, 0.0]),
            (third, "crlf\r\n=3+3", [0.7, 0.3, 0.0, 0.0]),
            (third, "+44 is a phone", [1.0, 0.0, 0.0, 0.0]),
        ):
            make_prediction(s, make_image(s, visit, body_site=site), head, probs)
        other = make_visit(s, make_patient(s, study, "Q1"), D0)
        make_prediction(s, make_image(s, other, body_site="arm"), head, [0.0, 0.0, 0.0, 1.0])


def _records(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def _export_file(path: Path, *args: str) -> str:
    """The CSV as written to a file (CliRunner's stdout turns CRLF inside a cell into LF)."""
    code, _, err = _export(*args, "-o", str(path))
    assert code == 0, err
    return path.read_bytes().decode("utf-8")


@pytest.mark.parametrize("level", ["image", "visit", "patient"])
def test_csv_cells_never_start_a_formula(hostile: None, level: str, tmp_path: Path) -> None:
    text = _export_file(tmp_path / "safe.csv", "--level", level)
    raw = _export_file(tmp_path / "raw.csv", "--level", level, "--verbatim")
    _, js, _ = _export("--level", level, "--format", "json")
    objects = json.loads(js)
    header, *rows = _records(text)
    assert len(rows) == len(objects) > 0
    neutralised = 0
    for row, obj in zip(rows, objects, strict=True):
        for cell, key in zip(row, header, strict=True):
            assert not cell.startswith(FORMULA_START) or NUMBER.fullmatch(cell), (key, cell)
            value = obj[key]
            if isinstance(value, str) and value.startswith(FORMULA_START) and not (
                    NUMBER.fullmatch(value)):
                assert cell == "'" + value, (key, cell)  # a leading ' and nothing else changed
                neutralised += 1
    assert neutralised >= {"image": 10, "visit": 8, "patient": 4}[level]
    # --verbatim (R, pandas): exactly the stored text, as in JSON.
    for row, obj in zip(_records(raw)[1:], objects, strict=True):
        for cell, key in zip(row, header, strict=True):
            value = obj[key]
            if isinstance(value, str):
                assert cell == value, (key, cell)


def test_every_text_column_is_declared(hostile: None) -> None:
    # The CSV writer neutralises and quotes only TEXT_COLUMNS (and the identity): a new column
    # holding text must be added there, or its cells would reach a spreadsheet unchecked.
    for level in ("image", "visit", "patient"):
        _, js, _ = _export("--level", level, "--format", "json")
        for obj in json.loads(js):
            for key, value in obj.items():
                if isinstance(value, str) and not re.fullmatch(r"\d{4}-\d\d-\d\d", value):
                    assert key in TEXT_COLUMNS or key in IDENTITY, (level, key, value)


def test_numbers_and_number_like_labels_stay_numbers(hostile: None, tmp_path: Path) -> None:
    text = _export_file(tmp_path / "visits.csv", "--level", "visit")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["visit"] for r in rows if r["patient"].endswith("A0")][2] == "-1"
    assert "-1.150000" in [r["change_from_baseline"] for r in rows]


@pytest.mark.parametrize("level", ["image", "visit", "patient"])
def test_csv_line_breaks_stay_inside_their_cells(hostile: None, tmp_path: Path,
                                                 level: str) -> None:
    out = tmp_path / "rows.csv"
    code, _, err = _export("--level", level, "-o", str(out))
    assert code == 0, err
    _, js, _ = _export("--level", level, "--format", "json")
    with out.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert f"wrote {len(rows)} {level} rows" in err and len(rows) == len(json.loads(js))
    assert {r["head_digest"] for r in rows} == {"h" * 64}  # every record whole and aligned
    if level == "image":
        assert {r["body_site"] for r in rows} >= {"line\rbreak", "two\nlines", "crlf\r\n=3+3"}


def test_evaluation_predictions_csv_is_spreadsheet_safe() -> None:
    from eczema_batch.training.report import write_predictions_csv

    rows = [{"image_id": 1, "patient": "=1+1", "segmenter": "seggpt", "p_clear": -0.5},
            {"image_id": 2, "patient": "P\r2", "segmenter": "seggpt", "p_clear": 0.25}]
    out = io.StringIO()
    write_predictions_csv(rows, out)
    assert _records(out.getvalue()) == [["image_id", "patient", "segmenter", "p_clear"],
                                        ["1", "'=1+1", "seggpt", "-0.5"],
                                        ["2", "P\r2", "seggpt", "0.25"]]
    out = io.StringIO()
    write_predictions_csv(rows, out, verbatim=True)
    assert _records(out.getvalue())[1] == ["1", "=1+1", "seggpt", "-0.5"]
