"""The Typer apps, the `command` decorator and what every command shares.

Progress and tables go to stderr; `--json` puts one machine-readable object on stdout.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.config import Settings, get_settings
from eczema_batch.errors import EczemaBatchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Catalogue eczema photographs and measure severity over time.",
)
db_app = typer.Typer(no_args_is_help=True, help="The catalogue's schema (Alembic).")
app.add_typer(db_app, name="db")
models_app = typer.Typer(no_args_is_help=True, help="The models that segment and embed.")
app.add_typer(models_app, name="models")
heads_app = typer.Typer(no_args_is_help=True, help="Trained severity heads: list, choose.")
app.add_typer(heads_app, name="heads")
review_app = typer.Typer(no_args_is_help=True, help="Images a rater should look at; decisions.")
app.add_typer(review_app, name="review")

err = Console(stderr=True)
log = logging.getLogger("eczema_batch")

def command(
    group: typer.Typer, name: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose expected errors print their message and exit with their code."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except EczemaBatchError as exc:
                err.print(f"[bold red]error:[/] {exc}", highlight=False)
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                err.print("interrupted: run the same command again to carry on")
                raise typer.Exit(130) from None

        group.command(name)(wrapper)
        return fn

    return register


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]

SegmenterOption = Annotated[
    str, typer.Option("--segmenter", help="seggpt (the method), none (no segmentation), manual "
                      "(an image's manual mask where it has one, else SegGPT).")
]


def _emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def _settings() -> Settings:
    try:
        return get_settings()
    except EczemaBatchError:
        raise
    except Exception as exc:  # pydantic's ValidationError: a bad ECZEMA_BATCH_* value
        raise EczemaBatchError(f"a setting is wrong: {exc}") from exc


def _catalogue(settings: Settings) -> sessionmaker[Session]:
    from eczema_batch.catalogue.db import open_catalogue

    return open_catalogue(settings.resolved_database_url)


@contextmanager
def _progress(description: str, *, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr; yields `update(done, total)`."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True, disable=not enabled) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        # pydicom logs a traceback for every file it cannot decode; ingest already reports each
        # one with its reason, so keep the terminal to that summary.
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", module=r"pydicom\..*")
        warnings.filterwarnings("ignore", message=r"The given NumPy array is not writable")


def main() -> None:
    app(prog_name="eczema-batch")
