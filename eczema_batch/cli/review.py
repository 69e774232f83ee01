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
from eczema_batch.errors import UsageError


@command(review_app, "list")
def review_list(
    study: StudyOption = None,
    patient: PatientOption = None,
    head: HeadOption = None,
    as_json: JsonOption = False,
) -> None:
    """Flagged images waiting for a rater: low confidence, a flagged mask, weak prompts, and
    photographs the quality gate flagged at ingest (blurred, badly exposed, a colour cast).

    Thresholds: ECZEMA_BATCH_REVIEW_MIN_CONFIDENCE, ECZEMA_BATCH_REVIEW_MIN_PROMPT_SIMILARITY,
    ECZEMA_BATCH_QUALITY_*.

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
    if queue.head is None and not queue.items:
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
    if any(r.startswith("quality: ") for i in queue.items for r in i.reasons):
        err.print("a flagged photograph good enough to score: eczema-batch review clear-quality "
                  "IMAGE --by RATER")


@command(review_app, "clear-quality")
def review_clear_quality(
    image: Annotated[int, typer.Argument(help="Image id (eczema-batch review list).")],
    by: Annotated[str, typer.Option("--by", help="Who decided (a rater's id, not a name).")],
    note: Annotated[str | None, typer.Option(help="Why, for the audit trail.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Clear a photograph's quality flag: it is good enough to score after all.

    The measures stay in the catalogue and an audit event keeps the flag and who cleared it;
    `run --quality skip` scores the image from then on.

    Example: eczema-batch review clear-quality 42 --by rater-07 --note "sharp where it matters"
    """
    from eczema_batch.report.review import clear_quality_flag

    factory = _catalogue(_settings())
    cleared = clear_quality_flag(factory, image_id=image, rater=by, note=note)
    if as_json:
        _emit_json(cleared.as_dict())
    else:
        err.print(f"image {image}: quality flag cleared by {literal(cleared.rater)} (was: "
                  f"{literal(cleared.flag)}); event {cleared.event_id}", highlight=False)


@command(review_app, "set")
def review_set(
    image: Annotated[int, typer.Argument(help="Image id (eczema-batch review list).")],
    severity: Annotated[str, typer.Option(help="Class index (0-3) or name (e.g. moderate).")],
    by: Annotated[str, typer.Option("--by", help="Who decided (a rater's id, not a name).")],
    note: Annotated[str | None, typer.Option(help="Why, for the audit trail.")] = None,
    head: HeadOption = None,
    blinded: Annotated[bool, typer.Option(
        "--blinded", help="A reading of the blinded pass (review next): shows nothing of the "
        "image's other labels; a second reading by the same rater is kept as a repeat.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Record a rater's severity for an image: a new reviewed label and an audit event.

    Nothing is overwritten: the prediction and earlier labels stay; reports use the newest review.
    With --blinded (after `review next`), an image the rater had labelled before gets a repeat
    (source review-repeat): it measures their consistency and never replaces their first label.

    Example: eczema-batch review set 42 --severity moderate --by rater-07 --note "crusted"
    """
    from eczema_batch.report.review import record_review

    factory = _catalogue(_settings())
    decision = record_review(factory, image_id=image, severity=severity, rater=by, note=note,
                             head_id=head, blinded=blinded)
    if as_json:
        _emit_json(decision.as_dict())
    elif blinded:
        err.print(f"image {image}: {literal(decision.severity_class)} by "
                  f"{literal(decision.rater)} (blinded); label {decision.label_id}, "
                  f"event {decision.event_id}. Next: eczema-batch review next --by "
                  f"{literal(decision.rater)}", highlight=False)
    else:
        was = "" if decision.previous is None else (
            f" (was {decision.previous} from the {decision.previous_source})")
        err.print(f"image {image}: {literal(decision.severity_class)} by "
                  f"{literal(decision.rater)}{was}; label {decision.label_id}, "
                  f"event {decision.event_id}", highlight=False)


@command(review_app, "next")
def review_next(
    by: Annotated[str, typer.Option("--by", help="The rater who reads (a rater's id).")],
    study: StudyOption = None,
    repeat_share: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of the rater's read images that come back once, later, "
        "to measure their consistency.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the repeat sample and reading order.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """The next image a rater has not read, blinded: no model score, no other rater's label.

    Gives the image's id, subject code, visit, body site and the file to open; record the
    reading with `review set IMAGE --severity K --by RATER --blinded`. A seeded share of the
    rater's images (--repeat-share) comes back once, later, for intra-rater agreement.

    Example: eczema-batch review next --by rater-07 --study trial --repeat-share 0.1
    """
    from eczema_batch.report.blinded import next_reading

    settings = _settings()
    factory = _catalogue(settings)
    rater = by.strip()
    if not rater:
        raise UsageError("--by must name the rater (a rater's id such as rater-07)")
    image_root = str(settings.image_root) if settings.image_root else None
    with factory() as session:
        reading = next_reading(session, rater=rater, study=study, repeat_share=repeat_share,
                               seed=seed, image_root=image_root)
    if as_json:
        _emit_json(reading.as_dict())
        return
    item = reading.item
    if item is None:
        err.print(f"{literal(rater)} has read every image in scope: nothing left", highlight=False)
        return
    # Plain lines, not a table: a long path stays whole, to copy.
    err.print(f"next for {literal(rater)} ({reading.remaining} left)", highlight=False)
    for key, value in (("image", str(item.image_id)), ("study", item.study),
                       ("patient", item.patient), ("visit", item.visit),
                       ("date", str(item.visit_date or "–")), ("site", item.body_site or "–"),
                       ("file", item.path)):
        err.print(f"  {key:8} {literal(value)}", highlight=False, soft_wrap=True)
    err.print(f"record it: eczema-batch review set {item.image_id} --severity K --by "
              f"{literal(rater)} --blinded", highlight=False)
