"""The export's appended columns: reference and raters' labels, lesion area, code and date sources.

Hand-built catalogue, hand-checked values, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Label, Patient, Visit
from eczema_batch.cli import app
from eczema_batch.pipeline.records import FLAG_EMPTY, FLAG_NO_REFERENCES
from tests.report_factories import (
    make_head,
    make_image,
    make_patient,
    make_prediction,
    make_study,
    make_visit,
)

D0 = dt.date(2024, 1, 1)
T0 = dt.datetime(2024, 2, 1, 9, 0, tzinfo=dt.UTC)


def _label(s: Session, image_id: int, severity: int, source: str, rater: str | None,
           minutes: int) -> None:
    s.add(Label(image_id=image_id, severity=severity, source=source, rater=rater,
                created_at=T0 + dt.timedelta(minutes=minutes)))
    s.flush()


@pytest.fixture
def labelled(factory: sessionmaker[Session]) -> dict[str, int]:
    """S1 (code from DICOM ClinicalTrialSubjectID), one visit dated by DICOM StudyDate:

    a: default mask (rows 12-24 x cols 16-32 of 64x48 = 192/3072 = 0.0625), labels manifest 2,
       then dr-a 1, then dr-b 3 (the reference: newest), then dr-a again 2 -> reference dr-a 2;
    b: mask covering the left half (0.5), no label;
    c: no reference could prompt SegGPT: the whole image stood in, no area;
    d: SegGPT found no lesion: a measured 0.
    Visit mean area: (0.0625 + 0.5 + 0.0) / 3.
    """
    with factory() as s, s.begin():
        study, head = make_study(s), make_head(s)
        p = make_patient(s, study, "S1")
        v = make_visit(s, p, D0)
        s.execute(update(Patient).where(Patient.id == p.id)
                  .values(code_source="ClinicalTrialSubjectID"))
        s.execute(update(Visit).where(Visit.id == v.id).values(date_source="StudyDate"))
        a, b, c, d = (make_image(s, v) for _ in range(4))
        make_prediction(s, a, head, [0.0, 0.2, 0.7, 0.1])
        half = np.zeros((48, 64), dtype=bool)
        half[:, :32] = True
        make_prediction(s, b, head, [0.0, 0.9, 0.1, 0.0], mask=half)
        make_prediction(s, c, head, [0.0, 0.9, 0.1, 0.0], mask_flag=FLAG_NO_REFERENCES,
                        mask=np.ones((48, 64), dtype=bool))
        make_prediction(s, d, head, [0.0, 0.9, 0.1, 0.0], mask_flag=FLAG_EMPTY)
        _label(s, a.id, 2, "manifest", None, 0)
        _label(s, a.id, 1, "review", "dr-a", 5)
        _label(s, a.id, 3, "review", "dr-b", 10)
        _label(s, a.id, 2, "review", "dr-a", 15)
        # Another patient with the defaults (manifest code, manifest date), no labels.
        q = make_patient(s, study, "S2")
        make_prediction(s, make_image(s, make_visit(s, q, D0)), head, [1.0, 0.0, 0.0, 0.0])
        return {"a": a.id, "b": b.id, "c": c.id, "d": d.id}


def _csv(*args: str) -> list[dict[str, str]]:
    result = CliRunner().invoke(app, ["export", *args])
    assert result.exit_code == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


def test_image_rows_carry_labels_area_and_sources(labelled: dict[str, int]) -> None:
    rows = {int(r["image_id"]): r for r in _csv("--level", "image", "--patient", "S1")}
    a, b, c, d = (rows[labelled[k]] for k in "abcd")
    assert (a["code_source"], a["date_source"]) == ("ClinicalTrialSubjectID", "StudyDate")
    assert [r["lesion_area"] for r in (a, b, c, d)] == ["0.062500", "0.500000", "", "0.000000"]
    # The reference label is the newest (created_at, then id): dr-a's second look.
    assert (a["reference_severity"], a["reference_class"], a["reference_source"],
            a["reference_rater"]) == ("2", "moderate", "review", "dr-a")
    assert (a["n_labels"], a["n_raters"]) == ("4", "3")
    assert a["rater_labels"] == "manifest=2; review:dr-a=1; review:dr-b=3; review:dr-a=2"
    # The existing columns keep their meaning: the newest review replaces the prediction.
    assert (a["reviewed_severity"], a["severity"], a["predicted_severity"]) == ("2", "2", "2")
    assert (b["reference_severity"], b["n_labels"], b["n_raters"], b["rater_labels"]) == (
        "", "0", "0", "")


def test_visit_and_patient_rows_carry_area_and_sources(labelled: dict[str, int]) -> None:
    visits = {r["patient"]: r for r in _csv("--level", "visit")}
    s1, s2 = visits["S1"], visits["S2"]
    assert float(s1["lesion_area"]) == pytest.approx((0.0625 + 0.5 + 0.0) / 3, abs=1e-6)
    assert (s1["code_source"], s1["date_source"]) == ("ClinicalTrialSubjectID", "StudyDate")
    assert (s2["code_source"], s2["date_source"], s2["lesion_area"]) == (
        "manifest", "manifest", "0.062500")
    patients = {r["patient"]: r for r in _csv("--level", "patient")}
    assert patients["S1"]["code_source"] == "ClinicalTrialSubjectID"
    assert patients["S2"]["code_source"] == "manifest"


def test_json_has_the_same_appended_values(labelled: dict[str, int]) -> None:
    result = CliRunner().invoke(app, ["export", "--level", "image", "--format", "json",
                                      "--patient", "S1"])
    assert result.exit_code == 0, result.stderr
    a = {r["image_id"]: r for r in json.loads(result.stdout)}[labelled["a"]]
    assert (a["lesion_area"], a["reference_severity"], a["n_labels"]) == (0.0625, 2, 4)
    assert list(a)[-16:] == ["code_source", "date_source", "lesion_area", "reference_severity",
                             "reference_class", "reference_source", "reference_rater",
                             "n_labels", "n_raters", "rater_labels", "device", "fitzpatrick",
                             "skin_ita", "skin_tone", "skin_tone_source", "quality_flag"]


def test_rater_names_are_spreadsheet_safe(factory: sessionmaker[Session], labelled: dict[str, int],
                                          tmp_path: Path) -> None:
    with factory() as s, s.begin():
        _label(s, labelled["b"], 1, "review", "=cmd|' /C calc'!A0", 20)
    out = tmp_path / "images.csv"
    result = CliRunner().invoke(app, ["export", "--level", "image", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    with out.open(newline="", encoding="utf-8") as handle:
        b = {int(r["image_id"]): r for r in csv.DictReader(handle)}[labelled["b"]]
    assert b["reference_rater"] == "'=cmd|' /C calc'!A0"
    assert b["rater_labels"] == "review:=cmd|' /C calc'!A0=1"  # starts with "r": runs nothing
    raw = tmp_path / "raw.csv"
    result = CliRunner().invoke(app, ["export", "--level", "image", "--verbatim", "-o", str(raw)])
    assert result.exit_code == 0, result.stderr
    with raw.open(newline="", encoding="utf-8") as handle:
        b = {int(r["image_id"]): r for r in csv.DictReader(handle)}[labelled["b"]]
    assert b["reference_rater"] == "=cmd|' /C calc'!A0"
