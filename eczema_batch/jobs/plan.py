"""Plan a run: which images still need which stage for the current models, as jobs of id chunks.

Two stages, because prompts must exist before anything is segmented:
- `embed`: whole-image embeddings of the reference images (those with a manual mask);
- `measure`: per image, whatever it still lacks: its whole-image embedding, prompt retrieval,
  segmentation, the crop embedding and, with a head, the prediction.
Unfinished jobs of an earlier run with the same configuration are taken over, not duplicated;
those planned with another configuration are cancelled (their images are planned again).
With `--quality skip`, images the quality gate flagged are left out of `measure`, and how many
(of those that needed it) and why is recorded in the run's settings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, exists, select, update
from sqlalchemy.orm import Session

from eczema_batch.catalogue.measurements import Targets
from eczema_batch.catalogue.models import (
    Embedding,
    Image,
    Job,
    Mask,
    Prediction,
    Run,
    Study,
)
from eczema_batch.clock import utcnow
from eczema_batch.errors import UsageError
from eczema_batch.jobs.states import UNFINISHED, JobState, RunState, check_transition
from eczema_batch.measuring.config import RunConfig, RunSettings
from eczema_batch.measuring.current import current_keys

STAGES = ("embed", "measure")


@dataclass
class Plan:
    run_id: int
    #: stage -> job ids, in the order to run them
    jobs: dict[str, list[int]] = field(default_factory=dict)
    #: stage -> images to do: new jobs' and those of the unfinished jobs taken over
    images: dict[str, int] = field(default_factory=dict)
    resumed: int = 0
    #: --quality skip: images left unscored for their quality flag
    quality_skipped: int = 0
    #: ... and their reasons: kind (blurred, underexposed, blue colour cast...) -> images
    quality_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def job_count(self) -> int:
        return sum(len(ids) for ids in self.jobs.values())


def _in_study(study: str) -> Any:
    return Image.study_id.in_(select(Study.id).where(Study.name == study))


def _scope(study: str | None) -> Any:
    clause = Image.decode_status == "ok"
    if study is not None:
        clause = and_(clause, _in_study(study))
    return clause


def has_manual_mask() -> Any:
    return exists().where(Mask.image_id == Image.id, Mask.kind == "manual")


def images_needing_embed(session: Session, targets: Targets, study: str | None) -> list[int]:
    has_full = exists().where(
        Embedding.image_id == Image.id,
        Embedding.model_id == targets.embedder_id,
        Embedding.region == "full",
    )
    stmt = select(Image.id).where(_scope(study), has_manual_mask(), ~has_full).order_by(Image.id)
    return list(session.scalars(stmt))


def images_needing_measure(
    session: Session, config: RunConfig, targets: Targets, study: str | None
) -> list[int]:
    """Images whose current result (measuring.current's rule) is not stored: no crop embedding
    under its current mask key or, with a head, no prediction made from that crop."""
    scope = _scope(study)
    keys = current_keys(session, config, targets, scope)
    in_scope = session.scalars(select(Image.id).where(scope).order_by(Image.id)).all()
    crops = set(session.execute(
        select(Embedding.image_id, Embedding.variant).join(Image, Image.id == Embedding.image_id)
        .where(scope, Embedding.model_id == targets.embedder_id, Embedding.region == "crop")
    ).all())
    predicted: dict[int, str | None] = {}
    if targets.head_id is not None:
        predicted = dict(session.execute(
            select(Prediction.image_id, Embedding.variant)
            .join(Image, Image.id == Prediction.image_id)
            .outerjoin(Embedding, Embedding.id == Prediction.embedding_id)
            .where(scope, Prediction.head_id == targets.head_id)
        ).all())

    def current(iid: int) -> bool:
        key = keys.get(iid)
        if key is None or (iid, key.variant) not in crops:
            return False
        return targets.head_id is None or predicted.get(iid, None) == key.variant

    return [i for i in in_scope if not current(i)]


def flagged_images(session: Session, study: str | None) -> dict[int, str]:
    """Image id -> quality flag of the flagged images in scope (a cleared flag is None, and a
    `--quality skip` run scores the image)."""
    flagged = Image.quality_flag.is_not(None)
    return {iid: flag or "" for iid, flag in session.execute(
        select(Image.id, Image.quality_flag).where(_scope(study), flagged)).all()}


def _chunks(ids: Sequence[int], size: int) -> list[list[int]]:
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def plan_run(
    session: Session,
    *,
    config: RunConfig,
    targets: Targets,
    executor: str,
    queue: str,
    chunk_size: int,
    study: str | None = None,
    retry_failed: bool = False,
) -> Plan:
    """Write the run and its jobs (the caller commits)."""
    if study is not None and session.scalar(select(Study.id).where(Study.name == study)) is None:
        raise UsageError(f"no study named {study!r}: `eczema-batch status` lists the studies")
    retried: int | None = None
    # With --study, only that study's failures are retried: another study's stay as they are.
    in_study = None if study is None else _in_study(study)
    if retry_failed:
        reset_stmt = update(Image).where(Image.decode_status != "ok")
        if in_study is not None:
            reset_stmt = reset_stmt.where(in_study)
        reset = session.execute(reset_stmt.values(decode_status="ok")
                                .execution_options(synchronize_session=False))
        retried = getattr(reset, "rowcount", 0)
    settings = RunSettings(config, targets, study, retried).as_json()
    run = Run(executor=executor, settings=settings, state=RunState.RUNNING)
    session.add(run)
    session.flush()
    plan = Plan(run_id=run.id)

    covered: set[int] = set()
    #: stage -> images in the unfinished jobs taken over (they count in the run's images)
    taken_over: dict[str, int] = {}
    resumable = session.scalars(
        select(Job).where(Job.state.in_(UNFINISHED)).order_by(Job.id)
    ).all()
    for job in resumable:
        old = run_settings(session, job.run_id)
        if same_work(old, settings):
            plan.jobs.setdefault(job.stage, []).append(job.id)
            plan.resumed += 1
            taken_over[job.stage] = taken_over.get(job.stage, 0) + len(job.image_ids)
            if job.stage == "measure":
                covered.update(job.image_ids)
        elif job.state == JobState.PENDING:
            job.state = check_transition(job.state, JobState.CANCELLED)
            job.last_error, job.updated_at = f"superseded by run {run.id}", utcnow()
    if retry_failed:
        failed = session.scalars(select(Job).where(Job.state == JobState.FAILED)).all()
        scope = (None if in_study is None
                 else set(session.scalars(select(Image.id).where(in_study))))
        for job in failed:
            if scope is None or scope.intersection(job.image_ids):
                job.state = check_transition(job.state, JobState.CANCELLED)
                job.updated_at = utcnow()

    needs: dict[str, list[int]] = {"embed": [], "measure": []}
    if config.segmenter_mode != "none":
        needs["embed"] = images_needing_embed(session, targets, study)
    needs["measure"] = [
        i for i in images_needing_measure(session, config, targets, study) if i not in covered
    ]
    if config.quality == "skip":
        flagged = flagged_images(session, study)
        left_out = [flagged[i] for i in needs["measure"] if i in flagged]
        needs["measure"] = [i for i in needs["measure"] if i not in flagged]
        plan.quality_skipped = len(left_out)
        plan.quality_reasons = dict(sorted(Counter(
            reason.split(" (", 1)[0] for flag in left_out for reason in flag.split("; ")
        ).items()))
        run.settings = RunSettings(
            config, targets, study, retried,
            {"images": plan.quality_skipped, "reasons": plan.quality_reasons}).as_json()
    in_embed_jobs = {i for job_id in plan.jobs.get("embed", [])
                     for i in session.get_one(Job, job_id).image_ids}
    needs["embed"] = [i for i in needs["embed"] if i not in in_embed_jobs]
    for stage in STAGES:
        plan.images[stage] = len(needs[stage]) + taken_over.get(stage, 0)
        for ids in _chunks(needs[stage], chunk_size):
            job = Job(run_id=run.id, stage=stage, queue=queue, image_ids=ids,
                      state=JobState.PENDING)
            session.add(job)
            session.flush()
            plan.jobs.setdefault(stage, []).append(job.id)
    return plan


def run_settings(session: Session, run_id: int | None) -> dict[str, Any]:
    """The settings run `run_id` was planned with ({} for none: a job without a run)."""
    if run_id is None:
        return {}
    run = session.get(Run, run_id)
    return dict(run.settings) if run is not None else {}


#: Settings that change what a job computes; the rest (batch size, device) only how fast.
#: `quality` too: a run that skips flagged images must not take over jobs that score them.
_WORK_KEYS = ("segmenter_model", "embedder_model", "segmenter_mode", "prompts", "targets",
              "quality")
#: What a key means when a run planned before it existed has none.
_WORK_DEFAULTS = {"quality": "flag"}


def same_work(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether runs planned with these settings compute the same results."""
    return all(old.get(k, _WORK_DEFAULTS.get(k)) == new.get(k, _WORK_DEFAULTS.get(k))
               for k in _WORK_KEYS)
