"""The review queue: review list/set (eczema_batch/report/review)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from eczema_batch.cli.common import (
    JsonOption,
    _catalogue,
    _emit_json,
    _settings,
    command,
    err,
    literal,
    review_app,
)
from eczema_batch.cli.reports import HeadOption, PatientOption, StudyOption, _fmt, _print_wide


@command(review_app, "list")
def review_list(
    study: StudyOption = None,
    patient: PatientOption = None,
    head: HeadOption = None,
    as_json: JsonOption = False,
) -> None:
    """Flagged predictions waiting for a rater: low confidence, a flagged mask, weak prompts.

    Thresholds: ECZEMA_BATCH_REVIEW_MIN_CONFIDENCE, ECZEMA_BATCH_REVIEW_MIN_PROMPT_SIMILARITY.

    Example: eczema-batch review list --json
    """
    from eczema_batch.report.cohort import review_thresholds
    from eczema_batch.report.review import list_review_queue

    settings = _settings()
    factory = _catalogue(settings)
    with factory() as session:
        queue = list_review_queue(session, thresholds=review_thresholds(settings), study=study,
                                  patient=patient, head_id=head)
    if as_json:
        _emit_json({"head": queue.head.id if queue.head else None,
                    "items": [i.as_dict() for i in queue.items]})
        return
    if queue.head is None:
        err.print("no predictions to review yet: eczema-batch train, then eczema-batch run")
        return
    table = Table(title=f"review queue: {len(queue.items)} images")
    for column in ("image", "patient", "visit", "site", "model", "p", "why"):
        table.add_column(column, justify="right" if column in ("image", "p") else "left")
    for i in queue.items:
        table.add_row(str(i.image_id), literal(i.patient), literal(i.visit),
                      literal(i.body_site) if i.body_site else "–",
                      literal(i.predicted_class) if i.predicted_class else "–",
                      _fmt(i.top_probability), literal("; ".join(i.reasons)))
    _print_wide(table)
    if queue.items:
        err.print("record a decision: eczema-batch review set IMAGE --severity K --by RATER")


@command(review_app, "set")
def review_set(
    image: Annotated[int, typer.Argument(help="Image id (eczema-batch review list).")],
    severity: Annotated[str, typer.Option(help="Class index (0-3) or name (e.g. moderate).")],
    by: Annotated[str, typer.Option("--by", help="Who decided (a rater's id, not a name).")],
    note: Annotated[str | None, typer.Option(help="Why, for the audit trail.")] = None,
    head: HeadOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record a rater's severity for an image: a new reviewed label and an audit event.

    Nothing is overwritten: the prediction and earlier labels stay; reports use the newest review.

    Example: eczema-batch review set 42 --severity moderate --by rater-07 --note "crusted"
    """
    from eczema_batch.report.review import record_review

    factory = _catalogue(_settings())
    decision = record_review(factory, image_id=image, severity=severity, rater=by, note=note,
                             head_id=head)
    if as_json:
        _emit_json(decision.as_dict())
    else:
        was = "" if decision.previous is None else (
            f" (was {decision.previous} from the {decision.previous_source})")
        err.print(f"image {image}: {literal(decision.severity_class)} by "
                  f"{literal(decision.rater)}{was}; label {decision.label_id}, "
                  f"event {decision.event_id}", highlight=False)
