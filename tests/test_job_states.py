"""Job states (eczema_batch/jobs/states.py) on SQLite and PostgreSQL: every allowed move made by
the function that makes it, every other move refused, the stored strings unchanged, and no bare
state string in the job code."""

from __future__ import annotations

import ast
import datetime as dt
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import insert, text
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Job, Run
from eczema_batch.errors import TransientError
from eczema_batch.jobs import states
from eczema_batch.jobs.leases import claim_job, finish_job, release_job
from eczema_batch.jobs.local import expire_dead_local_leases
from eczema_batch.jobs.plan import Targets, plan_run
from eczema_batch.jobs.runs import RunSummary, finish_run
from eczema_batch.jobs.states import (
    FINISHED,
    TRANSITIONS,
    UNFINISHED,
    IllegalTransition,
    JobState,
    NoState,
    RunState,
    check_transition,
)
from eczema_batch.jobs.work import split_job
from eczema_batch.measuring.config import RunConfig, RunSettings

REPO = Path(__file__).resolve().parents[1]
LATER = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
CONFIG = RunConfig(segmenter_model="tiny-seggpt", embedder_model="tiny-dino",
                   segmenter_mode="none")
TARGETS = Targets(embedder_id=1, segmenter_id=None, head_id=None)


def test_the_stored_strings_are_what_they_always_were() -> None:
    assert [s.value for s in JobState] == ["pending", "running", "done", "failed", "cancelled"]
    assert [s.value for s in RunState] == ["running", "done", "failed"]
    assert [s.value for s in NoState] == ["lost", "missing", "unknown"]
    assert JobState("cancelled") is JobState.CANCELLED and JobState.DONE == "done"


def test_the_table_names_every_state_and_unfinished_and_finished_split_them() -> None:
    assert set(TRANSITIONS) == set(JobState)
    assert set(UNFINISHED) | set(FINISHED) == set(JobState)
    assert not set(UNFINISHED) & set(FINISHED)
    # Only an unfinished job can become done; nothing leaves done or cancelled.
    assert {old for old, new in _allowed() if new == JobState.DONE} <= set(UNFINISHED)
    assert not TRANSITIONS[JobState.DONE] and not TRANSITIONS[JobState.CANCELLED]


def _allowed() -> set[tuple[JobState, JobState]]:
    return {(old, new) for old, targets in TRANSITIONS.items() for new in targets}


@pytest.mark.parametrize(
    ("old", "new"),
    sorted(((o, n) for o in JobState for n in JobState if (o, n) not in _allowed()), key=str),
    ids=str,
)
def test_a_move_the_table_does_not_list_raises(old: JobState, new: JobState) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(old, new)
    with pytest.raises(IllegalTransition):
        check_transition((JobState.PENDING, old.value), new)  # one bad source is enough


def test_a_string_that_is_no_state_raises() -> None:
    with pytest.raises(IllegalTransition, match="not a job state"):
        check_transition("paused", JobState.RUNNING)
    assert check_transition("pending", JobState.RUNNING) is JobState.RUNNING


# -- every allowed move, made by the real function ------------------------------------------


@dataclass(frozen=True)
class Move:
    """A job in `old`, `act` on it, and it is in `new`."""

    old: JobState
    new: JobState
    act: Callable[[Session, int], None]
    images: int = 3
    owner: str | None = None

    @property
    def id(self) -> str:
        return f"{self.old}->{self.new}:{getattr(self.act, '__name__', '')}"


def _claim(session: Session, job_id: int) -> None:
    assert claim_job(session, job_id, owner="w:2")


def _expire_then_claim(session: Session, job_id: int) -> None:
    # The holder is a process of this host that is gone: its lease is expired, then taken over.
    assert expire_dead_local_leases(session, [job_id]) == 1
    assert claim_job(session, job_id, owner="w:2")


def _finish(session: Session, job_id: int) -> None:
    assert finish_job(session, job_id, owner="w:1")


def _release_to_retry(session: Session, job_id: int) -> None:
    release_job(session, job_id, owner="w:1", error="a blip", permanent=False)


def _release_for_good(session: Session, job_id: int) -> None:
    release_job(session, job_id, owner="w:1", error="bad input", permanent=True)


def _split(session: Session, job_id: int) -> None:
    split_job(session, job_id, reason="out of device memory")


