"""Real Celery workers (subprocesses of `eczema-batch worker`) on the real Redis, PostgreSQL
catalogue, tiny models: kill a worker mid-chunk, flush Redis with jobs in flight, two workers on one
queue, a bad image inside a chunk, the Celery run equal to the in-process run.

Two workers start once for the module (on a queue of their own, Redis DB from
ECZEMA_BATCH_TEST_REDIS_URL) and are terminated at its end. To kill a worker *mid-chunk* every time,
the worker processes are started through a small wrapper that sleeps inside a chunk (after the job
is claimed, while its lease is held) when a flag file says so; otherwise it is the real command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.db import get_engine, open_catalogue
from eczema_batch.catalogue.models import Base, Embedding, Image, Job, Mask, Prediction, Run
from eczema_batch.cli import app
from eczema_batch.config import get_settings
from eczema_batch.ingest.service import ingest_study
from eczema_batch.synth import write_synthetic_study
from tests._model_fixtures import tiny_model_dir  # noqa: F401
from tests.conftest import require_redis

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
#: Short enough for a test to see a dead worker's job taken over; heartbeats renew at a third.
LEASE_SECONDS = "4"
#: Redis gives a message back this long after a worker took it and vanished.
VISIBILITY_TIMEOUT = "10"
T = TypeVar("T")

#: `eczema-batch worker ...`, with a chunk that first sleeps while the flag file exists.
WORKER_BOOT = """
import os, sys, time
from pathlib import Path
from eczema_batch.jobs import chunk
flag = Path(os.environ["EB_TEST_SLOW_FLAG"])
def slowed(original):
    def run(self):
        if flag.exists():
            time.sleep(float(flag.read_text() or 0))
        return original(self)
    return run
chunk._Chunk.embed_full = slowed(chunk._Chunk.embed_full)
chunk._Chunk.measure = slowed(chunk._Chunk.measure)
from eczema_batch.cli import main
main()
"""


def wait_until(what: str, probe: Callable[[], T], *, timeout: float = 90,
               every: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class Worker:
    name: str
    log: Path
    proc: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pool_pids(self) -> set[int]:
        """The pool processes this worker forked (their parent is the worker's main process)."""
        pids = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    pids.add(int(entry.name))
        return pids

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)  # warm shutdown: the pool goes with it
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)


@dataclass
class Cluster:
    url: str
    broker: str
    queue: str
    env: dict[str, str]
    flag: Path
    home: Path
    workers: list[Worker] = field(default_factory=list)

    @property
    def factory(self) -> sessionmaker[Session]:
        return open_catalogue(self.url)

    def start_worker(self, index: int, **env: str) -> Worker:
        name = f"w{index}-{self.queue}@%h"
        log = self.home / f"worker{index}-{uuid.uuid4().hex[:6]}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", WORKER_BOOT, "worker", "--queue", self.queue,
                 "--hostname", name, "--loglevel", "INFO"],
                cwd=REPO, env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return Worker(name, log, proc)

    def ensure_workers(self) -> None:
        for i, worker in enumerate(self.workers):
            if not worker.alive():
                worker.stop()
                self.workers[i] = self.start_worker(i)
        for worker in self.workers:
            wait_until(f"worker {worker.name} to be ready",
                       lambda w=worker: " ready." in w.log.read_text(errors="replace")
                       or (not w.alive() and pytest.fail(w.log.read_text(errors="replace"))),
                       timeout=180, every=0.5)

    def slow(self, seconds: float) -> None:
        if seconds:
            self.flag.write_text(str(seconds))
        else:
            self.flag.unlink(missing_ok=True)

    def cli(self, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, list(args))
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout + result.stderr

    def subprocess_cli(self, *args: str, timeout: float = 180) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "eczema_batch", *args], cwd=REPO,
                              env={**self.env, "ECZEMA_BATCH_CHUNK_SIZE":
                                   os.environ["ECZEMA_BATCH_CHUNK_SIZE"]},
                              capture_output=True, timeout=timeout, check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
        return dict(json.loads(done.stdout))

    def start_client(self, *args: str) -> subprocess.Popen[bytes]:
        """`eczema-batch ARGS` in a process of its own (a `run` that waits, say)."""
        return subprocess.Popen([sys.executable, "-m", "eczema_batch", *args], cwd=REPO,
                                env={**self.env, "ECZEMA_BATCH_CHUNK_SIZE":
                                     os.environ["ECZEMA_BATCH_CHUNK_SIZE"]},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def jobs(self) -> list[Job]:
        with self.factory() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))

    def wait_finished(self, timeout: float = 120) -> list[Job]:
        def finished() -> list[Job] | None:
            jobs = self.jobs()
            return jobs if jobs and all(j.state not in ("pending", "running")
                                        for j in jobs) else None

        return wait_until("every job to finish", finished, timeout=timeout, every=0.25)


