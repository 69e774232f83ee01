"""The Typer apps, the `command` decorator and what every command shares.

Progress and tables go to stderr; `--json` puts one machine-readable object on stdout.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.faults import is_disk_full
from eczema_batch.config import Settings, get_settings
from eczema_batch.errors import ConfigError, DiskFullError, EczemaBatchError, UsageError
from eczema_batch.progress import Progress as ProgressUpdate  # rich has its own Progress

#: `-h` as well as `--help`, on every command
HELP = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings=HELP,
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

#: Messages are never hard-wrapped: written to a pipe or a log, rich would otherwise break them at
#: 80 columns (COLUMNS or the terminal's width otherwise), mid-path and mid-reason. A terminal wraps
#: long lines itself; tables are still laid out to the width. No emoji codes: a file named
#: `:warning:.jpg` is printed as it is named.
err = Console(stderr=True, soft_wrap=True, emoji=False)
log = logging.getLogger("eczema_batch")

#: Control characters shown by name; the others as \xNN, \uNNNN or \UNNNNNNNN.
_NAMED_CONTROLS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(char: str) -> str:
    if char.isprintable() or unicodedata.category(char) == "Zs":  # Zs: spaces are shown as spaces
        return char
    if named := _NAMED_CONTROLS.get(char):
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else (
        f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


#: An empty span: rich renders nothing for it, and halves the backslashes before it.
_NO_OP_TAG = "[bold][/bold]"


def literal(value: object) -> str:
    """User data (a path, a name, a reason quoting either) as rich prints it: exactly as it is.

    Everything printed goes through rich markup, `Table.add_row` cells and titles included, so
    every piece of study or user data is passed through this: markup (`[/x]`, `[link=...]`) is
    escaped, and characters a terminal acts on instead of showing (ESC and the other C0 and C1
    controls, which start colour, cursor and OSC 8 hyperlink sequences; CR and backspace, which
    overwrite a line; line separators; bidirectional overrides, which reorder it; invisible format
    characters; undecodable bytes) are written as visible escapes such as `\\x1b`.
    """
    text = str(value)
    if not text.isprintable():
        text = "".join(map(_visible, text))
    # Backslashes at the end would escape the markup written after the value (`[/]` in
    # `f"[red]{literal(x)}[/]"`), and rich halves them only where a tag follows: double them and
    # close with an empty tag, so they print as they are whatever follows. (rich's `escape` leaves
    # them before 13.5 and from 13.5 doubles only a single one.)
    body = text.rstrip("\\")
    if len(body) == len(text):
        return escape(text)
    return escape(body) + "\\" * (2 * (len(text) - len(body))) + _NO_OP_TAG


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
                _fail(exc)
            except DBAPIError as exc:
                # Known database faults (a full disk, a damaged file) wherever they surface; any
                # other keeps its traceback: it is a bug to report.
                problem = _explained(exc)
                if problem is None:
                    raise
                _fail(problem, exc)
            except OSError as exc:
                # A file the command had to read or write: say which, and why (no traceback).
                if exc.filename is None and not is_disk_full(exc):
                    raise
                _fail(_os_error(exc), exc)
            except KeyboardInterrupt:
                err.print("interrupted: run the same command again to carry on")
                raise typer.Exit(130) from None

        group.command(name)(wrapper)
        return fn

    return register


def _fail(error: EczemaBatchError, cause: BaseException | None = None) -> NoReturn:
    if cause is not None:  # the traceback, for --verbose
        log.info("%s", type(cause).__name__, exc_info=cause)
    # The message may quote a path or a value: printed as text. Its own line breaks stay (a
    # message may list places, one per line); every other control character is made visible.
    message = "\n".join(literal(line) for line in str(error).split("\n"))
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(error.exit_code) from None


def _explained(exc: DBAPIError) -> EczemaBatchError | None:
    from eczema_batch.catalogue.db import sqlite_path
    from eczema_batch.catalogue.faults import explain_database_error

    url = get_settings().resolved_database_url  # read before: the command got this far
    path = sqlite_path(url)
    return explain_database_error(exc, str(path) if path else "the configured database")


def _os_error(exc: OSError) -> EczemaBatchError:
    where = next((str(name) for name in (exc.filename, exc.filename2) if name is not None),
                 "writing a file")
    reason = exc.strerror or type(exc).__name__
    if is_disk_full(exc):
        return DiskFullError(f"{where}: {reason}: the disk is full. Free some space, then run the "
                             "same command again")
    return EczemaBatchError(f"{where}: {reason}; nothing more was done (check the path and its "
                            "permissions, then run the same command again)")


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]

VerbatimOption = Annotated[bool, typer.Option(
    "--verbatim", help="CSV: write text cells exactly as stored (for R or pandas); by default a "
    "cell a spreadsheet would run as a formula gets a leading '.")]

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
    """The configured catalogue; a new embedded one is created, and the user told where."""
    from eczema_batch.catalogue.db import open_catalogue, sqlite_path

    url = database_url(settings)
    path = sqlite_path(url)
    new = path is not None and not path.exists()
    factory = open_catalogue(url)
    if new:
        err.print(f"created a new catalogue: {literal(path)} (ECZEMA_BATCH_HOME or "
                  "ECZEMA_BATCH_DATABASE_URL choose another)", highlight=False)
    return factory


def database_url(settings: Settings) -> str:
    """The catalogue's URL; the default one's workspace folder (ECZEMA_BATCH_HOME) is created,
    but not the folders above it: a mistyped path is refused, not built."""
    if settings.database_url is None:
        home = settings.home.resolve()
        try:
            home.mkdir(exist_ok=True)
        except FileNotFoundError:
            raise ConfigError(
                f"ECZEMA_BATCH_HOME={settings.home}: the folder {home.parent} does not exist; "
                "create it, or choose another workspace folder"
            ) from None
        except FileExistsError:
            raise ConfigError(
                f"ECZEMA_BATCH_HOME={settings.home} is a file, not a folder: choose another "
                "workspace folder"
            ) from None
    return settings.resolved_database_url


def check_output(path: Path, *, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written there, and say why."""
    if folder:
        if path.exists() and not path.is_dir():
            raise UsageError(f"-o {path} is a file: give a folder (it is created if missing)")
        # The folder is created with its missing parents: check the nearest one that exists.
        parent = path
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise UsageError(f"-o {path}: {parent} is a file, not a folder; write somewhere else")
    else:
        if path.is_dir():
            raise UsageError(f"-o {path} is a folder: give a file name, e.g. {path / 'out.csv'}")
        parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"-o {path}: the folder {parent} does not exist; create it first, or "
                         "write somewhere else")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"-o {path}: cannot write in {parent} (read-only, or no permission); "
                         "write somewhere else")
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"-o {path} is read-only: it is left as it is; write somewhere else")


@contextmanager
def writing_to(path: Path) -> Iterator[None]:
    """An OSError while writing `path` names it (a failed write's error carries no file name)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


@contextmanager
def _progress(description: str, *, enabled: bool = True) -> Iterator[ProgressUpdate]:
    """A progress bar on stderr; yields `update(done, total)`."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    # Only on a terminal: in a log a bar is noise (rich would still write an empty line).
    live = enabled and err.is_terminal
    with Progress(*columns, console=err, transient=True, disable=not live) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _print_version(value: bool) -> None:
    if value:
        from eczema_batch import __version__

        typer.echo(f"eczema-batch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    _version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    )] = False,
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
    cli = typer.main.get_command(app)
    if not sys.stderr.isatty():
        # Typer shows a usage error in a rich panel wrapped to the terminal's width; in a log or
        # a pipe, click's plain one-line "Error: ..." is what a reader (or grep) wants.
        cli.rich_markup_mode = None  # type: ignore[attr-defined]
    cli(prog_name="eczema-batch")
