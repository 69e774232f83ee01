"""Who a file belongs to, and which study: identifiers normalised and validated, a hospital
PatientID never stored, the sources of codes and dates shown, one study per folder.

Ingest runs against a real catalogue (SQLite and PostgreSQL), on real files, through the real CLI
where the user would see the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Base, Image, Patient, Study, Visit
from eczema_batch.config import get_settings
from eczema_batch.identifiers import (
    IdentifierError,
    check_subject_code,
    key_check,
    normalise_code,
    normalise_label,
    pseudonym,
)
from eczema_batch.ingest.manifest import read_manifest
from tests.factories import write_dicom, write_jpeg, write_manifest
from tests.test_cli import invoke

KEY = "a-secret-the-study-keeps-0123456789"
MRN = "MRN-0042"


def catalogue_text(factory: sessionmaker[Session]) -> str:
    """Every value of every table, as text: what a copy of the catalogue would give away."""
    with factory() as session:
        return "\n".join(
            repr(tuple(row))
            for table in Base.metadata.sorted_tables
            for row in session.execute(text(f"SELECT * FROM {table.name}"))
        )


def visits_of(factory: sessionmaker[Session]) -> dict[tuple[str, str], Visit]:
    with factory() as session:
        return {(v.patient.subject_code, v.label): v for v in session.scalars(select(Visit))}


# --- the rules, on inputs made up to break them ---------------------------------------------------


@pytest.mark.parametrize("raw, code", [
    ("P001", "P001"), ("Ｐ００１", "P001"), (" P001 ", "P001"), ("S‐017", "S-017"),
    ("S−017", "S-017"), ("P.01", "P.01"), ("p_01-a", "p_01-a"),
])
def test_codes_are_normalised(raw: str, code: str) -> None:
    assert normalise_code(raw) == code
    assert check_subject_code(raw) is None


@pytest.mark.parametrize("raw", [
    "../etc", "a/b", "..", "a..b", "P001.", ".P001", "P\x00", "P\x1b[31m", "P\n001", "Jane Doe",
    "", "   ", "P" * 65, "Ｐ/１", "P\u200b\u200b/", "Doe^Jane",
])
def test_codes_that_could_be_paths_or_names_are_refused(raw: str) -> None:
    with pytest.raises(IdentifierError) as caught:
        normalise_code(raw)
    assert raw.strip() == "" or raw not in str(caught.value)  # the value is never quoted
    assert check_subject_code(raw) is not None


@pytest.mark.parametrize("raw, label", [
    ("2024‐01‐15", "2024-01-15"), ("２０２４-０１-１５", "2024-01-15"), ("visit\u200b1", "visit1"),
    ("visit\u00a0 1", "visit 1"), ("  week  4 ", "week 4"),
])
def test_labels_are_normalised(raw: str, label: str) -> None:
    assert normalise_label(raw) == label


@pytest.mark.parametrize("raw, why", [
    ("   ", "is blank"), ("\u200b", "is blank"), ("v\x00", "control"), ("v\tisit", "control"),
    ("x" * 129, "longer than 128"),
])
def test_labels_that_cannot_name_a_visit_are_refused(raw: str, why: str) -> None:
    with pytest.raises(IdentifierError, match=why):
        normalise_label(raw)


def test_pseudonyms_are_keyed_stable_and_reveal_nothing() -> None:
    key, other = KEY.encode(), b"another-key-of-enough-length"
    code = pseudonym(key, MRN)
    assert code == pseudonym(key, f" {MRN} ") and normalise_code(code) == code
    assert code.startswith("PID-") and "0042" not in code
    assert code != pseudonym(other, MRN) and code != pseudonym(key, "MRN-0043")
    assert key_check(key) != key_check(other) and code[4:] not in key_check(key)


def test_manifest_codes_are_normalised_and_path_like_ones_rejected(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, [
        {"path": "a.jpg", "patient": "Ｓ００１"}, {"path": "b.jpg", "patient": "../../etc"},
        {"path": "c.jpg", "patient": "S/001"}, {"path": "d.jpg", "patient": "S\x01"},
    ])
    manifest = read_manifest(path)
    assert manifest.rows["a.jpg"].patient == "S001"
    assert set(manifest.problems) == {"b.jpg", "c.jpg", "d.jpg"}
    assert "\x01" not in manifest.problems["d.jpg"]  # shown escaped, never raw


# --- who: PatientID, ClinicalTrialSubjectID, folders ----------------------------------------------


def test_hospital_patient_id_is_never_the_subject_code(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    root = tmp_path / "study"
    write_dicom(root / "P010" / "2024-03-01" / "a.dcm", PatientID="ID1", StudyDate="20240301")
    write_dicom(root / "P010" / "2024-03-01" / "b.dcm", seed=1, PatientID=MRN)
    code, out, err = invoke("ingest", str(root), "--json")
    assert code == 0, err
    with factory() as session:
        patients = session.execute(select(Patient.subject_code, Patient.code_source)).all()
    assert patients == [("P010", "folder")]
    assert "ID1" not in catalogue_text(factory) and MRN not in catalogue_text(factory)
    assert (invoke("report", "--patient", "P010")[0], invoke("report", "--patient", "ID1")[0]) == (
        0, 2)


def test_trial_subject_id_wins_and_disagreements_are_said(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    root = tmp_path / "study"
    write_dicom(root / "P001" / "2024-01-15" / "a.dcm", ClinicalTrialSubjectID="S-017",
                StudyDate="20240116", PatientID=MRN)
    write_jpeg(root / "P002" / "2024-01-20" / "b.jpg")
    code, out, err = invoke("ingest", str(root), "--json")
    assert code == 0, err
    warnings = json.loads(out)["warnings"]
    assert ("P001/2024-01-15: DICOM ClinicalTrialSubjectID says patient S-017, the folder says "
            "P001: catalogued as S-017 (1 file)") in warnings
    assert ("P001/2024-01-15: DICOM StudyDate says 2024-01-16, the folder name says 2024-01-15: "
            "dated 2024-01-16 (1 file)") in warnings
    assert "S-017" in err and "2024-01-16" in err  # also said on stderr
    assert set(visits_of(factory)) == {("S-017", "2024-01-16"), ("P002", "2024-01-20")}

    code, out, err = invoke("status", "--sources", "--json")
    assert code == 0, err
    [study] = json.loads(out)["sources"]
    assert study["codes"] == {"ClinicalTrialSubjectID": 1, "folder": 1}
    assert study["dates"] == {"StudyDate": 1, "folder": 1}
    by_code = {p["patient"]: p for p in study["patients"]}
    assert by_code["S-017"]["code_source"] == "ClinicalTrialSubjectID"
    assert by_code["S-017"]["visits"] == [
        {"visit": "2024-01-16", "date": "2024-01-16", "date_source": "StudyDate", "images": 1}]
    assert {n["note"].split(":")[0] for n in study["notes"]} == {
        "DICOM ClinicalTrialSubjectID says patient S-017, the folder says P001",
        "DICOM StudyDate says 2024-01-16, the folder name says 2024-01-15"}
    assert MRN not in out + err

    code, _, err = invoke("status", "--sources")
    assert code == 0
    assert "ClinicalTrialSubjectID" in err and "StudyDate" in err and "at ingest" in err
    assert "codes from: ClinicalTrialSubjectID 1, folder 1" in err


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_unusable_subject_tags_are_not_used_and_not_quoted(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    root = tmp_path / "study"
    write_dicom(root / "P001" / "v1" / "a.dcm", ClinicalTrialSubjectID="../../Doe^Jane")
    write_dicom(root / "P002" / "v1" / "b.dcm", seed=1, ClinicalTrialSubjectID="S1\\S2")
    write_dicom(root / "P003" / "v1" / "c.dcm", seed=2, ClinicalTrialSubjectID="S\x1b[2J",
                ClinicalTrialTimePointID="week\x004")
    code, out, err = invoke("ingest", str(root), "--json")
    assert code == 0, err
    with factory() as session:
        assert set(session.scalars(select(Patient.subject_code))) == {"P001", "P002", "P003"}
    for secret in ("Doe", "S1", "S2", "\x1b", "week"):
        assert secret not in out and secret not in err
    warnings = "\n".join(json.loads(out)["warnings"])
    assert "P001/v1: DICOM ClinicalTrialSubjectID is not a subject code" in warnings
    assert "P002/v1: DICOM ClinicalTrialSubjectID has 2 values, a subject has one" in warnings
    assert "P003/v1: DICOM ClinicalTrialSubjectID has control characters" in warnings
    assert "P003/v1: DICOM ClinicalTrialTimePointID has control characters" in warnings


def test_patient_id_pseudonyms_are_opted_into_with_a_key(
    tmp_path: Path, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "study"
    write_dicom(root / "P010" / "2024-03-01" / "a.dcm", PatientID=MRN, StudyDate="20240301")
    code, _, err = invoke("ingest", str(root), "--patient-id-pseudonyms")
    assert code == 2 and "ECZEMA_BATCH_PSEUDONYM_KEY" in err
    monkeypatch.setenv("ECZEMA_BATCH_PSEUDONYM_KEY", "short")
    get_settings.cache_clear()
    code, _, err = invoke("ingest", str(root), "--patient-id-pseudonyms")
    assert code == 2 and "shorter than 16" in err
    with factory() as session:
        assert session.scalars(select(Study)).all() == []  # refused before anything was written

    key_file = tmp_path / "pseudonym.key"
    key_file.write_text(KEY + "\n")
    monkeypatch.delenv("ECZEMA_BATCH_PSEUDONYM_KEY")
    monkeypatch.setenv("ECZEMA_BATCH_PSEUDONYM_KEY_FILE", str(key_file))
    get_settings.cache_clear()
    code, out, err = invoke("-v", "ingest", str(root), "--patient-id-pseudonyms", "--json")
    assert code == 0, err
    expected = pseudonym(KEY.encode(), MRN)
    with factory() as session:
        assert session.execute(select(Patient.subject_code, Patient.code_source)).all() == [
            (expected, "PatientID-HMAC")]
    assert MRN not in catalogue_text(factory) and KEY not in catalogue_text(factory)
    assert MRN not in out + err and KEY not in out + err

    # The study now keys on PatientID: new files get the same codes, with the same key only.
    write_dicom(root / "P010" / "2024-04-01" / "b.dcm", seed=1, PatientID=MRN)
    code, _, err = invoke("ingest", str(root))
    assert code == 2 and "--patient-id-pseudonyms" in err
    key_file.write_text("another-key-0123456789abcdef\n")
    get_settings.cache_clear()
    code, _, err = invoke("ingest", str(root), "--patient-id-pseudonyms")
    assert code == 2 and "not the one study 'study' was ingested with" in err
    key_file.write_text(KEY + "\n")
    get_settings.cache_clear()
    assert invoke("ingest", str(root), "--patient-id-pseudonyms")[0] == 0
    with factory() as session:
        assert set(session.scalars(select(Patient.subject_code))) == {expected}
        assert session.scalar(select(Image.id).where(Image.path.like("%b.dcm"))) is not None


# --- when: visit labels ---------------------------------------------------------------------------


def test_look_alike_visit_folders_are_one_visit_and_long_names_are_never_cut(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P001" / "2024-01-15" / "a.jpg", seed=1)
    write_jpeg(root / "P001" / "2024‐01‐15" / "b.jpg", seed=2)  # U+2010 hyphens
    write_jpeg(root / "P001" / "２０２４-０２-０１" / "c.jpg", seed=3)  # fullwidth digits
    write_jpeg(root / "P001" / "visit\u200b1" / "d.jpg", seed=4)
    write_jpeg(root / "P001" / "visit1" / "e.jpg", seed=5)
    long = "baseline visit " + "x" * 120
    write_jpeg(root / "P001" / f"{long}-A" / "f.jpg", seed=6)
    write_jpeg(root / "P001" / f"{long}-B" / "g.jpg", seed=7)
    write_jpeg(root / "P001" / "   " / "h.jpg", seed=8)
    write_jpeg(root / "Ｐ００１" / "visit1" / "i.jpg", seed=9)
    code, out, err = invoke("ingest", str(root), "--json")
    assert code == 3, err
    payload = json.loads(out)
    visits = visits_of(factory)
    assert set(visits) == {("P001", "2024-01-15"), ("P001", "2024-02-01"), ("P001", "visit1")}
    assert visits[("P001", "2024-01-15")].date_source == "folder"
    with factory() as session:
        per_visit = dict(session.execute(
            select(Visit.label, func.count(Image.id)).join(Image).group_by(Visit.label)).all())
    assert per_visit == {"2024-01-15": 2, "2024-02-01": 1, "visit1": 3}
    reasons = {r["path"]: r["reason"] for r in payload["rejected"]}
    assert set(reasons) == {f"P001/{long}-A/f.jpg", f"P001/{long}-B/g.jpg", "P001/   /h.jpg"}
    assert "longer than 128 characters" in reasons[f"P001/{long}-A/f.jpg"]
    assert "is blank" in reasons["P001/   /h.jpg"]
    warnings = "\n".join(payload["warnings"])
    assert "visit folders '2024-01-15', '2024\\u201001\\u201015' of patient P001" in warnings
    assert ("patient folders 'P001', '\\uff30\\uff10\\uff10\\uff11' are one patient, P001"
            in warnings)


# --- which study ----------------------------------------------------------------------------------


def test_two_folders_with_one_name_are_two_studies_unless_moved(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    site_a, site_b = tmp_path / "siteA" / "trial", tmp_path / "siteB" / "trial"
    write_jpeg(site_a / "P001" / "2024-01-15" / "a.jpg", seed=1)
    write_jpeg(site_b / "P001" / "2024-01-15" / "b.jpg", seed=2)
    assert invoke("ingest", str(site_a))[0] == 0
    code, _, err = invoke("ingest", str(site_b))
    assert code == 2
    assert f"study 'trial' was catalogued from {site_a.resolve()}, not {site_b.resolve()}" in err
    assert "--moved" in err and "--study NAME" in err
    with factory() as session:
        assert session.execute(select(Study.name, Study.root)).all() == [
            ("trial", str(site_a.resolve()))]
        assert len(session.scalars(select(Image)).all()) == 1  # nothing of siteB's went in
    assert invoke("ingest", str(site_b), "--study", "trial-siteB")[0] == 0
    with factory() as session:
        patients = session.execute(
            select(Study.name, Patient.subject_code).join(Patient).order_by(Study.name)).all()
    assert patients == [("trial", "P001"), ("trial-siteB", "P001")]  # two patients, not one

    moved = tmp_path / "archive" / "trial"
    site_a.rename(tmp_path / "siteA" / "gone")
    moved.parent.mkdir()
    (tmp_path / "siteA" / "gone").rename(moved)
    code, out, err = invoke("ingest", str(moved), "--moved", "--json")
    assert code == 0, err
    assert json.loads(out)["already_catalogued"] == 1
    with factory() as session:
        assert session.scalar(select(Study.root).where(Study.name == "trial")) == str(
            moved.resolve())


@pytest.mark.parametrize("name", ["tri\x00al", "  ", "x" * 201])
def test_a_study_name_that_cannot_be_one_is_refused(tmp_path: Path, db_url: str, name: str
                                                     ) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P001" / "v1" / "a.jpg")
    code, _, err = invoke("ingest", str(root), "--study", name)
    assert code == 2 and "the study name" in err and "--study NAME" in err
