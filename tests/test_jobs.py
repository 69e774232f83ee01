"""The job layer on its own, on SQLite and PostgreSQL: leases, claims, the measure gate, splits,
what a worker decides for a message, dispatch order and progress, and idempotent chunks.

No broker here: the job code is called directly (tests/test_workers.py runs real workers).
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Embedding, Image, Job, Mask, Run
from eczema_batch.jobs import follow, work
from eczema_batch.jobs.chunk import run_chunk
from eczema_batch.jobs.leases import MAX_ATTEMPTS, claim_job, finish_job, release_job, renew_lease
from eczema_batch.jobs.local import run_in_process
from eczema_batch.jobs.plan import Plan
from eczema_batch.jobs.runs import start_run
from eczema_batch.jobs.status import job_status
from eczema_batch.measuring.config import RunConfig
from eczema_batch.measuring.runtime import Runtime, get_runtime
from tests._model_fixtures import tiny_model_dir  # noqa: F401

WORK = {"segmenter_model": "tiny-seggpt", "embedder_model": "tiny-dino", "segmenter_mode": "seggpt",
        "prompts": 2, "exclude_same_patient": False,
        "targets": {"embedder_id": 1, "segmenter_id": 2, "head_id": None}}


def make_run(session: Session, **changes: Any) -> Run:
    run = Run(executor="celery", settings={**WORK, **changes}, state="running")
    session.add(run)
    session.flush()
    return run


def make_job(session: Session, run: Run, *, stage: str = "measure", ids: list[int] | None = None,
             state: str = "pending", queue: str = "gpu") -> Job:
    job = Job(run_id=run.id, stage=stage, queue=queue, image_ids=ids or [1, 2, 3], state=state)
    session.add(job)
    session.flush()
    return job


def job_row(factory: sessionmaker[Session], job_id: int) -> Job:
    with factory() as session:
        return session.get_one(Job, job_id)


# -- leases ----------------------------------------------------------------------------------


def test_a_claim_is_exclusive_until_the_lease_expires(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        job_id = make_job(session, make_run(session)).id
    with factory.begin() as session:
        assert claim_job(session, job_id, owner="a:1", lease_seconds=60)
    with factory.begin() as session:
        assert not claim_job(session, job_id, owner="b:2", lease_seconds=60)
        assert not renew_lease(session, job_id, owner="b:2")
        assert not finish_job(session, job_id, owner="b:2")
    with factory.begin() as session:  # a dies: its lease runs out
        session.execute(update(Job).where(Job.id == job_id).values(
            lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
    with factory.begin() as session:
        assert claim_job(session, job_id, owner="b:2", lease_seconds=60)
    with factory.begin() as session:
        assert not finish_job(session, job_id, owner="a:1")  # a's late results are not taken
        assert finish_job(session, job_id, owner="b:2")
    job = job_row(factory, job_id)
    assert (job.state, job.attempts, job.lease_owner) == ("done", 2, "b:2")


def test_concurrent_claims_have_one_winner(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        job_id = make_job(session, make_run(session)).id
    barrier = threading.Barrier(6)
    wins: list[str] = []

    def contend(owner: str) -> None:
        barrier.wait()
        with factory.begin() as session:
            if claim_job(session, job_id, owner=owner, lease_seconds=60):
                wins.append(owner)

    threads = [threading.Thread(target=contend, args=(f"w:{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(wins) == 1
    assert job_row(factory, job_id).lease_owner == wins[0]


def test_release_retries_until_the_attempts_run_out(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        job_id = make_job(session, make_run(session)).id
    states = []
    for _ in range(MAX_ATTEMPTS):
        with factory.begin() as session:
            assert claim_job(session, job_id, owner="w:1")
        with factory.begin() as session:
            states.append(release_job(session, job_id, owner="w:1", error="boom",
                                      permanent=False))
    assert states == ["pending"] * (MAX_ATTEMPTS - 1) + ["failed"]
    with factory.begin() as session:
        other = make_job(session, make_run(session)).id
    with factory.begin() as session:
        claim_job(session, other, owner="w:1")
    with factory.begin() as session:
        assert release_job(session, other, owner="w:1", error="bad", permanent=True) == "failed"


# -- the measure gate ------------------------------------------------------------------------


def test_measure_waits_for_embed_jobs_of_the_same_work(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        run = make_run(session)
        embed = make_job(session, run, stage="embed")
        measure = make_job(session, run)
        other_work = make_job(session, make_run(session, prompts=3), stage="embed")
        embed_id, measure_id, other_id = embed.id, measure.id, other_work.id
    with factory() as session:
        assert work.waiting_for(session, measure_id) == [embed_id]
        assert work.waiting_for(session, embed_id) == []
    # the worker's decision: look again later, without claiming (no attempt used)
    step = work.work_on(measure_id, factory=factory, owner="w:1")
    assert step.retry_in == work.WAIT_SECONDS and not step.transient
    assert job_row(factory, measure_id).attempts == 0
    with factory.begin() as session:
        session.execute(update(Job).where(Job.id == embed_id).values(state="failed"))
    with factory() as session:
        assert work.waiting_for(session, measure_id) == []  # other_id is other work
    assert job_row(factory, other_id).state == "pending"


# -- splitting after out of memory -----------------------------------------------------------


def test_split_replaces_a_job_by_two_halves(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        run = make_run(session)
        job_id = make_job(session, run, ids=[5, 6, 7, 8, 9]).id
        single = make_job(session, run, ids=[4]).id
        running = make_job(session, run, state="running").id
    with factory.begin() as session:
        children = work.split_job(session, job_id, reason="out of device memory")
        assert work.split_job(session, single, reason="out of device memory") == []
        assert work.split_job(session, running, reason="out of device memory") == []
    with factory() as session:
        rows = [session.get_one(Job, i) for i in children]
        parent = session.get_one(Job, job_id)
        lone = session.get_one(Job, single)
    assert [r.image_ids for r in rows] == [[5, 6, 7], [8, 9]]
    assert {(r.state, r.stage, r.queue, r.run_id) for r in rows} == {("pending", "measure", "gpu",
                                                                       parent.run_id)}
    assert parent.state == "cancelled" and "split into jobs" in (parent.last_error or "")
    assert lone.state == "failed" and "single image" in (lone.last_error or "")
    assert job_row(factory, running).state == "running"


def _raising(exc: BaseException) -> Any:
    def runtime_for(config: RunConfig) -> Runtime:
        raise exc

    return runtime_for


def test_out_of_memory_splits_the_chunk(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        job_id = make_job(session, make_run(session), stage="embed", ids=[1, 2, 3, 4]).id
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    step = work.work_on(job_id, factory=factory, owner="w:1", runtime_for=_raising(oom))
    assert step.state == "cancelled" and len(step.send) == 2 and step.queue == "gpu"
    assert step.retry_in is None
    with factory() as session:
        halves = [session.get_one(Job, i).image_ids for i in step.send]
    assert halves == [[1, 2], [3, 4]]


def test_transient_errors_retry_with_backoff(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        job_id = make_job(session, make_run(session), stage="embed").id
    outage = OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    step = work.work_on(job_id, factory=factory, owner="w:1", attempt=3,
                            runtime_for=_raising(outage))
    assert step.transient and step.retry_in is not None and 8 <= step.retry_in <= 10
    job = job_row(factory, job_id)
    assert job.state == "pending" and "OperationalError" in (job.last_error or "")
    # an unexpected error is retried as well, until the job's attempts run out
    step = work.work_on(job_id, factory=factory, owner="w:1",
                            runtime_for=_raising(ValueError("bug")))
    assert step.state == "pending" and step.transient


def test_an_unreachable_database_is_transient(factory: sessionmaker[Session]) -> None:
    from eczema_batch.catalogue.db import make_engine

    down = sessionmaker(make_engine("postgresql+psycopg://127.0.0.1:9/none?connect_timeout=2"))
    step = work.work_on(1, factory=down, owner="w:1")
    assert step.transient and step.state == "unknown" and step.retry_in is not None


def test_a_job_held_by_a_live_worker_waits_for_its_lease(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        job_id = make_job(session, make_run(session), stage="embed").id
    with factory.begin() as session:
        claim_job(session, job_id, owner="other:1", lease_seconds=20)
    step = work.work_on(job_id, factory=factory, owner="w:1", lease_seconds=20)
    assert step.state == "running" and step.retry_in is not None and 15 < step.retry_in <= 20.5
    assert job_row(factory, job_id).lease_owner == "other:1"


# -- dispatch and progress -------------------------------------------------------------------


def test_dispatch_sends_unfinished_embed_jobs_first(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        run = make_run(session)
        m1 = make_job(session, run, queue="local").id
        m2 = make_job(session, run, state="done").id
        e1 = make_job(session, run, stage="embed", queue="local").id
    plan = Plan(run_id=run.id, jobs={"measure": [m1, m2], "embed": [e1]})
    sent: list[tuple[int, str]] = []
    assert follow.dispatch_plan(factory, plan, queue="cpu",
                                  send=lambda j, q: sent.append((j, q))) == [e1, m1]
    assert sent == [(e1, "cpu"), (m1, "cpu")]
    assert job_row(factory, m1).queue == "cpu" and job_row(factory, m2).queue == "gpu"


def test_progress_follows_split_jobs_until_all_finish(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        run = make_run(session)
        a = make_job(session, run, ids=[1, 2, 3, 4]).id
        b = make_job(session, run, ids=[5, 6]).id
        make_job(session, run, ids=[7], state="done")  # finished before: not this plan's
    plan = Plan(run_id=run.id, jobs={"measure": [a, b]})
    tracked = follow.track(factory, plan)
    with factory.begin() as session:
        children = work.split_job(session, a, reason="out of device memory")
        make_job(session, make_run(session), ids=[9])  # another run's job: not ours
    with factory() as session:
        progress = follow.read_progress(session, tracked)
    assert progress.jobs == {"cancelled": 1, "pending": 3} and progress.total_images == 6

    remaining = [*children, b]

    def finish_one(_: float) -> None:
        with factory.begin() as session:
            session.execute(update(Job).where(Job.id == remaining.pop()).values(state="done"))

    seen: list[int] = []
    final = follow.wait_for_jobs(factory, tracked, sleep=finish_one, timeout=30,
                                   on_progress=lambda p: seen.append(p.finished_images))
    assert final.finished and final.finished_images == 6
    assert seen == [0, 2, 4, 6]


class FakeClock:
    """Seconds that pass only when the waiting loop sleeps: no test waits for real time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _lease(factory: sessionmaker[Session], job_id: int, *, owner: str, seconds: float) -> None:
    """Job `job_id` running, held by `owner` until `seconds` from now (negative: run out)."""
    with factory.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            state="running", lease_owner=owner,
            lease_expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)))


