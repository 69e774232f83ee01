"""A CDISC ADaM Basic Data Structure (BDS) dataset of the severity endpoints, per subject and visit.

`eczema-batch export --format adam -o DIR` writes `adecz.csv`, `adecz.xpt` (SAS transport v5,
through pyreadstat) and `adam-dictionary.json` (every variable's name, label, type, length and
meaning, and the parameters). One record per subject x parameter x visit with a value:

- ECZSCORE: the visit's expected severity score, sum(k * p_k) of its mean class-probability vector
  (0..C-1); ECZCLASS: the visit's class (AVAL its number, AVALC its name); ECZAREA: the mean share
  of the image the lesion masks cover, in percent. The visit values are those of `export --level
  visit` (`expected_score`, `severity`, `lesion_area`), read through the same query and trend code.
- AVISITN is the visit's position in the subject's ordered visits (dated ones by date, then the
  undated), AVISIT its label. ADT is the visit date; ADY = ADT - first ADT + 1, the first ADT being
  the subject's first dated visit (no day 0, as in SDTM --DY for days on or after the reference).
- The baseline (ABLFL = "Y") is, per parameter, the subject's first visit with a value: for the
  score and the class, the baseline of the reports. BASE is the baseline's AVAL on every record of
  the subject and parameter; CHG = AVAL - BASE on the records after it, null on the baseline
  (ADaM IG: CHG is for post-baseline records).
- ANL01FL = "Y" except on a visit whose every scored image is flagged for review and not yet
  reviewed (the reports' "all flagged"): its value awaits a rater.

Nothing identifying: STUDYID is the study name, SUBJID the subject code, USUBJID both.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from sqlalchemy.orm import Session

from eczema_batch.errors import UsageError
from eczema_batch.output import OutputFolder
from eczema_batch.report.export import fixed
from eczema_batch.report.queries import (
    HeadInfo,
    ModelRef,
    ReviewThresholds,
    check_scope,
    choose_head,
    iter_patient_visits,
)
from eczema_batch.report.spreadsheet import record_writer, spreadsheet_text
from eczema_batch.report.trends import PatientTrend, TrendRules, VisitScore, patient_trend
from eczema_batch.severity import DEFAULT_CLASSES

#: The dataset's name (SAS: at most 8 characters) and label (at most 40).
DATASET = "ADECZ"
DATASET_LABEL = "Eczema Severity Analysis Dataset"
CSV_NAME = "adecz.csv"
XPT_NAME = "adecz.xpt"
DICTIONARY_NAME = "adam-dictionary.json"
#: SAS transport v5: variable names of at most 8 characters, labels of at most 40, character
#: values of at most 200 bytes.
MAX_NAME, MAX_LABEL, MAX_CHAR = 8, 40, 200
#: A numeric variable's length in a SAS dataset (bytes of a double).
NUM_LENGTH = 8
#: ADT's format in the transport file (SAS date: days since 1960-01-01); CSV writes ISO 8601.
DATE_FORMAT = "DATE9."


@dataclass(frozen=True)
class Variable:
    name: str
    label: str
    #: "Char" or "Num", as SAS names them
    type: str
    description: str
    format: str | None = None


@dataclass(frozen=True)
class Parameter:
    paramcd: str
    param: str
    paramn: int
    unit: str
    description: str


VARIABLES: tuple[Variable, ...] = (
    Variable("STUDYID", "Study Identifier", "Char", "The study's name in the catalogue."),
    Variable("USUBJID", "Unique Subject Identifier", "Char",
             "STUDYID and SUBJID joined by '-'."),
    Variable("SUBJID", "Subject Identifier for the Study", "Char",
             "The study's subject code (never a name or a hospital number)."),
    Variable("PARAMCD", "Parameter Code", "Char", "ECZSCORE, ECZCLASS or ECZAREA: see parameters."),
    Variable("PARAM", "Parameter", "Char", "The parameter's description, with its unit."),
    Variable("PARAMN", "Parameter (N)", "Num", "1 ECZSCORE, 2 ECZCLASS, 3 ECZAREA."),
    Variable("AVISIT", "Analysis Visit", "Char",
             "The visit's label in the catalogue (its ISO date when the visit folder was one)."),
    Variable("AVISITN", "Analysis Visit (N)", "Num",
             "The visit's position in the subject's visits: dated visits by date, then undated "
             "ones by label; 1 = first."),
    Variable("ADT", "Analysis Date", "Num",
             "The visit date: a SAS date (format DATE9.) in the .xpt, ISO 8601 in the CSV; "
             "empty when the visit is undated.", DATE_FORMAT),
    Variable("ADY", "Analysis Relative Day", "Num",
             "ADT - the subject's first visit date + 1 (day 1 is the first visit); empty "
             "without ADT."),
    Variable("AVAL", "Analysis Value", "Num", "The parameter's value at the visit."),
    Variable("AVALC", "Analysis Value (C)", "Char",
             "ECZCLASS: the class name (AVAL is its number); empty for the other parameters."),
    Variable("BASE", "Baseline Value", "Num",
             "AVAL of the subject's baseline record for the parameter, on each of its records."),
    Variable("CHG", "Change from Baseline", "Num",
             "AVAL - BASE after the baseline; empty on the baseline record."),
    Variable("ABLFL", "Baseline Record Flag", "Char",
             "Y on the baseline record: the subject's first visit with a value of the "
             "parameter."),
    Variable("ANL01FL", "Analysis Flag 01", "Char",
             "Y on records for analysis; empty where every scored image of the visit is "
             "flagged for review and none reviewed yet (the value awaits a rater)."),
    Variable("NIMG", "Number of Scored Images in Visit", "Num",
             "Images of the visit the value comes from: with a prediction or a review "
             "(ECZSCORE, ECZCLASS), with a measured lesion area (ECZAREA)."),
)

PARAMETERS: tuple[Parameter, ...] = (
    Parameter("ECZSCORE", "Eczema Expected Severity Score", 1, "score (0-3)",
              "sum(k * p_k) of the visit's mean class-probability vector (an image a rater "
              "reviewed counts as its class): a continuous score from 0 (clear) to C-1."),
    Parameter("ECZCLASS", "Eczema Severity Class", 2, "class",
              "The class of the visit's mean probability vector (its argmax): AVAL the class "
              "number (0 clear, 1 mild, 2 moderate, 3 severe by default), AVALC its name."),
    Parameter("ECZAREA", "Eczema Lesion Area (%)", 3, "%",
              "Mean over the visit's images of the share of the image the lesion mask covers, "
              "in percent."),
)
COLUMNS: tuple[str, ...] = tuple(v.name for v in VARIABLES)
_CHAR = frozenset(v.name for v in VARIABLES if v.type == "Char")
#: Numbers written with fixed decimals in CSV (the others are whole numbers or the date).
_DECIMAL = frozenset({"AVAL", "BASE", "CHG"})


@dataclass
class AdamDataset:
    """The records (one dict per record, keyed by COLUMNS) and the head whose scores they are."""

    records: list[dict[str, Any]]
    head: HeadInfo | None
    classes: tuple[str, ...]

    def lengths(self) -> dict[str, int]:
        """Each variable's length: 8 for numbers, the longest value in UTF-8 bytes for text."""
        out = {}
        for v in VARIABLES:
            if v.type == "Num":
                out[v.name] = NUM_LENGTH
            else:
                out[v.name] = max([len((r[v.name] or "").encode("utf-8"))
                                   for r in self.records] + [1])
        return out


