"""The demo: a synthetic study from end to end (eczema_batch/demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from eczema_batch.cli.common import (
    JsonOption,
    _emit_json,
    _settings,
    app,
    command,
    err,
    literal,
)
from eczema_batch.cli.reports import _print_cohort, _report_json


@command(app)
def demo(
    folder: Annotated[Path | None, typer.Argument(
        help="Workspace to use (default: demo/ in ECZEMA_BATCH_HOME, ./.eczema-batch/demo), "
        "with its own catalogue: your studies' catalogue is never touched.")] = None,
    tiny: Annotated[bool, typer.Option(
        "--tiny", help="Use tiny models even when the real weights are found.")] = False,
    untrained: Annotated[bool, typer.Option(
        "--untrained", help="Keep the tiny models' random weights (do not train them on the "
        "demo study first): the workflow only, in less time.")] = False,
    patients: Annotated[int, typer.Option(min=1, help="Synthetic patients.")] = 8,
    visits: Annotated[int, typer.Option(min=2, help="Visits per patient.")] = 3,
    as_json: JsonOption = False,
) -> None:
    """Try everything on a synthetic study: write, ingest, measure, train, report.

    Uses the real models when their weights are found; otherwise tiny models of the same classes,
    first trained on the demo's own synthetic study (adapted embedder, tuned segmenter), and says
    so. Runs on an embedded SQLite catalogue in FOLDER; running it again reuses what is there.

    Example: eczema-batch demo ./demo --tiny
    """
    from eczema_batch.demo import DemoSize, run_demo

    settings = _settings()
    # Its own workspace and catalogue: a study the user ingests next never lands among the demo's
    # synthetic patients.
    where = folder or settings.home / "demo"
    result = run_demo(where, settings=settings, size=DemoSize(patients=patients, visits=visits),
                      tiny=tiny, untrained=untrained,
                      say=lambda text: err.print(literal(text), highlight=False))
    if result.models == "tiny":
        err.print(f"\n[bold black on yellow] TINY MODELS TRAINED ON THE DEMO STUDY [/] "
                  f"[bold yellow]{literal(result.segmenter)} + {literal(result.embedder)}: tiny "
                  "models adapted and tuned on this synthetic study, the head trained on its "
                  "labels. They show that the tool learns and measures what was painted here; "
                  "they say nothing about eczema on real photographs.[/]\n"
                  f"why tiny: {literal(result.models_note)}\n"
                  "for real results: eczema-batch models list shows where weights are looked for",
                  highlight=False, soft_wrap=True)
    elif result.models == "tiny-untrained":
        err.print(f"\n[bold black on yellow] TINY MODELS [/] [bold yellow]"
                  f"{literal(result.segmenter)} + {literal(result.embedder)} have random "
                  "weights: every number below is meaningless; it shows the workflow, not "
                  "eczema severity.[/]\n"
                  f"why: {literal(result.models_note)}\n"
                  "for real results: eczema-batch models list shows where weights are looked for",
                  highlight=False, soft_wrap=True)
    else:
        err.print(f"\n[bold white on green] REAL MODELS [/] {literal(result.segmenter)} + "
                  f"{literal(result.embedder)} ({literal(result.models_note)})", highlight=False,
                  soft_wrap=True)
    if result.head_problem:
        err.print(f"[yellow]no severity head trained[/]: {literal(result.head_problem)}",
                  highlight=False)
    else:
        err.print("the head was trained on this study's own labels: its predictions here are "
                  "in-sample (eczema-batch evaluate estimates real accuracy)", soft_wrap=True)
    assert result.report is not None and result.html is not None
    if as_json:
        _emit_json({"folder": str(result.folder), "models": result.models,
                    "models_note": result.models_note, "segmenter": result.segmenter,
                    "embedder": result.embedder, "images": result.images,
                    "head_problem": result.head_problem, "seconds": result.seconds,
                    "report": _report_json(result.report, visits=False),
                    "html": str(result.html.index)})
        return
    _print_cohort(result.report, limit=10)
    err.print(f"HTML report: {literal(result.html.index.as_uri())}", soft_wrap=True,
              highlight=False)
    url = literal(result.database_url)
    err.print(f"the demo's own catalogue: {url}; to look around in it:\n"
              f"  ECZEMA_BATCH_DATABASE_URL={url} eczema-batch report --patient S001\n"
              "your own studies go to another catalogue (README.md, after the quickstart)",
              highlight=False)
