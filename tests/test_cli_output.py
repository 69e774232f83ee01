"""What the real `eczema-batch` process writes to a pipe: whole lines, whatever the width.

These run the command in a subprocess, as a CI job or a log would see it: stderr is not a
terminal, and COLUMNS may be unset or narrow. A message must never be broken across lines (rich
used to hard-wrap at 80 columns, so a test passed or failed with the length of pytest's temporary
folder's name).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import write_jpeg

WIDTHS = [None, "40", "200"]


def run_cli(
    *args: str, cwd: Path, columns: str | None, db_url: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    env["ECZEMA_BATCH_DATABASE_URL"] = db_url
    env["ECZEMA_BATCH_HOME"] = str(cwd / "home")
    return subprocess.run([sys.executable, "-m", "eczema_batch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("columns", WIDTHS)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_errors_are_one_line_whatever_the_width(tmp_path: Path, db_url: str,
                                                columns: str | None) -> None:
    # A short relative path and one far longer than any terminal.
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "and-another-one" / "missing"
    for folder in ("missing", str(deep)):
        done = run_cli("ingest", folder, cwd=tmp_path, columns=columns, db_url=db_url)
        assert done.returncode == 2, done.stderr
        line = f"error: {folder} does not exist: give the folder that holds the study"
        assert line in done.stderr.splitlines(), done.stderr
        assert done.stdout == ""

    # A usage error from the command-line parser: click's one line, not a boxed panel, naming the
    # option whole (click's wording varies: "No such option: --x", "No such option '--x'.").
    done = run_cli("ingest", str(tmp_path), "--no-such-option", cwd=tmp_path, columns=columns,
                   db_url=db_url)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr
    assert "no such option" in errors[0].lower(), done.stderr
    assert "--no-such-option" in errors[0], done.stderr
    assert done.stderr.rstrip().endswith(errors[0]), done.stderr  # the last line: none wrapped


@pytest.mark.parametrize("columns", ["40"])
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_rejections_and_tables_in_a_log(tmp_path: Path, db_url: str, columns: str) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P001" / "2024-01-15" / "a-photograph-with-a-long-name.jpg", seed=1)
    bad = root / "P001" / "2024-01-15" / "not-a-picture-at-all-but-named-like-one.jpg"
    bad.write_bytes(b"this is text, not an image " * 8)
    done = run_cli("ingest", str(root), cwd=tmp_path, columns=columns, db_url=db_url)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    rejected = [line for line in lines if "not-a-picture" in line]
    assert len(rejected) == 1, done.stderr
    assert rejected[0].strip().startswith("rejected")
    assert rejected[0].rstrip().endswith("not an image: content is neither JPEG, PNG nor DICOM")
    # The summary table is still a table (laid out, not soft-wrapped into one line).
    assert any("catalogued" in line and "1" in line for line in lines), done.stderr


def test_version_and_short_help(tmp_path: Path) -> None:
    from eczema_batch import __version__

    for args in (["--version"], ["version"]):
        done = run_cli(*args, cwd=tmp_path, columns=None, db_url="sqlite:///unused.sqlite3")
        assert done.returncode == 0
        assert done.stdout == f"eczema-batch {__version__}\n"
    for args in (["-h"], ["ingest", "-h"], ["db", "upgrade", "-h"]):
        done = run_cli(*args, cwd=tmp_path, columns=None, db_url="sqlite:///unused.sqlite3")
        assert done.returncode == 0, done.stderr
        assert "Usage: eczema-batch" in done.stdout
    assert not (tmp_path / "unused.sqlite3").exists(), "help must not create a catalogue"
