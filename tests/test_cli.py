"""The real CLI against a real catalogue: exit codes, --json output, rows written, help examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import func, select
from typer.testing import CliRunner

from eczema_batch.catalogue.db import open_catalogue
from eczema_batch.catalogue.models import Image, Label, Mask
from eczema_batch.cli import app
from tests.factories import write_jpeg, write_manifest, write_mask

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_ingest_json_status_and_exit_codes(tmp_path: Path, db_url: str) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P001" / "2024-01-15" / "a.jpg", seed=1)
    write_jpeg(root / "P001" / "2024-02-15" / "b.jpg", seed=2)
    code, out, _ = invoke("ingest", str(root), "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["catalogued"] == 2 and payload["already_catalogued"] == 0
    assert payload["duplicates"] == [] and payload["rejected"] == []

    (root / "P001" / "2024-02-15" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    code, out, _ = invoke("ingest", str(root), "--json")
    assert code == 3
    payload = json.loads(out)
    assert payload["already_catalogued"] == 2
    assert [r["path"] for r in payload["rejected"]] == ["P001/2024-02-15/broken.jpg"]

    code, out, _ = invoke("status", "--json", "--rejected")
    assert code == 0
    status = json.loads(out)
    assert status["studies"][0]["images"] == 2
    assert status["studies"][0]["rejected"] == 1
    assert status["rejected"][0]["path"] == "P001/2024-02-15/broken.jpg"
    with open_catalogue(db_url)() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 2


def test_ingest_usage_errors(tmp_path: Path, db_url: str) -> None:
    code, _, err = invoke("ingest", str(tmp_path / "missing"))
    assert code == 2
    assert "does not exist" in err
    root = tmp_path / "study"
    root.mkdir()
    (root / "manifest.csv").write_text("file,who\nx.jpg,P1\n")
    code, _, err = invoke("ingest", str(root))
    assert code == 2
    assert "no 'path' column" in err


def test_ingest_of_an_empty_folder_says_so(tmp_path: Path, db_url: str) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = invoke("ingest", str(tmp_path / "empty"))
    assert code == 1
    assert "no files found" in err


def test_ingest_of_nothing_usable_exits_1(tmp_path: Path, db_url: str) -> None:
    root = tmp_path / "study"
    (root / "P001" / "v1").mkdir(parents=True)
    (root / "P001" / "v1" / "x.jpg").write_bytes(b"")
    code, out, _ = invoke("ingest", str(root), "--json")
    assert code == 1
    assert json.loads(out)["rejected"] == [
        {"path": "P001/v1/x.jpg", "kind": "rejected", "reason": "empty file"}]


def test_unknown_manifest_column_is_ignored_with_a_warning(tmp_path: Path, db_url: str) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P001" / "2024-01-15" / "a.jpg")
    write_manifest(root, [{"path": "P001/2024-01-15/a.jpg", "severity": "1", "notes": "itchy",
                           "rater": "AB"}],
                   columns=("path", "notes", "severity", "rater"), delimiter=";")
    code, out, err = invoke("ingest", str(root), "--json")
    assert code == 0
    payload = json.loads(out)  # stdout holds the JSON object and nothing else
    assert (payload["catalogued"], payload["rejected"]) == (1, [])
    [warning] = payload["warnings"]
    assert "'notes'" in warning and "'rater'" not in warning  # rater: a known column
    assert "path, patient, visit_date, body_site, severity, mask, rater" in warning
    assert f"warning: {warning}" in err.splitlines()
    with open_catalogue(db_url)() as session:
        assert session.scalars(select(Label.severity)).all() == [1]
    # Without --json the warning is on the terminal too, and stdout stays empty.
    code, out, err = invoke("ingest", str(root))
    assert (code, out) == (0, "")
    assert f"warning: {warning}" in err.splitlines()


def test_manifest_whose_delimiter_cannot_be_told(tmp_path: Path, db_url: str) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P001" / "v1" / "a.jpg")
    (root / "manifest.csv").write_text("file name\nP001/v1/a.jpg\n")
    code, out, err = invoke("ingest", str(root), "--json")
    assert (code, out) == (2, "")
    assert "tried comma, semicolon and tab" in err


def test_misspelt_severity_and_misfit_mask_are_rejected_photographs_kept(
    tmp_path: Path, db_url: str
) -> None:
    root = tmp_path / "study"
    visit = root / "P001" / "2024-01-15"
    write_jpeg(visit / "a.jpg", (320, 240), seed=1)
    write_mask(visit / "a.mask.png", (50, 50))
    write_jpeg(visit / "b.jpg", seed=2)
    write_manifest(root, [
        {"path": "P001/2024-01-15/a.jpg", "patient": "S-042", "body_site": "left arm"},
        {"path": "P001/2024-01-15/b.jpg", "patient": "S-042", "severity": "sever"},
    ], delimiter=";", bom=True, line_end="\r\n")

    code, out, _ = invoke("ingest", str(root), "--json")

    assert code == 3
    payload = json.loads(out)
    assert (payload["catalogued"], payload["warnings"]) == (2, [])
    rejected = {r["path"]: r for r in payload["rejected"]}
    assert {p: r["kind"] for p, r in rejected.items()} == {
        "P001/2024-01-15/a.mask.png": "mask", "P001/2024-01-15/b.jpg": "label"}
    assert "mask is 50x50 but its image is 320x240" in rejected["P001/2024-01-15/a.mask.png"][
        "reason"]
    assert ("severity 'sever' is not a class: use one of 0 (clear), 1 (mild), 2 (moderate), "
            "3 (severe)") in rejected[
        "P001/2024-01-15/b.jpg"]["reason"]
    code, out, err = invoke("status", "--json", "--rejected")
    status = json.loads(out)
    assert (status["studies"][0]["images"], status["studies"][0]["rejected"]) == (2, 2)
    assert {(r["path"], r["kind"]) for r in status["rejected"]} == {
        ("P001/2024-01-15/a.mask.png", "mask"), ("P001/2024-01-15/b.jpg", "label")}
    with open_catalogue(db_url)() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 2
        assert session.scalar(select(func.count()).select_from(Mask)) == 0
        assert session.scalar(select(func.count()).select_from(Label)) == 0

    # Fixed in the folder, both are added to the photographs catalogued before.
    (visit / "a.mask.png").unlink()
    write_mask(visit / "a.mask.png", (320, 240))
    write_manifest(root, [
        {"path": "P001/2024-01-15/a.jpg", "patient": "S-042", "body_site": "left arm"},
        {"path": "P001/2024-01-15/b.jpg", "patient": "S-042", "severity": "severe"},
    ], delimiter=";")
    code, out, _ = invoke("ingest", str(root), "--json")
    assert code == 0
    payload = json.loads(out)
    assert (payload["already_catalogued"], payload["updated"], payload["rejected"]) == (2, 2, [])


def test_synth_then_ingest(tmp_path: Path, db_url: str) -> None:
    code, out, _ = invoke("synth", str(tmp_path / "s"), "--patients", "3", "--visits", "2",
                          "--width", "64", "--height", "48", "--json")
    assert code == 0
    written = json.loads(out)
    code, out, _ = invoke("ingest", str(tmp_path / "s"), "--json")
    assert code == 0
    assert json.loads(out)["catalogued"] == written["images"]


def test_manifest_precedence_over_folders(tmp_path: Path, db_url: str) -> None:
    root = tmp_path / "study"
    write_jpeg(root / "P001" / "visit-1" / "a.jpg")
    write_manifest(root, [{"path": "P001/visit-1/a.jpg", "patient": "S-042",
                           "visit_date": "2023-05-06"}])
    code, _, _ = invoke("ingest", str(root))
    assert code == 0
    code, out, _ = invoke("status", "--json")
    assert json.loads(out)["studies"][0]["patients"] == 1


def test_db_current(db_url: str) -> None:
    code, out, _ = invoke("db", "current", "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["current"] == payload["head"]


def _commands(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    found = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a sub-group (typer vendors its own click)
            found.extend(_commands(cmd, f"{prefix}{name} "))
        else:
            found.append((f"{prefix}{name}", cmd))
    return found


@pytest.mark.parametrize("name", [n for n, _ in _commands(typer.main.get_group(app))])
def test_every_command_help_has_an_example(name: str) -> None:
    result = runner.invoke(app, [*name.split(), "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.stdout, f"`eczema-batch {name} --help` shows no example"


def test_json_means_one_thing_everywhere() -> None:
    """`--json` is a flag that prints one JSON object on stdout; a file is `--output`/`-o`."""
    with_json = []
    for name, cmd in _commands(typer.main.get_group(app)):
        for param in cmd.params:
            if "--json" in getattr(param, "opts", ()):
                assert param.is_flag, f"`{name} --json` takes a value: make it a flag"
                assert param.help == "Print one JSON object on stdout.", name
                with_json.append(name)
            if "-o" in getattr(param, "opts", ()):
                assert "--output" in param.opts, name
    assert {"ingest", "status", "run", "report", "evaluate", "db current"} <= set(with_json)