def _supersede(session: Session, job_id: int) -> None:
    # The job has no run, so it was planned with other settings than this run's.
    plan_run(session, config=CONFIG, targets=TARGETS, executor="local", queue="local",
             chunk_size=8)


def _retry_failed(session: Session, job_id: int) -> None:
    plan_run(session, config=CONFIG, targets=TARGETS, executor="local", queue="local",
             chunk_size=8, retry_failed=True)


def _dead_owner() -> str:
    """A lease owner as worker_name() writes it, for a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}"


MOVES = [
    Move(JobState.PENDING, JobState.RUNNING, _claim),
    Move(JobState.RUNNING, JobState.RUNNING, _expire_then_claim, owner="dead"),
    Move(JobState.RUNNING, JobState.DONE, _finish, owner="w:1"),
    Move(JobState.RUNNING, JobState.PENDING, _release_to_retry, owner="w:1"),
    Move(JobState.RUNNING, JobState.FAILED, _release_for_good, owner="w:1"),
    Move(JobState.PENDING, JobState.CANCELLED, _split, images=2),
    Move(JobState.PENDING, JobState.FAILED, _split, images=1),
    Move(JobState.PENDING, JobState.CANCELLED, _supersede),
    Move(JobState.FAILED, JobState.CANCELLED, _retry_failed),
]


def test_every_allowed_move_has_a_case_here() -> None:
    assert {(m.old, m.new) for m in MOVES} == _allowed()


def _job_in(factory: sessionmaker[Session], state: JobState, *, images: int = 3,
            owner: str | None = None) -> int:
    """A job without a run in `state`; with `owner`, held by it on a live lease."""
    owner = _dead_owner() if owner == "dead" else owner
    with factory.begin() as session:
        job = Job(stage="measure", queue="gpu", image_ids=list(range(1, images + 1)),
                  state=state, lease_owner=owner, attempts=1 if owner else 0,
                  lease_expires_at=LATER if owner else None)
        session.add(job)
        session.flush()
        return job.id


def _state_of(factory: sessionmaker[Session], job_id: int) -> str:
    with factory() as session:
        return session.get_one(Job, job_id).state


@pytest.mark.parametrize("move", MOVES, ids=lambda m: m.id)
def test_an_allowed_move_is_made_by_its_function(
    factory: sessionmaker[Session], move: Move
) -> None:
    job_id = _job_in(factory, move.old, images=move.images, owner=move.owner)
    with factory.begin() as session:
        move.act(session, job_id)
    assert _state_of(factory, job_id) == move.new


@pytest.mark.parametrize("move", MOVES, ids=lambda m: m.id)
def test_the_function_asks_the_table_first(
    factory: sessionmaker[Session], move: Move, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Take the move out of the table: its function raises and the job stays as it was."""
    job_id = _job_in(factory, move.old, images=move.images, owner=move.owner)
    without = {old: targets - {move.new} if old == move.old else targets
               for old, targets in TRANSITIONS.items()}
    monkeypatch.setattr(states, "TRANSITIONS", without)
    with pytest.raises(IllegalTransition), factory.begin() as session:
        move.act(session, job_id)
    assert _state_of(factory, job_id) == move.old


@pytest.mark.parametrize("state", FINISHED, ids=str)
def test_the_functions_leave_a_finished_job_alone(
    factory: sessionmaker[Session], state: JobState
) -> None:
    job_id = _job_in(factory, state, owner="w:1")
    with factory.begin() as session:
        assert not claim_job(session, job_id, owner="w:2")
        assert not finish_job(session, job_id, owner="w:1")
        assert release_job(session, job_id, owner="w:1", error="x", permanent=False) == state
        assert split_job(session, job_id, reason="out of device memory") == []
    assert _state_of(factory, job_id) == state


# -- the catalogue keeps the same strings ---------------------------------------------------