@pytest.fixture(scope="module")
def cluster(
    _postgres_schema: str, tiny_model_dir: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    redis_url = require_redis()
    import redis

    home = tmp_path_factory.mktemp("cluster")
    queue = f"eb-test-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "ECZEMA_BATCH_DATABASE_URL": _postgres_schema,
        "ECZEMA_BATCH_BROKER_URL": redis_url,
        "ECZEMA_BATCH_LEASE_SECONDS": LEASE_SECONDS,
        "ECZEMA_BATCH_VISIBILITY_TIMEOUT": VISIBILITY_TIMEOUT,
        "ECZEMA_BATCH_MODEL_DIR": str(tiny_model_dir),
        "ECZEMA_BATCH_SEGMENTER_MODEL": "tiny-seggpt",
        "ECZEMA_BATCH_EMBEDDER_MODEL": "tiny-dino",
        "ECZEMA_BATCH_DEVICE": "cpu",
        "ECZEMA_BATCH_HOME": str(home / "home"),
        "EB_TEST_SLOW_FLAG": str(home / "slow"),
        # Tiny models on a shared 2-core machine: one thread per process is several times faster.
        "OMP_NUM_THREADS": "1",
    }
    c = Cluster(_postgres_schema, redis_url, queue, env, home / "slow", home)
    c.workers = [c.start_worker(0), c.start_worker(1)]
    try:
        yield c
    finally:
        for worker in c.workers:
            worker.stop()
        redis.Redis.from_url(redis_url).delete(queue, f"_kombu.binding.{queue}",
                                              f"_kombu.binding_permanent.{queue}")


@pytest.fixture(scope="module")
def study_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("studies") / "trial"
    write_synthetic_study(root, patients=4, visits=2, seed=5, size=(64, 48))
    return root