def test_a_waiting_client_resends_work_that_nobody_does(factory: sessionmaker[Session]) -> None:
    """A pending job whose message is gone and a job whose worker died (its lease ran out): after
    a lease's length with nobody at work, both are sent again, embed first, and then done."""
    with factory.begin() as session:
        run = make_run(session)
        lost = make_job(session, run, queue="cpu").id
        orphan = make_job(session, run, stage="embed", queue="cpu").id
    _lease(factory, orphan, owner="dead:1", seconds=-1)
    plan = Plan(run_id=run.id, jobs={"embed": [orphan], "measure": [lost]})
    clock = FakeClock()
    sent: list[tuple[float, list[tuple[int, str]]]] = []

    def resend(jobs: list[tuple[int, str]]) -> None:  # a worker that runs what it is sent
        sent.append((clock.now, jobs))
        with factory.begin() as session:
            session.execute(update(Job).where(Job.id.in_([j for j, _ in jobs]))
                            .values(state="done"))

    final = follow.wait_for_jobs(factory, follow.track(factory, plan), resend=resend,
                                   stall_seconds=10, sleep=clock.sleep, clock=clock,
                                   timeout=100)
    assert final.finished
    assert sent == [(10.0, [(orphan, "cpu"), (lost, "cpu")])]


def test_a_waiting_client_leaves_work_alone_while_a_worker_holds_a_live_lease(
    factory: sessionmaker[Session],
) -> None:
    with factory.begin() as session:
        run = make_run(session)
        waiting = make_job(session, run).id
        other = make_job(session, make_run(session)).id  # another run's, on the same queue
        elsewhere = make_job(session, make_run(session), queue="cpu").id
    _lease(factory, other, owner="alive:1", seconds=3600)
    _lease(factory, elsewhere, owner="alive:2", seconds=3600)  # another queue: no say
    plan = Plan(run_id=run.id, jobs={"measure": [waiting]})
    tracked = follow.track(factory, plan)
    clock = FakeClock()
    sent: list[float] = []
    final = follow.wait_for_jobs(factory, tracked, resend=lambda _: sent.append(clock.now),
                                   stall_seconds=10, sleep=clock.sleep, clock=clock, timeout=60)
    assert not final.finished and sent == []  # the worker is busy: the message waits its turn

    _lease(factory, other, owner="alive:1", seconds=-1)  # that worker died too
    final = follow.wait_for_jobs(factory, tracked, resend=lambda _: sent.append(clock.now),
                                   stall_seconds=10, sleep=clock.sleep, clock=clock, timeout=80)
    # Sent at 10 s; then nothing happens (no worker at all): again 20 s later, then 40 s later.
    assert not final.finished and sent == [70.0, 90.0, 130.0]


