"""The states a job and a run can be in, and the only ways a job moves between them.

The values are the strings the catalogue has always stored (`jobs.state`, `runs.state`): a
`StrEnum` compares and hashes like its string, so rows written before this module existed, on
SQLite and PostgreSQL alike, read back as the same states without a migration.

Every write of a job's state goes through `check_transition`, which refuses a move the table
`TRANSITIONS` does not list. The writes are conditional UPDATEs (`WHERE state = old`), so the
database decides whether a move happens; the table decides which moves the code may ever ask for.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final


class JobState(StrEnum):
    """Where a job (a chunk of image ids for one stage) stands. Jobs are created `pending`."""

    #: Waiting for a worker: new, or given back after a transient error to be tried again.
    PENDING = "pending"
    #: Claimed: `lease_owner` computes it and renews its lease while it does. A lease that runs
    #: out (its worker died) leaves the job `running` until another worker claims it over.
    RUNNING = "running"
    #: Its results are written, in the transaction that set this state. Final.
    DONE = "done"
    #: Given up: a permanent error, MAX_ATTEMPTS transient ones, or a single image that does not
    #: fit in device memory (`last_error` says which). A run with --retry-failed cancels it.
    FAILED = "failed"
    #: Replaced, never run to the end: split into two jobs of half its images each after running
    #: out of device memory; superseded by a run with another configuration (its images are
    #: planned again); or a failed job taken up again by --retry-failed. Final.
    CANCELLED = "cancelled"


class NoState(StrEnum):
    """What a worker reports in place of a job's state when it has none to give; never stored."""

    #: This worker computed the chunk but another took the job over meanwhile (the lease ran out):
    #: its results were rolled back and the job's state is the other worker's.
    LOST = "lost"
    #: There is no job with that id.
    MISSING = "missing"
    #: The catalogue could not be reached to find out.
    UNKNOWN = "unknown"


#: A job's state as a worker saw it, or why it could not see one.
Reported = JobState | NoState


class RunState(StrEnum):
    """How an `eczema-batch run` stands. Its jobs, not this, say where the work is."""

    #: Planned, its jobs not all finished; also a run nobody followed to the end (`--no-wait`, a
    #: stopped `run --queue`) or whose unfinished jobs a later run took over.
    RUNNING = "running"
    #: Ended without a failed job (some images may have failed alone: see `images.decode_status`).
    DONE = "done"
    #: Ended with at least one failed job.
    FAILED = "failed"


#: Every move a job's state may make; the functions that make them are named beside each.
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({
        JobState.RUNNING,    # claim_job
        JobState.CANCELLED,  # split_job (the halves replace it); plan_run (another configuration)
        JobState.FAILED,     # split_job on a single image
    }),
    JobState.RUNNING: frozenset({
        JobState.RUNNING,    # claim_job, after the holder's lease ran out (or was expired)
        JobState.DONE,       # finish_job
        JobState.PENDING,    # release_job, to try again
        JobState.FAILED,     # release_job, after a permanent error or MAX_ATTEMPTS
    }),
    JobState.FAILED: frozenset({
        JobState.CANCELLED,  # plan_run with --retry-failed
    }),
    JobState.DONE: frozenset(),
    JobState.CANCELLED: frozenset(),
}

#: A job in one of these still has work to do: a run waits for it, a new run takes it over.
#: (A tuple: it goes into SQL `IN (...)`.)
UNFINISHED: Final[tuple[JobState, ...]] = (JobState.PENDING, JobState.RUNNING)
#: Nothing more happens to a job in one of these (a failed one may be cancelled by --retry-failed).
FINISHED: Final[tuple[JobState, ...]] = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class IllegalTransition(RuntimeError):
    """The code asked for a move of a job's state that TRANSITIONS does not allow: a bug."""


def check_transition(old: str | tuple[str, ...], new: JobState) -> JobState:
    """`new`, if a job may move there from `old` (or from each of several `old` states).

    `old` may be a string read from the catalogue. Raises IllegalTransition otherwise.
    """
    for source in old if isinstance(old, tuple) else (old,):
        try:
            state = JobState(source)
        except ValueError:
            raise IllegalTransition(f"{source!r} is not a job state") from None
        if new not in TRANSITIONS.get(state, frozenset()):
            raise IllegalTransition(f"a job cannot move from {state} to {new}")
    return new
