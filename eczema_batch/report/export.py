"""Tidy rows for statisticians: one row per image, visit or patient, as CSV or JSON.

The columns are a contract (README, "Reports and exports"; tests pin them): add new ones at the
end, never rename. There is no identifying data (subject codes only, no names, no file paths, no
free-text notes). Rows stream from the catalogue one patient at a time.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from sqlalchemy.orm import Session

from eczema_batch.catalogue.labels import REVIEW_REPEAT
from eczema_batch.imaging.skintone import skin_tone
from eczema_batch.report.queries import (
    HeadInfo,
    ImageRecord,
    LabelRecord,
    ModelRef,
    PatientVisits,
    ReviewThresholds,
    check_scope,
    choose_head,
    flag_reasons,
    iter_image_labels,
    iter_image_records,
    iter_patient_visits,
    model_refs,
)
from eczema_batch.report.spreadsheet import FORMULA_START, record_writer, spreadsheet_text
from eczema_batch.report.trends import (
    PatientTrend,
    TrendRules,
    VisitTrend,
    expected_score,
    patient_trend,
)
from eczema_batch.severity import DEFAULT_CLASSES

Level = Literal["image", "visit", "patient"]
LEVELS: tuple[Level, ...] = ("image", "visit", "patient")
#: csv and json: rows of a level; dicom-seg: the masks (report/dicomseg.py); adam: a CDISC ADaM
#: dataset of the visit endpoints (report/adam.py).
FORMATS = ("csv", "json", "dicom-seg", "adam")
#: Decimals of probabilities, scores and slopes (a millionth of a class is noise).
DECIMALS = 6
_FIXED = f".{DECIMALS}f"

#: Appended to every level: which head scored the rows and the models its features came from.
IDENTITY_COLUMNS = ("head", "head_digest", "embedder", "embedder_digest", "segmenter",
                    "segmenter_digest", "segmenter_precision")
#: The level columns that hold text (names, labels, statuses): in CSV for a spreadsheet, a value of
#: these that would start a formula is neutralised (report/spreadsheet.py). Every other column is a
#: number, a date or a boolean eczema-batch formats itself; the identity columns are all text.
TEXT_COLUMNS = frozenset({
    "study", "patient", "visit", "body_site", "body_sites", "format", "severity_class",
    "review_status", "review_reasons", "status", "code_source", "date_source", "reference_class",
    "reference_source", "reference_rater", "rater_labels", "device", "skin_tone",
    "skin_tone_source", "quality_flag",
})
#: `{p}` expands to one p_<class> column per class of the head (p_clear ... p_severe).
_LEVEL_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": (
        "study", "patient", "visit", "visit_number", "visit_date", "days_from_baseline",
        "image_id", "body_site", "format", "severity", "severity_class", "{p}", "expected_score",
        "predicted_severity", "reviewed_severity", "change_from_baseline", "review_status",
        "review_reasons", "prompt_similarity",
    ),
    "visit": (
        "study", "patient", "visit", "visit_number", "visit_date", "days_from_baseline",
        "body_sites", "n_images", "n_scored", "n_flagged", "n_reviewed", "severity",
        "severity_class", "{p}", "expected_score", "worst_severity", "baseline",
        "change_from_baseline", "change_from_previous", "class_change_from_baseline",
        "review_status",
    ),
    "patient": (
        "study", "patient", "n_visits", "n_scored_visits", "n_images", "n_flagged", "n_reviewed",
        "baseline_date", "baseline_severity", "baseline_score", "last_date", "last_severity",
        "last_score", "days_followed", "change_from_baseline", "class_change_from_baseline",
        "slope_per_30d", "slope_ci_low", "slope_ci_high", "slope_n", "status", "responder",
        "review_status",
    ),
}


#: Columns added after the identities (2026-11: what statisticians asked for), appended so that
#: every earlier column keeps its place: where each code and date came from, the lesion area, and
#: per image its reference label and every rater's label.
APPENDED_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("code_source", "date_source", "lesion_area", "reference_severity",
              "reference_class", "reference_source", "reference_rater", "n_labels", "n_raters",
              "rater_labels", "device", "fitzpatrick", "skin_ita", "skin_tone",
              "skin_tone_source", "quality_flag"),
    "visit": ("code_source", "date_source", "lesion_area"),
    "patient": ("code_source",),
}


def columns(level: Level, classes: Sequence[str] = DEFAULT_CLASSES) -> list[str]:
    out: list[str] = []
    for name in _LEVEL_COLUMNS[level]:
        if name == "{p}":
            out.extend(f"p_{c}" for c in classes)
        else:
            out.append(name)
    return out + list(IDENTITY_COLUMNS) + list(APPENDED_COLUMNS[level])


#: A row: the level's own cells, the identity cells (one tuple object per head and segmenter,
#: repeated on every row: the CSV writer renders it once), then the appended cells.
Row = tuple[list[Any], tuple[Any, ...], list[Any]]


@dataclass
class ExportResult:
    level: Level
    columns: list[str]
    rows: int
    head: HeadInfo | None


class _Rows:
    """Builds rows (cells aligned with `columns(level)`, identity apart) for one head.

    `number` writes probabilities, scores and slopes: rounded floats for JSON, fixed-decimal text
    for CSV (formatting a float once is a third of the cost of rounding it and letting the csv
    module format it again, and the visit export writes 700,000 of them per 100,000 visits).
    """

    def __init__(self, head: HeadInfo | None, refs: dict[int, ModelRef],
                 thresholds: ReviewThresholds, number: Callable[[float | None], Any]) -> None:
        self.head, self.refs, self.thresholds = head, refs, thresholds
        self.classes = head.classes if head else DEFAULT_CLASSES
        self.number = number
        self._identity_cache: dict[int | None, tuple[Any, ...]] = {}

    def identity(self, segmenter_id: int | None) -> tuple[Any, ...]:
        cached = self._identity_cache.get(segmenter_id)
        if cached is None:
            head, emb = self.head, self.head.embedder if self.head else None
            seg = self.refs.get(segmenter_id) if segmenter_id is not None else None
            cached = (head.name if head else None, head.digest if head else None,
                      emb.name if emb else None, emb.digest if emb else None,
                      seg.name if seg else None, seg.digest if seg else None,
                      seg.precision if seg else None)
            self._identity_cache[segmenter_id] = cached
        return cached

    def class_name(self, k: int | None) -> str | None:
        if k is None:
            return None
        return self.classes[k] if k < len(self.classes) else str(k)

    def probs(self, p: Sequence[float] | None) -> list[Any]:
        if not p:
            return [None] * len(self.classes)
        if self.number is fixed:  # probabilities are never negative: format them directly
            return [format(x, _FIXED) for x in p]
        number = self.number
        return [number(x) for x in p]

    def visit(self, pv: PatientVisits, trend: PatientTrend, vt: VisitTrend) -> Row:
        v, number = vt.visit, self.number
        return [
            pv.key.study, pv.key.patient, v.label, vt.number, v.visit_date, vt.days_from_baseline,
            ";".join(v.body_sites), v.n_images, v.n_scored, v.n_flagged, v.n_reviewed,
            v.severity, self.class_name(v.severity), *self.probs(v.probabilities),
            number(v.expected_score), v.worst_severity, vt.is_baseline,
            number(vt.change_from_baseline), number(vt.change_from_previous),
            vt.class_change_from_baseline, v.review_status,
        ], self.identity(pv.segmenter_ids.get(v.visit_id)), [
            pv.code_source, v.date_source, number(v.lesion_area),
        ]

    def patient(self, pv: PatientVisits, trend: PatientTrend) -> Row:
        base, last, slope, number = trend.baseline, trend.last, trend.slope, self.number
        n_images = sum(v.visit.n_images for v in trend.visits)
        days = None
        if base and last and base.visit.visit_date and last.visit.visit_date:
            days = (last.visit.visit_date - base.visit.visit_date).days
        pending = trend.n_flagged
        last_seg = pv.segmenter_ids.get(trend.visits[-1].visit.visit_id) if trend.visits else None
        return [
            pv.key.study, pv.key.patient, len(trend.visits), trend.scored_visits, n_images,
            pending, trend.n_reviewed,
            base.visit.visit_date if base else None, base.visit.severity if base else None,
            number(base.visit.expected_score) if base else None,
            last.visit.visit_date if last else None, last.visit.severity if last else None,
            number(last.visit.expected_score) if last else None, days,
            number(trend.change_from_baseline), trend.class_change_from_baseline,
            number(slope.per_30_days) if slope else None,
            number(slope.ci_low) if slope else None,
            number(slope.ci_high) if slope else None, slope.n if slope else None,
            trend.status, trend.responder,
            "pending" if pending else ("reviewed" if trend.n_reviewed else "none"),
        ], self.identity(last_seg), [pv.code_source]

    def image(self, pv: PatientVisits, trend: PatientTrend, visit: VisitTrend,
              record: ImageRecord, labels: Sequence[LabelRecord]) -> Row:
        effective, number = record.effective, self.number
        score = expected_score(effective) if effective else None
        base = trend.baseline.visit.expected_score if trend.baseline else None
        reasons = flag_reasons(record, self.thresholds)
        status = "reviewed" if record.reviewed is not None else ("pending" if reasons else "none")
        return [
            pv.key.study, pv.key.patient, visit.visit.label, visit.number, visit.visit.visit_date,
            visit.days_from_baseline, record.image_id, record.body_site, record.format,
            record.severity, self.class_name(record.severity), *self.probs(effective),
            number(score), record.predicted, record.reviewed,
            None if score is None or base is None else number(score - base),
            status, "; ".join(reasons) or None, number(record.prompt_similarity),
        ], self.identity(record.segmenter_id), [
            record.code_source, record.date_source, number(record.lesion_area),
            *self.labels(labels), record.device, record.fitzpatrick,
            None if record.skin_ita is None else round(record.skin_ita, 2),
            *skin_tone(record.fitzpatrick, record.skin_ita), record.quality_flag,
        ]

    def labels(self, labels: Sequence[LabelRecord]) -> list[Any]:
        """The reference label (the newest: `queries.iter_image_labels`) and every label."""
        # A blinded repeat (catalogue.labels) is listed but is never the reference nor a rater.
        own = [lb for lb in labels if lb.source != REVIEW_REPEAT]
        if not own:
            return [None, None, None, None, 0, 0, None]
        ref = own[-1]
        raters = {(lb.source, lb.rater) for lb in own}
        every = "; ".join(
            f"{lb.source}:{lb.rater}={lb.severity}" if lb.rater else f"{lb.source}={lb.severity}"
            for lb in labels)
        return [ref.severity, self.class_name(ref.severity), ref.source, ref.rater, len(labels),
                len(raters), every]


def iter_rows(
    session: Session,
    *,
    level: Level,
    head: HeadInfo | None,
    rules: TrendRules,
    thresholds: ReviewThresholds,
    study: str | None = None,
    patient: str | None = None,
    number: Callable[[float | None], Any] | None = None,
) -> Iterator[Row]:
    """Rows of `level`, patient by patient (cells + identity = `columns(level, classes)`).

    `number` formats probabilities, scores and slopes (default: floats rounded to DECIMALS).
    """
    build = _Rows(head, model_refs(session), thresholds, number or rounded)
    groups = iter_patient_visits(session, head=head, thresholds=thresholds, study=study,
                                 patient=patient)
    if level == "visit":
        for pv in groups:
            trend = patient_trend(pv.visits, rules)
            for vt in trend.visits:
                yield build.visit(pv, trend, vt)
        return
    if level == "patient":
        for pv in groups:
            yield build.patient(pv, patient_trend(pv.visits, rules))
        return
    # Images: two more cursors (images, labels), in the same patient order, merged with the
    # visit aggregates.
    records = iter_image_records(session, head=head, study=study, patient=patient)
    pending: ImageRecord | None = next(records, None)
    all_labels = iter_image_labels(session, study=study, patient=patient)
    label: LabelRecord | None = next(all_labels, None)
    for pv in groups:
        trend = patient_trend(pv.visits, rules)
        by_visit = {vt.visit.visit_id: vt for vt in trend.visits}
        ordered: list[tuple[VisitTrend, ImageRecord]] = []
        while pending is not None and pending.patient_id == pv.key.patient_id:
            ordered.append((by_visit[pending.visit_id], pending))
            pending = next(records, None)
        labels: dict[int, list[LabelRecord]] = {}
        while label is not None and label.patient_id == pv.key.patient_id:
            labels.setdefault(label.image_id, []).append(label)
            label = next(all_labels, None)
        ordered.sort(key=lambda pair: (pair[0].number, pair[1].image_id))
        for vt, record in ordered:
            yield build.image(pv, trend, vt, record, labels.get(record.image_id, ()))


def rounded(value: float | None) -> float | None:
    """JSON's numbers: floats rounded to DECIMALS."""
    return None if value is None else round(value, DECIMALS)


