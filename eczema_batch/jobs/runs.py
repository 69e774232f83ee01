"""A run's beginning and end, the same for both executors.

`start_run` plans and commits the jobs; then either `jobs.local.run_in_process` runs them here or
`jobs.follow` sends them to workers and follows them in the catalogue. Both report a `RunSummary`
and record how the run ended with `finish_run`, the one place a run's end state is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Run
from eczema_batch.clock import utcnow
from eczema_batch.jobs.plan import Plan, Targets, plan_run
from eczema_batch.jobs.states import RunState
from eczema_batch.measuring.config import RunConfig, RunSettings
from eczema_batch.measuring.runtime import resolve_targets, run_precision


@dataclass
class RunSummary:
    run_id: int
    targets: Targets
    jobs: int = 0
    resumed: int = 0
    #: stage -> images the run set out to do (those of resumed jobs included)
    images: dict[str, int] = field(default_factory=dict)
    done_jobs: int = 0
    #: stage -> images this run's done jobs measured (images that could not be read left out)
    measured: dict[str, int] = field(default_factory=dict)
    failed_jobs: dict[int, str] = field(default_factory=dict)
    failed_images: dict[int, str] = field(default_factory=dict)
    #: --quality skip: flagged images left unscored, and their reasons (kind -> images)
    quality_skipped: int = 0
    quality_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def has_head(self) -> bool:
        return self.targets.head_id is not None

    def add_done(self, stage: str, images: int, failed: dict[int, str]) -> None:
        """Count a job of `stage` that ended done, with its `images` and those that `failed`."""
        self.done_jobs += 1
        self.measured[stage] = self.measured.get(stage, 0) + images - len(failed)
        self.failed_images.update(failed)


def start_run(
    factory: sessionmaker[Session],
    *,
    config: RunConfig,
    executor: str,
    queue: str,
    chunk_size: int,
    study: str | None = None,
    retry_failed: bool = False,
    head_id: int | None = None,
) -> Plan:
    """Resolve the models, plan the work and commit it as jobs."""
    # `auto` precision is settled here and stored with the run: every worker computes alike.
    config = dataclasses.replace(config, precision=run_precision(config, queue=queue))
    with factory() as session, session.begin():
        targets = resolve_targets(session, config, head_id=head_id)
        return plan_run(session, config=config, targets=targets, executor=executor, queue=queue,
                        chunk_size=chunk_size, study=study, retry_failed=retry_failed)


def new_summary(session: Session, plan: Plan) -> RunSummary:
    """An empty summary of `plan`'s run, with the targets the run was planned for."""
    run = session.get_one(Run, plan.run_id)
    return RunSummary(run_id=plan.run_id,
                      targets=RunSettings.from_json(run.settings, run_id=run.id).targets,
                      jobs=plan.job_count, resumed=plan.resumed, images=dict(plan.images),
                      quality_skipped=plan.quality_skipped,
                      quality_reasons=dict(plan.quality_reasons))


def finish_run(session: Session, summary: RunSummary) -> None:
    """Record that the run ended (in the caller's transaction): failed if any job failed."""
    run = session.get_one(Run, summary.run_id)
    run.state = RunState.FAILED if summary.failed_jobs else RunState.DONE
    run.finished_at = utcnow()