def test_a_waiting_client_survives_a_broker_it_cannot_reach(
    factory: sessionmaker[Session],
) -> None:
    from eczema_batch.errors import TransientError

    with factory.begin() as session:
        run = make_run(session)
        job_id = make_job(session, run).id
    plan = Plan(run_id=run.id, jobs={"measure": [job_id]})
    clock = FakeClock()
    tries: list[float] = []

    def resend(jobs: list[tuple[int, str]]) -> None:
        tries.append(clock.now)
        if len(tries) == 1:
            raise TransientError("cannot reach the broker")
        with factory.begin() as session:
            session.execute(update(Job).where(Job.id == job_id).values(state="done"))

    final = follow.wait_for_jobs(factory, follow.track(factory, plan), resend=resend,
                                   stall_seconds=5, sleep=clock.sleep, clock=clock, timeout=60)
    assert final.finished and tries == [5.0, 15.0]


def test_summary_reports_failed_jobs_and_images(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        run = make_run(session)
        ok = make_job(session, run, ids=[1, 2], state="done").id
        bad = make_job(session, run, ids=[3], state="failed").id
        session.execute(update(Job).where(Job.id == bad).values(last_error="ValueError: x"))
    plan = Plan(run_id=run.id, jobs={"measure": [ok, bad]})
    summary = follow.summarise(factory, plan, follow.track(factory, plan))
    assert summary.done_jobs == 1 and summary.failed_jobs == {bad: "ValueError: x"}
    with factory() as session:
        assert session.get_one(Run, run.id).state == "failed"
        status = job_status(session)
    assert status.by_state() == {"done": 1, "failed": 1}
    assert [j.id for j in status.failed_jobs] == [bad]


# -- chunks with the tiny models: redelivery and takeover change nothing -----------------------


def _study(factory: sessionmaker[Session], tmp_path: Path) -> None:
    from eczema_batch.ingest.service import ingest_study
    from eczema_batch.synth import write_synthetic_study

    summary = write_synthetic_study(tmp_path / "study", patients=3, visits=2, size=(64, 48))
    ingest_study(summary.root, factory=factory, max_pixels=10**8, processes=1)


def _results(factory: sessionmaker[Session]) -> dict[str, Any]:
    with factory() as session:
        return {
            "embeddings": sorted(session.execute(select(
                Embedding.id, Embedding.image_id, Embedding.model_id, Embedding.region,
                Embedding.variant, Embedding.vector)).all()),
            "masks": sorted(session.execute(select(
                Mask.id, Mask.image_id, Mask.variant, Mask.png, Mask.prompt_ids)
                .where(Mask.kind == "predicted")).all()),
        }


def test_a_redelivered_or_taken_over_chunk_changes_nothing(
    factory: sessionmaker[Session], tmp_path: Path, tiny_model_dir: Path  # noqa: F811
) -> None:
    _study(factory, tmp_path)
    config = RunConfig(segmenter_model="tiny-seggpt", embedder_model="tiny-dino", device="cpu",
                       model_dir=str(tiny_model_dir))
    plan = start_run(factory, config=config, executor="local", queue="local", chunk_size=64)
    embed_id, measure_id = plan.jobs["embed"][0], plan.jobs["measure"][0]
    # A worker claims the measure job and loses it mid-chunk: its lease expires, another worker
    # takes the job over and finishes it; the first one's results must not be written.
    assert run_chunk(embed_id, factory=factory, owner="w:1").state == "done"
    outcome: dict[str, Any] = {}

    def slow_runtime(cfg: RunConfig) -> Runtime:
        with factory.begin() as session:
            session.execute(update(Job).where(Job.id == measure_id).values(
                lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
        outcome["b"] = run_chunk(measure_id, factory=factory, owner="w:2")
        return get_runtime(cfg)

    try:
        outcome["a"] = run_chunk(measure_id, factory=factory, owner="w:1",
                                 runtime_for=slow_runtime).state
    except OperationalError:  # SQLite: a's snapshot is older than b's commit
        outcome["a"] = "lost"
    assert outcome["b"].state == "done" and outcome["a"] == "lost"
    job = job_row(factory, measure_id)
    assert (job.state, job.lease_owner, job.attempts) == ("done", "w:2", 2)
    before = _results(factory)
    with factory() as session:
        images = session.scalar(select(func.count(Image.id)))
    assert len([e for e in before["embeddings"] if e[3] == "crop"]) == images
    # Redelivered messages for finished jobs change nothing.
    for job_id in (embed_id, measure_id):
        assert run_chunk(job_id, factory=factory, owner="w:3").state == "done"
    # Neither does running the whole thing again.
    again = start_run(factory, config=config, executor="local", queue="local", chunk_size=64)
    assert again.job_count == 0
    summary = run_in_process(factory, again)
    assert summary.done_jobs == 0 and _results(factory) == before


def test_the_core_never_imports_celery() -> None:
    import subprocess
    import sys

    code = ("import sys, eczema_batch.cli, eczema_batch.jobs.work, eczema_batch.jobs.follow, "
            "eczema_batch.jobs.status, eczema_batch.jobs.local; assert not [m for m in sys.modules "
            "if m.split('.')[0] in ('celery', 'kombu', 'eczema_batch_workers')], 'celery imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_retry_failed_with_a_study_leaves_other_studies_failures_alone(
    factory: sessionmaker[Session],
) -> None:
    from eczema_batch.catalogue.models import Model
    from eczema_batch.jobs.plan import Targets, plan_run
    from tests.report_factories import make_image, make_patient, make_study, make_visit

    with factory() as s, s.begin():
        embedder = Model(kind="embedder", name="tiny-dino", digest="e" * 64, config={})
        s.add(embedder)
        images = {}
        for name in ("a", "b"):
            visit = make_visit(s, make_patient(s, make_study(s, name), "P1"), dt.date(2024, 1, 1))
            images[name] = make_image(s, visit, decode_status="the file is gone")
        s.flush()
        failed = {name: Job(stage="measure", image_ids=[image.id], state="failed")
                  for name, image in images.items()}
        s.add_all(failed.values())
        s.flush()
        ids = {name: (image.id, failed[name].id) for name, image in images.items()}
        targets = Targets(embedder_id=embedder.id, segmenter_id=None, head_id=None)
        config = RunConfig(segmenter_model="tiny-seggpt", embedder_model="tiny-dino",
                           segmenter_mode="none")
        plan = plan_run(s, config=config, targets=targets, executor="local", queue="local",
                        chunk_size=8, study="a", retry_failed=True)
    with factory() as s:
        status = {name: s.get_one(Image, iid).decode_status for name, (iid, _) in ids.items()}
        jobs = {name: s.get_one(Job, jid).state for name, (_, jid) in ids.items()}
        measured = [i for jid in plan.jobs["measure"] for i in s.get_one(Job, jid).image_ids]
    assert status == {"a": "ok", "b": "the file is gone"}
    assert jobs == {"a": "cancelled", "b": "failed"}
    assert measured == [ids["a"][0]]
