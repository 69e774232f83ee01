"""The README's walk-through, run as written, in a fresh folder, as a new user would type it."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def walk_through() -> str:
    text = README.read_text(encoding="utf-8")
    block = re.search(
        r"<!-- walk-through: start -->\n```bash\n(.*?)```\n<!-- walk-through: end -->", text, re.S
    )
    assert block, "README.md lost its walk-through markers"
    return block.group(1)


@pytest.mark.slow
def test_readme_walk_through_runs_as_written(tmp_path: Path) -> None:
    script = walk_through()
    assert "source .venv/bin/activate" in script
    # The folder a new user types in has the project's .venv; here it is this test run's one.
    (tmp_path / ".venv").symlink_to(sys.prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECZEMA_BATCH_")}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # nothing but what `source` puts first
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "created a new catalogue" in done.stderr
    assert (tmp_path / ".eczema-batch" / "catalogue.sqlite3").is_file()
    rows = list(csv.DictReader((tmp_path / "visits.csv").open(encoding="utf-8")))
    assert rows and all(r["severity_class"] for r in rows), "the second run predicted nothing"
    assert "S001" in done.stderr  # the patient report