def fixed(value: float | None) -> str | None:
    """CSV's numbers: exactly DECIMALS decimals ("0.700000"), and no negative zero."""
    if value is None:
        return None
    text = format(value, _FIXED)
    return text[1:] if text[0] == "-" and not text.strip("-0.") else text


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.date) else value


def write_csv(rows: Iterable[Row], header: Sequence[str], out: TextIO, *,
              verbatim: bool = False) -> int:
    """CSV: empty for no value, true/false as True/False (pandas and R read both), ISO dates.

    Text cells that a spreadsheet would run as a formula get a leading `'` unless `verbatim`;
    a cell holding CR or LF is quoted (report/spreadsheet.py). Only the text columns can hold
    either: the rest are numbers, dates and booleans formatted here. The identity cells are the
    same on nearly every row, and their 64-character digests were the csv module's costliest
    cells: each distinct identity is rendered once and written after the row's own cells.
    """
    safe: Callable[[Any], Any] = (lambda v: v) if verbatim else spreadsheet_text
    record_writer(out)([safe(h) for h in header])
    start = header.index(IDENTITY_COLUMNS[0])
    text_at = [i for i, name in enumerate(header[:start]) if name in TEXT_COLUMNS]
    after = header[start + len(IDENTITY_COLUMNS):]
    text_after = [i for i, name in enumerate(after) if name in TEXT_COLUMNS]
    # The plain writer ends a record with the "," before its identity and quotes no CR or LF;
    # a row whose text holds either takes the slower writer that does.
    plain: Callable[[Iterable[Any]], Any] = csv.writer(out, lineterminator=",").writerow
    quoting = record_writer(out, end=",")
    # The appended cells end the record; the csv module quotes a cell holding its own CRLF.
    last = record_writer(out)
    write = out.write
    rendered: dict[tuple[Any, ...], str] = {}
    count = 0
    for cells, identity, extra in rows:
        suffix = rendered.get(identity)
        if suffix is None:
            line = io.StringIO()
            record_writer(line, end=",")([safe(v) for v in identity])
            suffix = rendered[identity] = line.getvalue()
        writerow = plain
        for i in text_at:
            value = cells[i]
            if value and (value[0] in FORMULA_START or "\n" in value or "\r" in value):
                cells[i] = safe(value)
                if "\n" in value or "\r" in value:
                    writerow = quoting
        writerow(cells)
        write(suffix)
        for i in text_after:
            extra[i] = safe(extra[i])
        last(extra)
        count += 1
    return count


