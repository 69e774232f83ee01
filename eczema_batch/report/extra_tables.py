"""The cohort page's extra tables: the raters' agreement, and a saved evaluation's tables.

Evaluating cross-validates the whole method (minutes to hours); the report only reads what an
evaluation wrote (`eczema-batch evaluate -o FILE`), and says which one: its study, settings and
models head every table's note. The raters' agreement needs no model: it is computed from the
catalogue's labels whenever two raters labelled an image, unless the evaluation carries it (with
the model beside the raters).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session

from eczema_batch.errors import UsageError
from eczema_batch.report.cohort import ReportTable
from eczema_batch.training.report import summary_tables
from eczema_batch.training.results import EvaluationReport

#: which of evaluate's summary tables the cohort page carries, by the start of their title
CARRIED = ("agreement", "subgroups", "robustness")


def load_evaluation(path: Path) -> EvaluationReport:
    """The typed report of an evaluate JSON document, or a clear error saying what to give."""
    hint = ("give the file `eczema-batch evaluate -o FILE` wrote")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--evaluation {path}: no such file; {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--evaluation {path}: not a JSON document ({exc}); {hint}") from None
    try:
        return EvaluationReport.from_dict(doc)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"--evaluation {path}: not an evaluation report (missing or wrong "
                         f"{exc}); {hint}") from None


def evaluation_tables(report: EvaluationReport) -> list[ReportTable]:
    """Agreement, subgroup and robustness tables of an evaluation, with where they came from."""
    models = report.models
    origin = (f"From the evaluation of study {report.study or 'all studies'}: "
              f"{report.settings.folds} folds x {report.settings.repeats} repeats, embedder "
              f"{models.embedder.name} ({models.embedder.digest[:12]})"
              + (f", segmenter {models.segmenter.name} ({models.segmenter.digest[:12]})"
                 if models.segmenter else "") + ".")
    return [_page_table(title, columns, rows, origin)
            for title, columns, rows in summary_tables(report)
            if title.startswith(CARRIED)]


def _page_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], origin: str
                ) -> ReportTable:
    """A terminal table for a page: the title's head (before ": ") as its heading, the rest of
    it (what the numbers are) in the note, before where they came from."""
    heading, _, detail = title.partition(": ")
    detail = detail[:1].upper() + detail[1:]
    note = f"{detail.rstrip('.')}. {origin}" if detail else origin
    return ReportTable(title=heading[:1].upper() + heading[1:], header=tuple(columns),
                       rows=tuple(tuple(row) for row in rows), note=note)


def rater_agreement_tables(session: Session, *, study: str | None, reference_rule: str
                           ) -> list[ReportTable]:
    """Rater vs rater agreement from the catalogue's labels; none unless an image has two
    raters."""
    from eczema_batch.training.agreement import agreement_tables, catalogue_agreement

    report = catalogue_agreement(session, study=study, reference_rule=reference_rule)
    if report.multi_rated == 0:
        return []
    note = (f"From the catalogue's labels: {report.multi_rated} images labelled by two raters "
            "or more. The model beside the raters: eczema-batch evaluate -o FILE, then "
            "eczema-batch report --html DIR --evaluation FILE.")
    return [_page_table(title, columns, rows, note)
            for title, columns, rows in agreement_tables(report)]
