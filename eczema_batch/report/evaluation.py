"""Tables of a saved `eczema-batch evaluate -o FILE` for the HTML report's cohort page.

Evaluating cross-validates the whole method (minutes to hours); the report only reads what an
evaluation wrote, and says which one: its study, settings and models head every table's note.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    return [ReportTable(title=title, header=tuple(columns),
                        rows=tuple(tuple(row) for row in rows), note=origin)
            for title, columns, rows in summary_tables(report)
            if title.startswith(CARRIED)]