def write_json(rows: Iterable[Row], header: Sequence[str], out: TextIO) -> int:
    """A JSON array of objects, written as it streams (one object per line)."""
    out.write("[")
    count = 0
    for cells, identity, extra in rows:
        out.write(",\n" if count else "\n")
        values = itertools.chain(cells, identity, extra)
        out.write(json.dumps({k: _json_value(v) for k, v in zip(header, values, strict=True)}))
        count += 1
    out.write("\n]\n" if count else "]\n")
    return count


def export_table(
    session: Session,
    out: TextIO,
    *,
    level: Level = "visit",
    fmt: Literal["csv", "json"] = "csv",
    rules: TrendRules,
    thresholds: ReviewThresholds,
    study: str | None = None,
    patient: str | None = None,
    head_id: int | None = None,
    verbatim: bool = False,
) -> ExportResult:
    """Write the rows of `level` to `out`; an unknown patient raises before anything is written.

    CSV text cells that would start a formula are neutralised unless `verbatim`; JSON is verbatim.
    """
    check_scope(session, study=study, patient=patient)
    head = choose_head(session, head_id=head_id)
    header = columns(level, head.classes if head else DEFAULT_CLASSES)
    rows = iter_rows(session, level=level, head=head, rules=rules, thresholds=thresholds,
                     study=study, patient=patient, number=fixed if fmt == "csv" else rounded)
    if fmt == "csv":
        count = write_csv(rows, header, out, verbatim=verbatim)
    else:
        count = write_json(rows, header, out)
    return ExportResult(level=level, columns=header, rows=count, head=head)
