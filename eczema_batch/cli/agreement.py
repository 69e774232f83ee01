"""`eczema-batch agreement`: how far the raters agree (eczema_batch/training/agreement)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from eczema_batch.cli.common import (
    JsonOption,
    _catalogue,
    _emit_json,
    _settings,
    app,
    command,
    err,
    literal,
)
from eczema_batch.cli.reports import StudyOption, _print_wide


@command(app)
def agreement(
    study: StudyOption = None,
    bootstrap: Annotated[int, typer.Option(min=1, help="Patient bootstrap replicates.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Agreement of the raters: kappa per pair, Krippendorff's alpha, ICC, intra-rater repeats.

    Quadratic-weighted kappa of every pair of raters on the images both labelled, ordinal
    Krippendorff's alpha over all raters, ICC(2,1) on the images every rater labelled and each
    rater's blinded repeats against their first reading, with 95% intervals from a bootstrap
    over patients. The model beside the raters: `eczema-batch evaluate` (out-of-fold).

    Example: eczema-batch agreement --study trial --json
    """
    from eczema_batch.training.agreement import agreement_tables, catalogue_agreement

    settings = _settings()
    factory = _catalogue(settings)
    with factory() as session:
        report = catalogue_agreement(session, study=study, reference_rule=settings.reference_label,
                                     bootstrap=bootstrap, seed=seed)
    if as_json:
        _emit_json(report.as_dict())
        return
    if not report.raters:
        err.print("no labels yet: a severity column in the manifest, or eczema-batch review set")
        return
    for title, columns, rows in agreement_tables(report):
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*map(literal, row))
        _print_wide(table)
    raters = ", ".join(f"{literal(r)} {n}" for r, n in report.raters.items())
    err.print(f"images per rater: {raters}; labelled by two raters or more: "
              f"{report.multi_rated}", highlight=False)
    if report.multi_rated == 0:
        err.print("no image has two raters yet: eczema-batch review next --by RATER")