@pytest.fixture
def live(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """The cluster with an empty catalogue, this process configured like the workers."""
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with get_engine(cluster.url).begin() as conn:
        # No RESTART IDENTITY: a stray message from an earlier test then names no job.
        conn.execute(text(f"TRUNCATE {tables} CASCADE"))
    cluster.slow(0)
    for key, value in cluster.env.items():
        if key.startswith("ECZEMA_BATCH_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("ECZEMA_BATCH_CHUNK_SIZE", "8")
    get_settings.cache_clear()
    cluster.ensure_workers()
    yield cluster
    cluster.slow(0)
    get_settings.cache_clear()


def ingest(c: Cluster, root: Path) -> None:
    report = ingest_study(root, factory=c.factory, max_pixels=10**8, processes=1)
    assert report.exit_code == 0


def dispatch_no_wait(c: Cluster) -> dict[str, Any]:
    code, out = c.cli("run", "--queue", c.queue, "--no-wait", "--json")
    assert code == 0, out
    return dict(json.loads(out[: out.rindex("}") + 1]))


def results(c: Cluster) -> dict[str, list[tuple[Any, ...]]]:
    """Everything the runs wrote, without row ids and timestamps (equal runs compare equal)."""
    with c.factory() as session:
        return {
            "embeddings": sorted(tuple(r) for r in session.execute(select(
                Embedding.image_id, Embedding.model_id, Embedding.region, Embedding.variant,
                Embedding.dim, Embedding.vector))),
            "masks": sorted(tuple(r) for r in session.execute(select(
                Mask.image_id, Mask.variant, Mask.model_id, Mask.png, Mask.width, Mask.height,
                Mask.area_fraction, Mask.flag).where(Mask.kind == "predicted"))),
            "prompts": sorted((r[0], tuple(r[1]), tuple(r[2])) for r in session.execute(select(
                Mask.image_id, Mask.prompt_ids, Mask.prompt_similarities)
                .where(Mask.kind == "predicted"))),
        }


def assert_one_result_per_image(c: Cluster, *, failed: frozenset[int] = frozenset()) -> None:
    with c.factory() as session:
        images = set(session.scalars(select(Image.id))) - failed
        for region in ("full", "crop"):
            per_image = dict(session.execute(
                select(Embedding.image_id, func.count()).where(Embedding.region == region)
                .group_by(Embedding.image_id)).all())
            assert {i: per_image.get(i, 0) for i in images} == dict.fromkeys(images, 1), region
        masks = dict(session.execute(
            select(Mask.image_id, func.count()).where(Mask.kind == "predicted")
            .group_by(Mask.image_id)).all())
        assert {i: masks.get(i, 0) for i in images} == dict.fromkeys(images, 1)
        assert not failed & set(masks)


def running_measure_job(c: Cluster) -> Job | None:
    return next((j for j in c.jobs() if j.stage == "measure" and j.state == "running"
                 and j.lease_owner), None)


def owner_pid(job: Job) -> int:
    host, _, pid = (job.lease_owner or "").rpartition(":")
    assert host == socket.gethostname()
    return int(pid)


# -- the tests -------------------------------------------------------------------------------


def test_a_pool_process_killed_mid_chunk_has_its_chunk_redone(
    live: Cluster, study_root: Path
) -> None:
    ingest(live, study_root)
    live.slow(2.0)
    dispatch_no_wait(live)
    job = wait_until("a measure job to be running", lambda: running_measure_job(live))
    pid = owner_pid(job)
    assert any(pid in w.pool_pids() for w in live.workers), "the lease holder is not our worker"
    os.kill(pid, signal.SIGKILL)  # mid-chunk: the chunk sleeps 2 s after its claim
    live.slow(0)
    jobs = {j.id: j for j in live.wait_finished()}
    redone = jobs[job.id]
    assert (redone.state, redone.attempts) == ("done", 2)
    assert redone.lease_owner != job.lease_owner
    assert {j.state for j in jobs.values()} == {"done"}
    assert_one_result_per_image(live)


def test_a_flushed_broker_loses_nothing_run_sends_it_again(
    live: Cluster, study_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    monkeypatch.setenv("ECZEMA_BATCH_CHUNK_SIZE", "2")
    get_settings.cache_clear()
    ingest(live, study_root)
    live.slow(0.7)
    sent = dispatch_no_wait(live)["jobs_sent"]
    # Both workers busy with a chunk (prefetch 1: each holds just that message); the other
    # messages wait in Redis, and go with it.
    wait_until("both workers to be in a chunk",
               lambda: sum(j.state == "running" for j in live.jobs()) == 2)
    redis.Redis.from_url(live.broker).flushdb()
    live.slow(0)

    def settled() -> list[str] | None:
        before = [j.state for j in live.jobs()]
        time.sleep(3 * float(LEASE_SECONDS) / 2)
        after = [j.state for j in live.jobs()]
        return after if before == after and "running" not in after else None

    stuck = wait_until("the workers to run out of messages", settled, timeout=60)
    assert "pending" in stuck, "nothing was in Redis when it was flushed"
    # `run` again: the catalogue knows what is unfinished and sends it again.
    payload = live.subprocess_cli("run", "--queue", live.queue, "--json")
    assert payload["resumed_jobs"] == stuck.count("pending") and payload["failed_jobs"] == {}
    jobs = live.jobs()
    assert {j.state for j in jobs} == {"done"} and len(jobs) == sent
    assert_one_result_per_image(live)


def finished_client(proc: subprocess.Popen[bytes], timeout: float = 240) -> tuple[dict[str, Any],
                                                                                  str]:
    """The waiting `run --json`'s payload and stderr, once it has returned by itself."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("the waiting client never finished: "
                             + err.decode(errors="replace")[-2000:]) from None
    text = err.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return dict(json.loads(out)), text


RESENT = "sent them again"


def test_a_waiting_client_resends_what_a_flushed_broker_lost(
    live: Cluster, study_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No second `run`: the waiting one sees pending jobs that no worker takes up and sends them
    again."""
    import redis

    monkeypatch.setenv("ECZEMA_BATCH_CHUNK_SIZE", "2")
    get_settings.cache_clear()
    ingest(live, study_root)
    live.slow(0.7)
    client = live.start_client("run", "--queue", live.queue, "--json")
    wait_until("both workers to be in a chunk",
               lambda: sum(j.state == "running" for j in live.jobs()) == 2, timeout=120)
    redis.Redis.from_url(live.broker).flushdb()
    live.slow(0)
    payload, err = finished_client(client)
    assert RESENT in err
    jobs = live.jobs()
    assert {j.state for j in jobs} == {"done"} and payload["failed_jobs"] == {}
    with live.factory() as session:
        images = session.scalar(select(func.count()).select_from(Image))
    assert payload["measured"]["measure"] == images
    assert_one_result_per_image(live)


def test_a_waiting_client_resends_the_chunk_of_a_cluster_killed_outright(
    live: Cluster, study_root: Path
) -> None:
    """Every worker's process group killed mid-chunk, then workers started again. Their broker
    gives an unacknowledged message back only after an hour here: the waiting client, seeing the
    dead worker's lease run out with nobody at work, sends the chunk again."""
    ingest(live, study_root)
    live.slow(2.0)
    client = live.start_client("run", "--queue", live.queue, "--json")
    try:
        job = wait_until("a measure job to be running", lambda: running_measure_job(live),
                         timeout=120)
        for worker in live.workers:
            os.killpg(worker.proc.pid, signal.SIGKILL)  # power cut: nobody says goodbye
            worker.proc.wait(timeout=10)
        live.slow(0)
        live.workers = [live.start_worker(i, ECZEMA_BATCH_VISIBILITY_TIMEOUT="3600")
                        for i in range(len(live.workers))]
        payload, err = finished_client(client)
    finally:
        for worker in live.workers:  # the next test gets the cluster's own workers again
            worker.stop()
    assert RESENT in err
    jobs = {j.id: j for j in live.jobs()}
    assert (jobs[job.id].state, jobs[job.id].attempts) == ("done", 2)
    assert {j.state for j in jobs.values()} == {"done"} and payload["failed_jobs"] == {}
    assert_one_result_per_image(live)


def test_two_workers_share_a_queue_and_match_the_in_process_run(
    live: Cluster, study_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eczema_batch_workers.celery_app import job_sender

    monkeypatch.setenv("ECZEMA_BATCH_CHUNK_SIZE", "4")
    get_settings.cache_clear()
    ingest(live, study_root)
    live.slow(0.5)
    dispatch_no_wait(live)
    with job_sender(live.broker) as send:  # every job delivered twice, as after a redelivery
        for job in live.jobs():
            send(job.id, live.queue)
    jobs = live.wait_finished()
    live.slow(0)
    assert {j.state for j in jobs} == {"done"}
    # Never two holders of one job, at once or one after the other: one claim per job.
    assert [j.attempts for j in jobs] == [1] * len(jobs)
    assert len({j.lease_owner for j in jobs}) == 2, "both workers should have had work"
    assert_one_result_per_image(live)
    on_celery = results(live)

    with live.factory.begin() as session:  # the same catalogue, measured again in one process
        for model in (Prediction, Embedding, Job, Run):
            session.execute(delete(model))
        session.execute(delete(Mask).where(Mask.kind == "predicted"))
    payload = live.subprocess_cli("run", "--json")
    assert payload["failed_jobs"] == {} and payload["images"]["measure"] == len(
        {r[0] for r in on_celery["masks"]})
    assert results(live) == on_celery


def test_a_bad_image_fails_alone(live: Cluster, study_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "trial"
    shutil.copytree(study_root, root)
    ingest(live, root)
    with live.factory() as session:
        bad_id, path = session.execute(
            select(Image.id, Image.path).where(Image.format == "jpeg", ~Image.id.in_(
                select(Mask.image_id).where(Mask.kind == "manual"))).order_by(Image.id).limit(1)
        ).one()
    (root / path).write_bytes(b"\xff\xd8\xff\xe0 this is no longer a picture")
    dispatch_no_wait(live)
    jobs = live.wait_finished()
    assert {j.state for j in jobs} == {"done"}
    holder = next(j for j in jobs if bad_id in j.image_ids and j.stage == "measure")
    assert holder.last_error is not None and f"image {bad_id}" in holder.last_error
    assert_one_result_per_image(live, failed=frozenset({bad_id}))
    code, out = live.cli("status", "--json")
    failed = json.loads(out[: out.rindex("}") + 1])["jobs"]["failed_images"]
    assert [(f["id"], f["path"]) for f in failed] == [(bad_id, path)]
    # The reason, kept per image: the file is no longer the one catalogued.
    assert failed[0]["reason"].startswith("the file changed since it was catalogued")


def test_a_whole_worker_killed_mid_chunk_is_replaced_by_the_other(
    live: Cluster, study_root: Path
) -> None:
    ingest(live, study_root)
    live.slow(2.0)
    dispatch_no_wait(live)
    job = wait_until("a measure job to be running", lambda: running_measure_job(live))
    pid = owner_pid(job)
    victim = next(w for w in live.workers if pid in w.pool_pids())
    os.killpg(victim.proc.pid, signal.SIGKILL)  # the worker and its pool: nobody says goodbye
    victim.proc.wait(timeout=10)
    live.slow(0)
    # Its message is unacknowledged in Redis: the other worker restores it after the visibility
    # timeout and takes the job over once the dead worker's lease has run out.
    jobs = {j.id: j for j in live.wait_finished(timeout=120)}
    assert (jobs[job.id].state, jobs[job.id].attempts) == ("done", 2)
    assert {j.state for j in jobs.values()} == {"done"}
    assert_one_result_per_image(live)


def test_queue_needs_a_broker(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECZEMA_BATCH_BROKER_URL", raising=False)
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["run", "--queue", "gpu"])
    assert result.exit_code == 2
    assert "--queue needs a broker: set ECZEMA_BATCH_BROKER_URL=redis://host:6379/0" in (
        result.stderr)
    result = CliRunner().invoke(app, ["worker", "--queue", "gpu"])
    assert result.exit_code == 2 and "ECZEMA_BATCH_BROKER_URL" in result.stderr
    result = CliRunner().invoke(app, ["run", "--no-wait"])
    assert result.exit_code == 2 and "--no-wait goes with --queue" in result.stderr


def test_compose_file_describes_the_cluster() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "worker-gpu", "worker-cpu"}
    assert services["migrate"]["command"] == ["eczema-batch", "db", "upgrade"]
    gpu, cpu = services["worker-gpu"], services["worker-cpu"]
    assert gpu["command"][:4] == ["eczema-batch", "worker", "--queue", "gpu"]
    assert cpu["command"][:4] == ["eczema-batch", "worker", "--queue", "cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert len(device["device_ids"]) == 1  # one worker per GPU
    for worker in (gpu, cpu):
        env = worker["environment"]
        assert env["ECZEMA_BATCH_BROKER_URL"].startswith("redis://redis:")
        assert env["ECZEMA_BATCH_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert any(v["target"] == env["ECZEMA_BATCH_IMAGE_ROOT"] and v["read_only"]
                   for v in worker["volumes"])
        assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
