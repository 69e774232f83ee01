"""`models tune-segmenter`: tune SegGPT on a study's manual masks and publish it as a model.

The catalogue side of `pipeline.tune`: the study's references (images with a manual mask that
still decode), their pixels from the study folders (read like prompts are: `measuring.files`
at PROMPT_MAX_SIDE) and masks, a patient-grouped hold-out chosen by the seed, the base model's
and the tuned model's Dice on the held-out patients (prompted as `run` prompts, K references
of the training patients), and the derived model's identity. The training run checkpoints to
`<model_dir>/.NAME.checkpoint/` after every epoch; the same command resumes it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.measurements import image_rows, manual_mask_pngs
from eczema_batch.catalogue.models import Patient, Study
from eczema_batch.clock import utcnow
from eczema_batch.errors import RejectedFileError, UsageError
from eczema_batch.imaging import decode_mask_png
from eczema_batch.measuring.config import PROMPT_MAX_SIDE, RunConfig
from eczema_batch.measuring.files import load_pixels
from eczema_batch.pipeline.derived import (
    DerivedIdentity,
    PatientRef,
    new_model_dir,
    publish,
    read_identity,
)
from eczema_batch.pipeline.device import autocast_dtype, resolve_device
from eczema_batch.pipeline.loading import ModelIdentity, load_trainable_segmenter
from eczema_batch.pipeline.maskscore import OverlapSummary
from eczema_batch.pipeline.segment import Segmenter, seggpt_input_size
from eczema_batch.pipeline.tune import (
    TuneData,
    TuneProgress,
    TuneSettings,
    default_settings,
    resize_seggpt,
    score_held_out,
    tune_seggpt,
)
from eczema_batch.training.data import references

log = logging.getLogger(__name__)

METHOD = "seggpt-tuning"
#: prompts per held-out image when scoring, as `run` prompts (the paper's K)
SCORE_PROMPTS = 2


@dataclass(frozen=True)
class Reference:
    image_id: int
    patient: PatientRef
    pixels: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class TunedSegmenter:
    folder: Path
    identity: DerivedIdentity
    settings: TuneSettings
    base_held_out: OverlapSummary
    tuned_held_out: OverlapSummary
    resumed_at: int
    seconds: float
    pairs_per_second: float
    unreadable: int


def checkpoint_folder(model_dir: Path, name: str) -> Path:
    return model_dir / f".{name}.checkpoint"


def split_patients(patients: list[PatientRef], share: float, seed: int) -> set[PatientRef]:
    """The held-out patients: round(share x patients), chosen by `seed`; at least one when the
    share is positive, and always at least two left to train (prompt and query differ)."""
    if not 0.0 <= share < 1.0:
        raise UsageError(f"--holdout {share}: give a share between 0 and 1 (0 holds none out)")
    unique = sorted(set(patients))
    if share == 0.0:
        return set()
    count = min(max(1, round(share * len(unique))), len(unique) - 2)
    if count < 1:
        raise UsageError(
            f"{len(unique)} patient(s) with manual masks: a hold-out needs at least 3 "
            "(pass --holdout 0 to train on all of them, with no held-out score)"
        )
    rng = np.random.default_rng(seed)
    return {unique[int(i)] for i in rng.choice(len(unique), size=count, replace=False)}


def load_references(session: Session, config: RunConfig, *, study: str | None
                    ) -> tuple[list[Reference], int]:
    """The references of `study` (all studies when None) with pixels and masks; and how many
    could not be read (left out, with a warning)."""
    refs = references(session, study=study)
    ids = [int(i) for i in refs.image_ids]
    if not ids:
        where = f"study {study!r}" if study else "the catalogue"
        raise UsageError(f"{where} has no images with a manual mask: ingest masks beside the "
                         "images (NAME.mask.png) to tune the segmenter")
    codes = {
        int(pid): PatientRef(str(sname), str(code))
        for pid, code, sname in session.execute(
            select(Patient.id, Patient.subject_code, Study.name)
            .join(Study, Patient.study_id == Study.id)
            .where(Patient.id.in_({int(p) for p in refs.patient_ids}))
        )
    }
    rows = image_rows(session, ids, image_root=config.image_root)
    pngs = manual_mask_pngs(session, ids)
    found: list[Reference] = []
    unreadable = 0
    with ThreadPoolExecutor(max_workers=max(1, config.decode_threads)) as pool:
        futures = {iid: pool.submit(load_pixels, rows[iid], max_pixels=config.max_pixels,
                                    max_side=PROMPT_MAX_SIDE) for iid in ids}
        for iid, pid in zip(ids, refs.patient_ids, strict=True):
            try:
                pixels = futures[iid].result().pixels
            except RejectedFileError as exc:
                log.warning("reference image %d cannot be read: %s", iid, exc)
                unreadable += 1
                continue
            found.append(Reference(iid, codes[int(pid)], pixels, decode_mask_png(pngs[iid][1])))
    return found, unreadable


def _segmenter(model: torch.nn.Module, spec: Any, name: str, device: torch.device,
               dtype: torch.dtype) -> Segmenter:
    model.eval()
    return Segmenter(model=model, spec=spec, identity=ModelIdentity(name, "in-training"),
                     device=device, dtype=dtype)


def tune_study_segmenter(
    factory: sessionmaker[Session],
    *,
    config: RunConfig,
    name: str,
    base: str | None = None,
    study: str | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    replace_existing: bool = False,
    progress: TuneProgress | None = None,
    on_plan: Callable[[TuneSettings, int, int], None] | None = None,
) -> TunedSegmenter:
    """Tune `base` (default: the configured segmenter) on the references and publish `name`.

    `overrides` replaces fields of the base model's default settings (epochs, batch_size, lr,
    ...). `on_plan(settings, training images, held-out images)` is called before training.
    """
    model_dir = new_model_dir(config.model_path, name, replace_existing=replace_existing)
    with factory() as session:
        refs, unreadable = load_references(session, config, study=study)
    held = split_patients([r.patient for r in refs], holdout, seed)
    train = [r for r in refs if r.patient not in held]
    test = [r for r in refs if r.patient in held]
    if len({r.patient for r in train}) < 2:
        raise UsageError(f"manual masks of {len({r.patient for r in train})} training "
                         "patient(s): tuning needs at least two (prompt and query come from "
                         "different patients)")

    base_name = base or config.segmenter_model
    loaded = load_trainable_segmenter(base_name, model_dir=model_dir)
    parent = read_identity(loaded.folder)
    root_base = parent.base if parent is not None else base_name
    earlier = set(parent.supervised) if parent is not None else set()
    settings = default_settings(loaded.spec, loaded.model.config, seed=seed,
                                image_size=(overrides or {}).get("image_size"))
    settings = replace(settings, **{k: v for k, v in (overrides or {}).items() if v is not None})
    if settings.image_size is None:
        settings = replace(settings, image_size=seggpt_input_size(loaded.model.config)[0])
    device = resolve_device(config.device)
    dtype = autocast_dtype(device, config.precision)
    if on_plan is not None:
        on_plan(settings, len(train), len(test))

    prompts = [(r.pixels, r.mask) for r in train]

    def score(model: torch.nn.Module) -> OverlapSummary:
        segmenter = _segmenter(model, loaded.spec, name, device, dtype)
        return score_held_out(segmenter, prompts, [r.pixels for r in test],
                              [r.mask for r in test], k=SCORE_PROMPTS, seed=seed)

    loaded.model.to(device)
    base_score = score(loaded.model)  # at the base's own size, as `run` runs the base
    model = resize_seggpt(loaded.model.to("cpu"),
                          settings.image_size or seggpt_input_size(loaded.model.config)[0])
    checkpoints = checkpoint_folder(model_dir, name)
    fingerprint = {"base": base_name, "base_digest": loaded.digest,
                   "images": [r.image_id for r in train],
                   "holdout": sorted([p.study, p.subject] for p in held)}
    result = tune_seggpt(
        model, loaded.spec,
        TuneData([r.pixels for r in train], [r.mask for r in train],
                 [r.patient for r in train]),
        settings, device=device, dtype=dtype, checkpoint_dir=checkpoints,
        fingerprint=fingerprint, estimate=device.type == "cpu" and not loaded.spec.tiny,
        progress=progress,
    )
    tuned_score = score(result.model)
    identity = DerivedIdentity(
        name=name, kind="segmenter", base=root_base, base_digest=loaded.digest, method=METHOD,
        settings={**settings.as_dict(), "holdout_share": holdout, "study": study,
                  "device": str(device), "precision": str(dtype).removeprefix("torch."),
                  "pairs": "prompt and query of different patients"},
        seed=seed,
        images=tuple(r.image_id for r in train),
        supervised=tuple(sorted({r.patient for r in train} | earlier)),
        holdout=tuple(sorted(held)),
        loss_curve=tuple(result.loss_curve),
        created_at=utcnow().isoformat(),
        extra={
            "started_from": {"name": base_name, "digest": loaded.digest},
            "held_out": {"images": [r.image_id for r in test],
                         "prompts": SCORE_PROMPTS,
                         "base_image_size": seggpt_input_size(loaded.model.config)[0],
                         "tuned_image_size": settings.image_size,
                         "base": _overlap_json(base_score),
                         "tuned": _overlap_json(tuned_score)},
            "pairs_per_second": result.pairs_per_second,
            "seconds": result.seconds,
        },
    )
    cpu_model: Any = result.model.to("cpu")

    def write(target: Path) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" would break the CLI's output
        cpu_model.save_pretrained(target)

    folder = publish(model_dir, name, write, identity, replace_existing=replace_existing)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return TunedSegmenter(folder=folder, identity=identity, settings=settings,
                          base_held_out=base_score, tuned_held_out=tuned_score,
                          resumed_at=result.resumed_at, seconds=result.seconds,
                          pairs_per_second=result.pairs_per_second, unreadable=unreadable)


def _overlap_json(summary: OverlapSummary) -> dict[str, Any]:
    return {"images": summary.images, "dice": _finite(summary.dice),
            "iou": _finite(summary.iou)}


def _finite(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 6)
