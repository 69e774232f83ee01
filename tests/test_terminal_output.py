"""Study and user data reach the terminal as text: never rich markup, never a control sequence.

File names, folder names, study names, subject codes, visit labels, body sites, class names, head
and rater names are all written by someone other than the person reading the terminal. A `[/x]`
among them used to crash commands after they had committed; `[link=...]` made a clickable link;
an ESC in a file name reached the terminal raw (colour, cursor moves, OSC 8 links).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Image, Label, Rejection
from eczema_batch.cli import app
from eczema_batch.cli.common import literal
from tests.factories import write_jpeg, write_manifest
from tests.report_factories import (
    make_head,
    make_image,
    make_patient,
    make_prediction,
    make_study,
    make_visit,
)

#: An OSC 8 hyperlink ("click" pointing at evil.example), as a terminal would render it.
OSC8 = "\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\"
#: The same in a file name (no slashes).
FILE_OSC8 = "\x1b]8;;mailto:x@evil.example\x1b\\click\x1b]8;;\x1b\\"
#: What must never reach stderr: ESC, BEL, C1 CSI, NUL, a right-to-left override.
RAW = ("\x1b", "\x07", "\x9b", "\x00", "\u202e")


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _clean(text: str) -> None:
    assert not [c for c in RAW if c in text], repr(text)


@pytest.mark.parametrize(("value", "shown"), [
    ("[/x]", "\\[/x]"),
    ("[link=https://evil.example]here[/link]", "\\[link=https://evil.example]here\\[/link]"),
    ("[bold]arm", "\\[bold]arm"),
    (OSC8, "\\x1b]8;;https://evil.example\\x1b\\click\\x1b]8;;\\x1b\\\\[bold][/bold]"),
    ("a\x1b[2Jb", "a\\x1b[2Jb"),
    ("nul\x00byte", "nul\\x00byte"),
    ("c1\x9b31m", "c1\\x9b31m"),
    ("two\nlines\r\tend", "two\\nlines\\r\\tend"),
    ("rtl\u202etxt.exe", "rtl\\u202etxt.exe"),
    ("line\u2028sep", "line\\u2028sep"),
    ("bad-byte-\udcff", "bad-byte-\\udcff"),
    ("left\xa0arm ü ✓", "left\xa0arm ü ✓"),  # printable text and spaces stay as they are
    ("trailing\\", "trailing\\\\[bold][/bold]"),
])
def test_literal_escapes_markup_and_controls(value: str, shown: str) -> None:
    assert literal(value) == shown


def test_literal_prints_back_exactly_what_was_escaped() -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=500, emoji=False)
    # Trailing backslashes, one or more, must not escape the `[/]` written after them, nor be
    # doubled where nothing follows; a table cell is markup too.
    for value in ("[/x]", "[bold]x[/bold]", "[link=a]b[/link]", ":warning:", "x\\", "x\\\\",
                  "x\\\\\\", "a\\[b]", "[/]\\"):
        for template in ("[red]{}[/]", "{}", "{}: done"):
            console.print(template.format(literal(value)), end="")
            assert console.export_text() == template.replace("[red]", "").replace(
                "[/]", "").format(value)
        table = Table(literal(value))
        table.add_row(literal(value))
        console.print(table)
        assert console.export_text().count(value) == 2


@pytest.fixture
def hostile_study(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    # "[/x]" spread over a folder and a file name: the relative path is P001/x[/x]y.jpg.
    write_jpeg(root / "P001" / "x[" / "x]y.jpg", seed=1)
    write_jpeg(root / "P001" / "2024-01-15" / "ok.jpg", seed=2)
    (root / "P001" / "2024-01-15" / f"bad{FILE_OSC8}.jpg").write_bytes(b"not a picture")
    link = root / "P002[link=mailto:a@evil.example]mail[" / "link]"
    link.mkdir(parents=True)
    (link / "c.jpg").write_bytes(b"not a picture either")
    write_manifest(root, [{"path": "P001/2024-01-15/ok.jpg", "body_site": "[bold]arm\x1b[5m"}])
    return root


def test_ingest_and_status_print_hostile_names_as_text(
    hostile_study: Path, factory: sessionmaker[Session]
) -> None:
    # (A control character in a study name is refused outright: tests/test_identity.py.)
    code, _, err = _invoke("ingest", str(hostile_study), "--study", "s[/x][link=x]")
    assert code == 3, err  # some files rejected: not a crash after the commit (exit 1)
    _clean(err)
    assert "study s[/x][link=x]" in err
    assert r"P001/2024-01-15/bad\x1b]8;;mailto:x@evil.example\x1b\click\x1b]8;;\x1b\.jpg" in err
    assert "P002[link=mailto:a@evil.example]mail[/link]/c.jpg" in err
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 2
        assert session.scalar(select(func.count()).select_from(Rejection)) == 2
        assert session.scalar(select(Image.body_site).where(Image.body_site.is_not(None))) == (
            "[bold]arm\x1b[5m")
    code, _, err = _invoke("status", "--rejected")
    assert code == 0, err
    _clean(err)
    assert "s[/x][link=x]" in err and "mailto:a@evil.example]mail[/link]/c.jpg" in err


@pytest.fixture
def hostile_catalogue(factory: sessionmaker[Session]) -> int:
    """Every name a report prints, written to break markup and terminals; one flagged image."""
    with factory() as s, s.begin():
        head = make_head(s, name="head[/x]", classes=("clear", "[bold]mild", "mod\x1b[7m", "sev"))
        study = make_study(s, name=f"trial{OSC8}")
        patient = make_patient(s, study, "P[/x]1")
        first = make_visit(s, patient, dt.date(2024, 1, 1), label="[link=https://evil.example]v1")
        second = make_visit(s, patient, dt.date(2024, 2, 1), label="=1+1\u202e")
        flagged = make_image(s, first, body_site="[bold]arm\x01")
        make_prediction(s, flagged, head, [0.3, 0.0, 0.4, 0.3])
        make_prediction(s, make_image(s, second, body_site="leg[/]"), head, [0.0, 0.9, 0.1, 0.0])
        return flagged.id


def test_reports_and_review_print_hostile_names_as_text(
    hostile_catalogue: int, factory: sessionmaker[Session], tmp_path: Path
) -> None:
    for args in (["report"], ["report", "--patient", "P[/x]1"], ["review", "list"],
                 ["heads", "list"], ["status"], ["export", "-o", str(tmp_path / "v.csv")]):
        code, _, err = _invoke(*args)
        assert code == 0, (args, err)
        _clean(err)
    _, _, err = _invoke("report", "--patient", "P[/x]1")
    assert "patient P[/x]1 (trial\\x1b]8;;https://evil.example\\x1b\\click" in err
    assert "[link=https://evil.example]v1" in err and "=1+1\\u202e" in err
    assert "head[/x]" in err and "[bold]mild" in err
    _, _, err = _invoke("review", "list")
    assert "[bold]arm\\x01" in err and "mod\\x1b[7m" in err

    # A decision is recorded once, and the command that recorded it succeeds.
    code, _, err = _invoke("review", "set", str(hostile_catalogue), "--severity", "1",
                           "--by", "[/x]rater")
    assert code == 0, err
    _clean(err)
    assert f"image {hostile_catalogue}: [bold]mild by [/x]rater (was 2 from the prediction)" in err
    with factory() as session:
        assert session.scalars(select(Label.rater).where(Label.source == "review")).all() == [
            "[/x]rater"]


@pytest.mark.parametrize(("option", "value"), [
    ("--by", "rater\x00"), ("--by", "rater\x1b[2J"), ("--by", "two\nlines"),
    ("--note", "hidden\x1b[8m"), ("--note", "nul\x00"),
])
def test_review_set_refuses_control_characters_and_records_nothing(
    hostile_catalogue: int, factory: sessionmaker[Session], option: str, value: str
) -> None:
    args = {"--by": "rater-07", "--note": "crusted"} | {option: value}
    code, _, err = _invoke("review", "set", str(hostile_catalogue), "--severity", "1",
                           *(x for pair in args.items() for x in pair))
    assert code == 2, err
    _clean(err)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Label)) == 0
    # A note may have line breaks and tabs.
    code, _, err = _invoke("review", "set", str(hostile_catalogue), "--severity", "1", "--by",
                           "rater-07", "--note", "crusted\n\tand dry")
    assert code == 0, err