@dataclass(frozen=True)
class AdamFiles:
    csv: str
    xpt: str
    dictionary: str
    records: int
    subjects: int


class AdamValueTooLongError(UsageError):
    """a value is too long for a SAS transport (v5) file"""


def _values(visit: VisitScore, classes: Sequence[str]) -> Iterator[tuple[Parameter, float, str]]:
    score, area = visit.expected_score, visit.lesion_area
    if score is not None:
        yield PARAMETERS[0], score, ""
    if visit.severity is not None:
        k = visit.severity
        yield PARAMETERS[1], float(k), classes[k] if k < len(classes) else str(k)
    if area is not None:
        yield PARAMETERS[2], area * 100.0, ""


def subject_records(study: str, subject: str, trend: PatientTrend,
                    classes: Sequence[str]) -> list[dict[str, Any]]:
    """The BDS records of one subject, sorted by parameter and visit."""
    dates = [vt.visit.visit_date for vt in trend.visits if vt.visit.visit_date is not None]
    first = min(dates) if dates else None
    by_param: dict[str, list[dict[str, Any]]] = {p.paramcd: [] for p in PARAMETERS}
    for vt in trend.visits:
        v = vt.visit
        for param, aval, avalc in _values(v, classes):
            by_param[param.paramcd].append({
                "STUDYID": study, "USUBJID": f"{study}-{subject}", "SUBJID": subject,
                "PARAMCD": param.paramcd, "PARAM": param.param, "PARAMN": param.paramn,
                "AVISIT": v.label, "AVISITN": vt.number, "ADT": v.visit_date,
                "ADY": (v.visit_date - first).days + 1 if v.visit_date and first else None,
                "AVAL": aval, "AVALC": avalc, "BASE": None, "CHG": None, "ABLFL": "",
                "ANL01FL": "" if v.provisional else "Y",
                "NIMG": v.n_area if param.paramcd == "ECZAREA" else v.n_scored,
            })
    records: list[dict[str, Any]] = []
    for param in PARAMETERS:
        rows = by_param[param.paramcd]
        if rows:  # in visit order already: the first record with a value is the baseline
            base = rows[0]["AVAL"]
            rows[0]["ABLFL"] = "Y"
            for i, row in enumerate(rows):
                row["BASE"] = base
                row["CHG"] = None if i == 0 else row["AVAL"] - base
        records.extend(rows)
    return records


