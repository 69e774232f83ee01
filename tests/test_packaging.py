"""The built wheel, installed (not editable) into a fresh virtual environment, used from a folder
outside the source tree: it must find its migrations, claim no generic top-level name, and run
the whole path (db upgrade, ingest, run with tiny models, train, report, export, a Celery worker)
on SQLite and PostgreSQL.

The fresh environment reuses this test environment's dependencies through a `.pth` line (nothing
is downloaded); `.pth` files inside that folder are not processed, so the editable install of the
source tree stays out of sight.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import POSTGRES_URL, require_redis, service_missing

REPO = Path(__file__).resolve().parents[1]
#: What the wheel may put at the top of site-packages.
TOP_LEVEL = {"eczema_batch", "eczema_batch_workers"}
SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                              ".eczema-batch", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                              ".whl", "tests", "bench")


def test_the_package_list_names_every_package() -> None:
    """pyproject.toml lists packages by hand (two are mapped from other folders): none missing."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "eczema_batch").rglob("__init__.py")
    }
    mapped = {"eczema_batch.migrations", "eczema_batch.migrations.versions",
              "eczema_batch_workers"}
    assert set(config["packages"]) == on_disk | mapped
    assert config["package-dir"] == {"eczema_batch.migrations": "migrations",
                                     "eczema_batch_workers": "workers"}


@dataclass
class Installed:
    venv: Path
    wheel: Path

    def run(self, *args: str, cwd: Path, env: dict[str, str],
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.venv / "bin" / "eczema-batch"), *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO, source, ignore=SKIP)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(work / "dist"), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (work / "dist").glob("eczema_batch-*.whl")

    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(subprocess.check_output(
        [str(venv / "bin" / "python"), "-c",
         "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip())
    (purelib / "test_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Installed(venv, wheel)


def test_the_wheel_holds_the_migrations_and_no_generic_name(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == TOP_LEVEL
    assert "eczema_batch/migrations/env.py" in names
    assert "eczema_batch/migrations/script.py.mako" in names
    revisions = sorted(p.name for p in (REPO / "migrations" / "versions").glob("*.py"))
    assert revisions and all(f"eczema_batch/migrations/versions/{r}" in names for r in revisions)
    assert "eczema_batch_workers/tasks.py" in names
    templates = sorted(p.name for p in (REPO / "eczema_batch/report/templates").glob("*.html"))
    assert templates and all(f"eczema_batch/report/templates/{t}" in names for t in templates)


def _environment(home: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ECZEMA_BATCH_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"ECZEMA_BATCH_HOME": str(home), "ECZEMA_BATCH_DATABASE_URL": database_url,
                "ECZEMA_BATCH_MODEL_DIR": str(home / "models"),
                "ECZEMA_BATCH_SEGMENTER_MODEL": "tiny-seggpt",
                "ECZEMA_BATCH_EMBEDDER_MODEL": "tiny-dino", "ECZEMA_BATCH_DEVICE": "cpu",
                "OMP_NUM_THREADS": "1", **extra})
    return env


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working folder far from the source tree."""
    assert REPO not in tmp_path.parents
    return tmp_path


def _imports_from_the_venv(installed: Installed, cwd: Path, env: dict[str, str]) -> None:
    probe = ("import eczema_batch, eczema_batch_workers.tasks, importlib.util as u; "
             "print(eczema_batch.__file__); print(eczema_batch_workers.tasks.__file__); "
             "print(u.find_spec('workers'), u.find_spec('migrations'))")
    out = subprocess.check_output([str(installed.venv / "bin" / "python"), "-c", probe],
                                  cwd=cwd, env=env, text=True).splitlines()
    assert all(line.startswith(str(installed.venv)) for line in out[:2]), out
    assert out[2] == "None None", "the install claims a generic top-level name"


def _whole_path(installed: Installed, cwd: Path, env: dict[str, str],
                queue: str | None = None) -> None:
    def ok(*args: str) -> subprocess.CompletedProcess[str]:
        done = installed.run(*args, cwd=cwd, env=env)
        assert done.returncode == 0, f"eczema-batch {' '.join(args)}:\n{done.stderr[-3000:]}"
        return done

    assert "revision" in ok("db", "upgrade").stderr
    ok("models", "make-tiny", str(Path(env["ECZEMA_BATCH_HOME"]) / "models"))
    ok("synth", "study", "--patients", "8", "--visits", "3", "--width", "64", "--height", "48")
    assert json.loads(ok("ingest", "study", "--json").stdout)["catalogued"] == 48
    on_queue = ["--queue", queue] if queue else []
    first = json.loads(ok("run", *on_queue, "--json").stdout)
    assert first["failed_jobs"] == {} and first["failed_images"] == {}
    ok("train")
    ok("run", *on_queue)
    report = json.loads(ok("report", "--json").stdout)
    assert report, "an empty report"
    ok("report", "--html", "html")  # its templates come from the wheel
    assert "S001" in (cwd / "html" / "patients" / "S001.html").read_text(encoding="utf-8")
    rows = ok("export", "--level", "visit").stdout.splitlines()
    assert len(rows) == 1 + 24 and ",S001," in rows[1]


@pytest.mark.slow
def test_the_installed_wheel_on_sqlite(installed: Installed, outside: Path) -> None:
    env = _environment(outside / "home", f"sqlite:///{outside / 'catalogue.sqlite3'}")
    _imports_from_the_venv(installed, outside, env)
    _whole_path(installed, outside, env)


@pytest.fixture
def server_schema() -> Iterator[str]:
    if not POSTGRES_URL:
        service_missing("PostgreSQL not configured: set ECZEMA_BATCH_TEST_POSTGRES_URL")
    assert POSTGRES_URL is not None
    schema = f"eb_wheel_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.mark.slow
def test_the_installed_wheel_on_postgresql_with_a_worker(
    installed: Installed, outside: Path, server_schema: str
) -> None:
    """The same path, measured by a Celery worker started from the installed wheel."""
    broker = require_redis()
    queue = f"eb-wheel-{uuid.uuid4().hex[:8]}"
    env = _environment(outside / "home", server_schema, ECZEMA_BATCH_BROKER_URL=broker)
    (outside / "home").mkdir()
    log = outside / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [str(installed.venv / "bin" / "eczema-batch"), "worker", "--queue", queue,
             "--hostname", f"{queue}@%h"],
            cwd=outside, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while " ready." not in log.read_text(errors="replace"):
            assert worker.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.5)
        _whole_path(installed, outside, env, queue=queue)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        import redis

        redis.Redis.from_url(broker).delete(queue, f"_kombu.binding.{queue}")