def test_rows_hold_plain_strings_and_old_rows_still_work(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:  # a row as the code before the enum wrote it
        old = session.execute(insert(Job).values(stage="measure", queue="gpu", image_ids=[1],
                                                 state="pending", attempts=0)
                              .returning(Job.id)).scalar_one()
    with factory.begin() as session:
        assert claim_job(session, old, owner="w:1")
        assert finish_job(session, old, owner="w:1")
    with factory.begin() as session:
        plan = plan_run(session, config=CONFIG, targets=TARGETS, executor="local",
                        queue="local", chunk_size=8)
        new = Job(stage="measure", queue="gpu", image_ids=[2], run_id=plan.run_id)
        session.add(new)  # the model's default state
    with factory() as session:
        stored = dict(session.execute(text("SELECT id, state FROM jobs")).all())
        run_state = session.execute(text("SELECT state FROM runs")).scalar_one()
    assert stored == {old: "done", new.id: "pending"}
    assert all(type(v) is str for v in stored.values())
    assert run_state == "running" and type(run_state) is str


def test_finish_run_is_where_a_run_ends(factory: sessionmaker[Session]) -> None:
    with factory.begin() as session:
        plan = plan_run(session, config=CONFIG, targets=TARGETS, executor="local",
                        queue="local", chunk_size=8)
    for failed, expected in (({}, RunState.DONE), ({7: "boom"}, RunState.FAILED)):
        with factory.begin() as session:
            finish_run(session, RunSummary(run_id=plan.run_id, targets=TARGETS,
                                           failed_jobs=failed))
        with factory() as session:
            run = session.get_one(Run, plan.run_id)
            assert run.state == expected and run.finished_at is not None


# -- no bare state strings in the job code --------------------------------------------------

#: The code that writes or compares job and run states. states.py itself spells them out.
SCANNED = [
    *sorted(p for p in (REPO / "eczema_batch" / "jobs").glob("*.py") if p.name != "states.py"),
    REPO / "eczema_batch" / "catalogue" / "models.py",
    *sorted((REPO / "workers").glob("*.py")),
]
STATE_WORDS = {s.value for s in (*JobState, *RunState, *NoState)}


def bare_states(source: str, name: str = "<source>") -> Iterator[str]:
    """`file:line: 'word'` for each string literal in `source` that spells a state.

    Everything but docstrings and other bare string statements counts: in these modules such a
    word is a state (`state="done"`, `Job.state == "running"`, `.in_(("pending", ...))`,
    `Step(job_id, "unknown")`), and each has its enum member.
    """
    tree = ast.parse(source, name)
    prose = {id(node.value) for node in ast.walk(tree)
             if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and node.value in STATE_WORDS and id(node) not in prose):
            yield f"{name}:{node.lineno}: {node.value!r}"


@pytest.mark.parametrize("snippet", [
    'Job(stage="embed", state="pending")',
    'select(Job).where(Job.state == "running")',
    'job.state, job.updated_at = "cancelled", now',
    'Job.state.in_(("pending", "running"))',
    'return Step(job_id, "unknown")',
    'run.state = "failed" if failed else "done"',
])
def test_the_scan_finds_a_bare_state(snippet: str) -> None:
    assert list(bare_states(snippet))


def test_the_scan_lets_docstrings_and_members_be() -> None:
    source = ('"""Jobs go from pending to done."""\n'
              'Job(state=JobState.PENDING)\nlog("%d done", n)\n')
    assert list(bare_states(source)) == []


def test_no_bare_state_strings_in_the_job_code() -> None:
    assert len(SCANNED) > 10
    found = [hit for path in SCANNED
             for hit in bare_states(path.read_text(), str(path.relative_to(REPO)))]
    assert found == [], "use JobState / RunState / NoState (eczema_batch/jobs/states.py)"


def test_run_settings_read_back_what_was_written_and_refuse_what_they_do_not_know() -> None:
    config = RunConfig(segmenter_model="tiny-seggpt", embedder_model="tiny-dino", prompts=3)
    written = RunSettings(config, Targets(embedder_id=1, segmenter_id=2, head_id=None),
                          study="trial", retried_images=4)
    doc = json.loads(json.dumps(written.as_json()))  # as the catalogue's JSON column keeps it
    assert RunSettings.from_json(doc) == written
    # A key older versions wrote is read and ignored ...
    assert RunSettings.from_json({**doc, "exclude_same_patient": False}) == written
    # ... one this version never knew gives the job back, for a worker that does.
    with pytest.raises(TransientError, match="run 9 was planned by a newer.*reference_sets"):
        RunSettings.from_json({**doc, "reference_sets": {}}, run_id=9)
