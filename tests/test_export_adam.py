"""`export --format adam`: a CDISC ADaM BDS dataset, checked by hand, against its dictionary, and
read back from the SAS transport file; on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyreadstat
import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.cli import app
from eczema_batch.report.adam import (
    COLUMNS,
    CSV_NAME,
    DICTIONARY_NAME,
    MAX_LABEL,
    MAX_NAME,
    PARAMETERS,
    XPT_NAME,
)
from tests.report_factories import (
    make_head,
    make_image,
    make_patient,
    make_prediction,
    make_review,
    make_study,
    make_visit,
)

D0 = dt.date(2024, 1, 1)
#: The BDS variables a dataset of this kind must carry (ADaM IG: identifiers, parameter, timing,
#: analysis value, baseline and change, flags).
REQUIRED = {"STUDYID", "USUBJID", "SUBJID", "PARAMCD", "PARAM", "AVISIT", "AVISITN", "ADT",
            "ADY", "AVAL", "AVALC", "BASE", "CHG", "ABLFL", "ANL01FL"}
SAS_EPOCH = dt.date(1960, 1, 1)


@pytest.fixture
def trial(factory: sessionmaker[Session]) -> None:
    """P1, three visits 30 days apart; Q1, a first visit with no score and an undated last one.

    P1 v1: mean of [.1 .2 .3 .4] and [0 .2 .6 .2] = [.05 .2 .45 .3]: score 2.0, moderate; both
       default masks (192 of 64x48 pixels: 6.25%).
    P1 v2: one image, [.1 .45 .3 .15] (top 0.45 < 0.5: flagged, so every image is): score 1.5,
       mild; a mask over the left half: 50%.
    P1 v3: one image reviewed as mild (its prediction [.7 .2 .1 0] replaced): 1.0, mild; 6.25%.
    Q1 v1 (2024-01-01): an image with no prediction. v2 (2024-01-11): [0 0 1 0], 2.0, moderate.
    v3 (undated, after the dated ones): [0 1 0 0], 1.0, mild.
    """
    with factory() as s, s.begin():
        study, head = make_study(s, name="TRIAL01"), make_head(s)
        p = make_patient(s, study, "P1")
        v1, v2, v3 = (make_visit(s, p, D0 + dt.timedelta(30 * i)) for i in range(3))
        make_prediction(s, make_image(s, v1), head, [0.1, 0.2, 0.3, 0.4])
        make_prediction(s, make_image(s, v1), head, [0.0, 0.2, 0.6, 0.2])
        half = np.zeros((48, 64), dtype=bool)
        half[:, :32] = True
        make_prediction(s, make_image(s, v2), head, [0.1, 0.45, 0.3, 0.15], mask=half)
        reviewed = make_image(s, v3)
        make_prediction(s, reviewed, head, [0.7, 0.2, 0.1, 0.0])
        make_review(s, reviewed, 1)
        q = make_patient(s, study, "Q1")
        make_image(s, make_visit(s, q, D0))
        make_prediction(s, make_image(s, make_visit(s, q, D0 + dt.timedelta(10))), head,
                        [0.0, 0.0, 1.0, 0.0])
        make_prediction(s, make_image(s, make_visit(s, q, None, label="visit-x")), head,
                        [0.0, 1.0, 0.0, 0.0])


def _adam(out: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["export", "--format", "adam", "-o", str(out), *args])


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _num(cell: str) -> float | None:
    return None if cell == "" else float(cell)


@pytest.fixture
def written(trial: None, tmp_path: Path) -> Path:
    out = tmp_path / "adam"
    result = _adam(out)
    assert result.exit_code == 0, result.stderr
    assert "wrote 15 ADaM records of 2 subjects" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([CSV_NAME, XPT_NAME, DICTIONARY_NAME])
    return out


def test_baseline_change_and_study_day_by_hand(written: Path) -> None:
    rows = _csv(written / CSV_NAME)
    assert list(rows[0]) == list(COLUMNS)
    p1 = [r for r in rows if r["SUBJID"] == "P1"]
    assert {r["USUBJID"] for r in p1} == {"TRIAL01-P1"} and {r["STUDYID"] for r in p1} == {
        "TRIAL01"}
    by = {code: [r for r in p1 if r["PARAMCD"] == code] for code in ("ECZSCORE", "ECZCLASS",
                                                                      "ECZAREA")}
    score, klass, area = by["ECZSCORE"], by["ECZCLASS"], by["ECZAREA"]
    assert [r["AVISITN"] for r in score] == ["1", "2", "3"]
    assert [r["AVISIT"] for r in score] == ["2024-01-01", "2024-01-31", "2024-03-01"]
    assert [r["ADT"] for r in score] == ["2024-01-01", "2024-01-31", "2024-03-01"]
    assert [r["ADY"] for r in score] == ["1", "31", "61"]
    assert [_num(r["AVAL"]) for r in score] == pytest.approx([2.0, 1.5, 1.0])
    assert [r["BASE"] for r in score] == ["2.000000"] * 3
    assert [r["CHG"] for r in score] == ["", "-0.500000", "-1.000000"]
    assert [r["ABLFL"] for r in score] == ["Y", "", ""]
    assert [r["ANL01FL"] for r in score] == ["Y", "", "Y"]  # v2: every image flagged
    assert [r["NIMG"] for r in score] == ["2", "1", "1"]
    assert [(r["AVAL"], r["AVALC"], r["CHG"]) for r in klass] == [
        ("2.000000", "moderate", ""), ("1.000000", "mild", "-1.000000"),
        ("1.000000", "mild", "-1.000000")]
    assert {r["PARAM"] for r in klass} == {"Eczema Severity Class"}
    assert [r["AVAL"] for r in area] == ["6.250000", "50.000000", "6.250000"]
    assert [r["CHG"] for r in area] == ["", "43.750000", "0.000000"]
    assert [r["AVALC"] for r in area] == [""] * 3
    # Q1: the first visit has no score, so the baseline is the second; day 1 is still the first
    # visit; the undated visit comes last, with no date and no day.
    q1 = [r for r in rows if r["SUBJID"] == "Q1" and r["PARAMCD"] == "ECZSCORE"]
    assert [(r["AVISITN"], r["ADT"], r["ADY"], r["ABLFL"], r["BASE"], r["CHG"]) for r in q1] == [
        ("2", "2024-01-11", "11", "Y", "2.000000", ""),
        ("3", "", "", "", "2.000000", "-1.000000")]
    assert [r["AVISIT"] for r in q1] == ["2024-01-11", "visit-x"]


def test_dataset_matches_its_dictionary(written: Path) -> None:
    spec = json.loads((written / DICTIONARY_NAME).read_text())
    variables = {v["name"]: v for v in spec["variables"]}
    rows = _csv(written / CSV_NAME)
    assert list(variables) == list(rows[0]) and REQUIRED <= set(variables)
    assert spec["dataset"] == "ADECZ" and len(spec["dataset"]) <= MAX_NAME
    assert spec["records"] == len(rows) == 15
    assert spec["head"]["digest"] == "h" * 64 and spec["head"]["segmenter"]["name"] == (
        "tiny-seggpt")
    for name, v in variables.items():
        assert name.isupper() and len(name) <= MAX_NAME and name[0].isalpha(), name
        assert 0 < len(v["label"]) <= MAX_LABEL and v["label"].isascii(), name
        assert v["description"] and v["type"] in ("Char", "Num"), name
        cells = [r[name] for r in rows]
        if v["type"] == "Num":
            assert v["length"] == 8
            for cell in cells:
                if name == "ADT":
                    assert cell == "" or dt.date.fromisoformat(cell)
                else:
                    assert cell == "" or math.isfinite(float(cell)), (name, cell)
        else:
            assert v["length"] == max(len(c.encode()) for c in cells), name
    for name in ("STUDYID", "USUBJID", "SUBJID", "PARAMCD", "PARAM", "AVISIT", "AVISITN",
                 "AVAL"):
        assert all(r[name] != "" for r in rows), name  # never missing
    assert all(r["ABLFL"] in ("Y", "") and r["ANL01FL"] in ("Y", "") for r in rows)
    params = {p["PARAMCD"]: p for p in spec["parameters"]}
    assert set(params) == {p.paramcd for p in PARAMETERS} == {r["PARAMCD"] for r in rows}
    assert all(len(code) <= 8 for code in params)
    for row in rows:
        assert row["PARAM"] == params[row["PARAMCD"]]["PARAM"]
        assert int(row["PARAMN"]) == params[row["PARAMCD"]]["PARAMN"]
    # One baseline per subject and parameter, and one record per subject, parameter and visit.
    keys = [(r["USUBJID"], r["PARAMCD"], r["AVISITN"]) for r in rows]
    assert len(set(keys)) == len(keys)
    baselines = [(r["USUBJID"], r["PARAMCD"]) for r in rows if r["ABLFL"] == "Y"]
    assert sorted(baselines) == sorted({(r["USUBJID"], r["PARAMCD"]) for r in rows})


def test_transport_file_reads_back_as_the_csv(written: Path) -> None:
    rows = _csv(written / CSV_NAME)
    frame, meta = pyreadstat.read_xport(str(written / XPT_NAME))
    spec = json.loads((written / DICTIONARY_NAME).read_text())
    assert meta.table_name == "ADECZ" and list(frame.columns) == list(COLUMNS)
    assert meta.column_names_to_labels == {v["name"]: v["label"] for v in spec["variables"]}
    assert meta.variable_storage_width == {v["name"]: v["length"] for v in spec["variables"]}
    assert meta.original_variable_types["ADT"] == "DATE9"
    assert len(frame) == len(rows)
    types = {v["name"]: v["type"] for v in spec["variables"]}
    for row, (_, back) in zip(rows, frame.iterrows(), strict=True):
        for name in COLUMNS:
            value = back[name]
            if name == "ADT":
                assert (value.isoformat() if isinstance(value, dt.date) else "") == row[name]
            elif types[name] == "Char":
                assert value == row[name], name
            elif row[name] == "":
                assert math.isnan(value), name
            else:
                assert value == pytest.approx(float(row[name]), abs=1e-6), name
    # A SAS date is the number of days since 1960-01-01 (pandas' reader leaves it a number).
    import pandas as pd

    raw = pd.read_sas(written / XPT_NAME, format="xport", encoding="utf-8")
    assert raw["ADT"].iloc[0] == (dt.date(2024, 1, 1) - SAS_EPOCH).days


def test_cli_refuses_what_other_exports_refuse(trial: None, tmp_path: Path) -> None:
    file = tmp_path / "file.csv"
    file.write_text("x")
    assert _adam(file).exit_code == 2  # a file where the folder should be
    result = CliRunner().invoke(app, ["export", "--format", "adam"])
    assert result.exit_code == 2 and "-o DIR" in result.stderr
    missing = tmp_path / "nope"
    result = _adam(missing, "--patient", "NOPE")
    assert result.exit_code == 2 and "no patient 'NOPE'" in result.stderr
    assert not missing.exists()
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    result = _adam(tmp_path / "link")
    assert result.exit_code == 2 and "symbolic link" in result.stderr
    assert list(target.iterdir()) == []


def test_a_second_export_rewrites_its_files_and_nothing_else(trial: None, tmp_path: Path) -> None:
    # As `export --format dicom-seg` and `report --html`: the folder may hold other files; the
    # export's own are replaced whole.
    out = tmp_path / "adam"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _adam(out, "--patient", "Q1").exit_code == 0
    assert len(_csv(out / CSV_NAME)) == 6
    assert _adam(out).exit_code == 0
    assert len(_csv(out / CSV_NAME)) == 15 and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [CSV_NAME, XPT_NAME, DICTIONARY_NAME, "notes.txt"])


def test_csv_text_is_spreadsheet_safe_and_xpt_verbatim(factory: sessionmaker[Session],
                                                        tmp_path: Path) -> None:
    with factory() as s, s.begin():
        head = make_head(s)
        visit = make_visit(s, make_patient(s, make_study(s, name="=1+1"), "P1"), D0,
                           label="@visit")
        make_prediction(s, make_image(s, visit), head, [0.0, 1.0, 0.0, 0.0])
    out = tmp_path / "adam"
    assert _adam(out).exit_code == 0, "export failed"
    rows = _csv(out / CSV_NAME)
    assert {r["STUDYID"] for r in rows} == {"'=1+1"} and {r["AVISIT"] for r in rows} == {
        "'@visit"}
    assert {r["USUBJID"] for r in rows} == {"'=1+1-P1"}
    frame, _ = pyreadstat.read_xport(str(out / XPT_NAME))
    assert set(frame["USUBJID"]) == {"=1+1-P1"}
    assert _adam(out, "--verbatim").exit_code == 0
    assert {r["STUDYID"] for r in _csv(out / CSV_NAME)} == {"=1+1"}


def test_a_value_too_long_for_a_transport_file_is_refused_not_cut(
        factory: sessionmaker[Session], tmp_path: Path) -> None:
    with factory() as s, s.begin():
        head = make_head(s)
        visit = make_visit(s, make_patient(s, make_study(s, name="S" * 199), "P1"), D0)
        make_prediction(s, make_image(s, visit), head, [0.0, 1.0, 0.0, 0.0])
    out = tmp_path / "adam"
    result = _adam(out)
    assert result.exit_code == 2
    assert "USUBJID of subject 'P1' is 202 bytes" in result.stderr and not out.exists()