def build_adam(
    session: Session,
    *,
    rules: TrendRules,
    thresholds: ReviewThresholds,
    study: str | None = None,
    patient: str | None = None,
    head_id: int | None = None,
) -> AdamDataset:
    """The dataset of the chosen head's scores (`export`'s head: the active one by default)."""
    check_scope(session, study=study, patient=patient)
    head = choose_head(session, head_id=head_id)
    classes = head.classes if head else DEFAULT_CLASSES
    records: list[dict[str, Any]] = []
    for pv in iter_patient_visits(session, head=head, thresholds=thresholds, study=study,
                                  patient=patient, sites=False):
        records.extend(subject_records(pv.key.study, pv.key.patient,
                                       patient_trend(pv.visits, rules), classes))
    for record in records:
        for name in ("STUDYID", "USUBJID", "AVISIT", "AVALC"):
            size = len((record[name] or "").encode("utf-8"))
            if size > MAX_CHAR:
                raise AdamValueTooLongError(
                    f"{name} of subject {record['SUBJID']!r} is {size} bytes long; a SAS "
                    f"transport (v5) variable holds at most {MAX_CHAR}: shorten the study name "
                    "or visit label, or use `export --level visit` (CSV)")
    return AdamDataset(records, head, classes)


def _model(ref: ModelRef | None) -> dict[str, str] | None:
    return None if ref is None else {"name": ref.name, "digest": ref.digest,
                                     "precision": ref.precision}


def dictionary(dataset: AdamDataset) -> dict[str, Any]:
    """What `adam-dictionary.json` holds: the dataset, its variables and its parameters."""
    lengths = dataset.lengths()
    head = dataset.head
    return {
        "dataset": DATASET, "label": DATASET_LABEL, "structure": "ADaM BDS",
        "files": {"csv": CSV_NAME, "xpt": XPT_NAME},
        "keys": ["STUDYID", "USUBJID", "PARAMCD", "AVISITN"],
        "records": len(dataset.records),
        # A transport file records no encoding: its text is UTF-8 (subject codes are ASCII).
        "encoding": "utf-8",
        # What made the numbers, as the identity columns of the other exports say.
        "head": None if head is None else {
            "name": head.name, "digest": head.digest,
            "embedder": _model(head.embedder), "segmenter": _model(head.segmenter),
        },
        "classes": list(dataset.classes),
        "variables": [
            {"name": v.name, "label": v.label, "type": v.type, "length": lengths[v.name],
             "format": v.format, "description": v.description} for v in VARIABLES
        ],
        "parameters": [
            {"PARAMCD": p.paramcd, "PARAM": p.param, "PARAMN": p.paramn, "unit": p.unit,
             "description": p.description} for p in PARAMETERS
        ],
    }


def _csv_cell(name: str, value: Any, safe: Callable[[Any], Any]) -> Any:
    if value is None:
        return ""
    if name in _CHAR:
        return safe(value)
    if name in _DECIMAL:
        return fixed(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def write_csv(dataset: AdamDataset, out: TextIO, *, verbatim: bool = False) -> None:
    """The records as CSV: ISO dates, 6 decimals for AVAL, BASE and CHG, empty for missing.

    Text that a spreadsheet would run as a formula gets a leading `'` unless `verbatim`.
    """
    safe: Callable[[Any], Any] = (lambda v: v) if verbatim else spreadsheet_text
    write = record_writer(out)
    write(COLUMNS)
    for record in dataset.records:
        write([_csv_cell(name, record[name], safe) for name in COLUMNS])


def xpt_bytes(dataset: AdamDataset) -> bytes:
    """The records as a SAS transport (XPORT v5) file, written by pyreadstat."""
    import pandas as pd
    import pyreadstat

    frame = pd.DataFrame({
        v.name: pd.Series([r[v.name] or "" for r in dataset.records], dtype=object)
        if v.type == "Char" else
        pd.Series([r[v.name] for r in dataset.records],
                  dtype=object if v.format == DATE_FORMAT else "float64")
        for v in VARIABLES
    })
    with tempfile.TemporaryDirectory(prefix="eczema-batch-adam-") as tmp:
        path = os.path.join(tmp, XPT_NAME)
        pyreadstat.write_xport(
            frame, path, file_label=DATASET_LABEL,
            column_labels={v.name: v.label for v in VARIABLES}, table_name=DATASET,
            file_format_version=5,
            variable_format={v.name: v.format for v in VARIABLES if v.format})
        with open(path, "rb") as handle:
            return handle.read()


def write_adam(dataset: AdamDataset, folder: OutputFolder, *, verbatim: bool = False
               ) -> AdamFiles:
    """Write the CSV, the transport file and the dictionary into `folder`, each whole."""
    data = xpt_bytes(dataset)  # first: a writer's error leaves no file of this export behind
    with folder.open_text(CSV_NAME) as out:
        write_csv(dataset, out, verbatim=verbatim)
    folder.write_bytes(XPT_NAME, data)
    folder.write_text(DICTIONARY_NAME, json.dumps(dictionary(dataset), indent=2) + "\n")
    return AdamFiles(
        csv=str(folder.path / CSV_NAME), xpt=str(folder.path / XPT_NAME),
        dictionary=str(folder.path / DICTIONARY_NAME), records=len(dataset.records),
        subjects=len({r["USUBJID"] for r in dataset.records}),
    )
