"""Adapt an embedder to a study: DINO on the catalogue's images, published as a derived model.

Which images: every readable image (labelled or not) of the catalogue, or of one study. Their
pixels are read under the same rules as a run's (`measuring.files`: only while the file is still
the one catalogued), decoded at reduced scale and kept in memory at the adaptation's source size.
With views "crops" an image with a predicted mask is seen as the head sees it, the lesion crop of
its newest one (`pipeline.crop`); the others are seen whole. The default is whole images: on the
synthetic studies crops did no better with the tiny models (README, "Adapting the embedder").
A file that can no longer be read is skipped and counted. The model's identity records the base
model and its digest, the settings, the seed, the images and every patient whose images trained
it (`unlabelled`: self-supervised, no label or mask was used), so `evaluate` can tell.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.measurements import image_rows
from eczema_batch.catalogue.models import Image, Mask, Patient, Study, Visit
from eczema_batch.clock import utcnow
from eczema_batch.errors import RejectedFileError, UsageError
from eczema_batch.imaging import decode_mask_png
from eczema_batch.measuring.config import RunConfig
from eczema_batch.measuring.files import load_pixels
from eczema_batch.pipeline.adapt import AdaptSettings, adapt_embedder, square_image
from eczema_batch.pipeline.crop import crop_to_mask
from eczema_batch.pipeline.derived import DerivedIdentity, PatientRef, new_model_dir, publish
from eczema_batch.pipeline.device import autocast_dtype, resolve_device
from eczema_batch.pipeline.loading import load_trainable_backbone
from eczema_batch.progress import StageProgress
from eczema_batch.training.data import study_id

logger = logging.getLogger(__name__)

METHOD = "dino-adaptation"


@dataclass(frozen=True)
class AdaptedEmbedder:
    folder: Path
    identity: DerivedIdentity
    images: int
    skipped: int
    resumed_from_epoch: int
    images_per_second: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.identity.name, "folder": str(self.folder),
            "base": self.identity.base, "base_digest": self.identity.base_digest,
            "images": self.images, "skipped": self.skipped,
            "patients": len(self.identity.unlabelled), "epochs": len(self.identity.loss_curve),
            "loss_curve": list(self.identity.loss_curve),
            "resumed_from_epoch": self.resumed_from_epoch,
            "images_per_second": round(self.images_per_second, 1),
            "settings": self.identity.settings, "seed": self.identity.seed,
        }


def checkpoint_folder(model_dir: Path, name: str) -> Path:
    """Where an adaptation keeps its checkpoint until the model is published (hidden: the
    loader and `models list` never see it)."""
    return Path(model_dir).expanduser() / f".{name}.checkpoint"


def study_images(session: Session, *, study: str | None) -> list[tuple[int, PatientRef]]:
    """(image id, patient) of every readable image, by id."""
    sid = study_id(session, study)
    stmt = (
        select(Image.id, Study.name, Patient.subject_code)
        .join(Visit, Image.visit_id == Visit.id)
        .join(Patient, Visit.patient_id == Patient.id)
        .join(Study, Image.study_id == Study.id)
        .where(Image.decode_status == "ok")
        .order_by(Image.id)
    )
    if sid is not None:
        stmt = stmt.where(Image.study_id == sid)
    return [(int(iid), PatientRef(str(name), str(code)))
            for iid, name, code in session.execute(stmt)]


def predicted_masks(session: Session, ids: list[int]) -> dict[int, bytes]:
    """image id -> PNG of its newest predicted mask (made by a segmenter: no label involved)."""
    stmt = (
        select(Mask.image_id, Mask.png)
        .where(Mask.kind == "predicted", Mask.image_id.in_(ids))
        .order_by(Mask.created_at, Mask.id)
    )
    return {int(iid): bytes(png) for iid, png in session.execute(stmt)}  # newest wins


#: a crop keeps this many times the source size of the image it is cut from (then resized)
CROP_DECODE_SCALE = 4


def _read_images(factory: sessionmaker[Session], ids: list[int], *, config: RunConfig,
                 size: int, progress: StageProgress | None,
                 masks: dict[int, bytes] | None = None,
                 ) -> tuple[list[int], list[np.ndarray], int]:
    with factory() as session:
        rows = image_rows(session, ids, image_root=config.image_root)
    masks = masks or {}

    def read(iid: int) -> np.ndarray | None:
        mask = masks.get(iid)
        try:
            decoded = load_pixels(rows[iid], max_pixels=config.max_pixels,
                                  max_side=size * CROP_DECODE_SCALE if mask else size)
        except RejectedFileError as error:
            logger.warning("image %d skipped: %s", iid, error)
            return None
        if mask is not None:
            # The head's view: the mask's bounding box, background zeroed (pipeline.crop).
            crop = crop_to_mask(decoded.pixels, decode_mask_png(mask))
            return square_image(crop.pixels, size).permute(1, 2, 0).numpy()
        # Kept at the source size, channels last: memory stays ~3 * size^2 bytes an image.
        return square_image(decoded.pixels, size).permute(1, 2, 0).numpy()

    kept_ids: list[int] = []
    pixels: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=max(1, config.decode_threads)) as pool:
        for done, (iid, image) in enumerate(zip(ids, pool.map(read, ids), strict=True), 1):
            if image is not None:
                kept_ids.append(iid)
                pixels.append(image)
            if progress is not None:
                progress("reading images", done, len(ids))
    return kept_ids, pixels, len(ids) - len(kept_ids)


def adapt_study_embedder(
    factory: sessionmaker[Session],
    *,
    config: RunConfig,
    name: str,
    base: str,
    study: str | None,
    settings_of: Callable[[int, bool], AdaptSettings],
    views: str | None = None,
    replace_existing: bool = False,
    restart: bool = False,
    progress: StageProgress | None = None,
    notice: Callable[[str], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> AdaptedEmbedder:
    """Adapt `base` on the catalogue's images and publish it as `<model_dir>/<name>`.

    `settings_of(image_size, tiny)` gives the settings for the base model (defaults plus the
    user's options). A run killed part way resumes from its checkpoint when started again.
    """
    import shutil

    model_dir = new_model_dir(config.model_path, name, replace_existing=replace_existing)
    backbone, spec, digest = load_trainable_backbone(base, model_dir=model_dir)
    settings = settings_of(spec.image_size, spec.tiny)
    with factory() as session:
        found = study_images(session, study=study)
    if len(found) < 2:
        where = f"study {study!r}" if study else "the catalogue"
        raise UsageError(f"{where} has {len(found)} readable images; adapting needs at least 2 "
                         "(eczema-batch ingest FOLDER first)")
    patient_of = dict(found)
    all_ids = [i for i, _ in found]
    masks: dict[int, bytes] = {}
    if views == "crops":
        with factory() as session:
            masks = predicted_masks(session, all_ids)
        if not masks:
            raise UsageError("--views crops: no image has a predicted mask (eczema-batch run "
                             "first, or --views images)")
    chosen = "crops" if masks else "images"
    settings = dataclasses.replace(settings, views=chosen)
    ids, pixels, skipped = _read_images(factory, all_ids, config=config,
                                        size=settings.source_size, progress=progress,
                                        masks=masks)
    if len(ids) < 2:
        raise UsageError(f"only {len(ids)} of {len(found)} images could be read: nothing to "
                         "adapt on (`eczema-batch status` lists the rejected files)")
    device = resolve_device(config.device)
    dtype = autocast_dtype(device, config.precision)
    checkpoints = checkpoint_folder(model_dir, name)
    if restart:
        shutil.rmtree(checkpoints, ignore_errors=True)
    result = adapt_embedder(
        backbone, pixels, settings=settings, mean=spec.mean, std=spec.std, device=device,
        dtype=dtype, base_digest=digest, image_keys=[str(i) for i in ids],
        checkpoint_dir=checkpoints, progress=progress, notice=notice,
        on_epoch_end=on_epoch_end, estimate=device.type == "cpu" and not spec.tiny,
    )
    identity = DerivedIdentity(
        name=name, kind="embedder", base=spec.name, base_digest=digest, method=METHOD,
        settings={**settings.as_dict(), "precision": str(dtype).removeprefix("torch."),
                  "device": device.type},
        seed=settings.seed, images=tuple(ids),
        unlabelled=tuple(sorted({patient_of[i] for i in ids})),
        loss_curve=tuple(result.loss_curve), created_at=utcnow().isoformat(),
        extra={"study": study, "skipped_images": skipped,
               "crops": sum(1 for i in ids if i in masks),
               "head": "DINO head started fresh (the base model is a backbone only)",
               "result": "teacher backbone"},
    )
    teacher: Any = result.teacher.to("cpu")

    def write(out: Path) -> None:
        from transformers.utils import logging as hf_logging

        enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # the CLI owns the terminal
        try:
            teacher.save_pretrained(out)
        finally:
            if enabled:
                hf_logging.enable_progress_bar()

    folder = publish(model_dir, name, write, identity, replace_existing=replace_existing)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return AdaptedEmbedder(folder=folder, identity=identity, images=len(ids), skipped=skipped,
                           resumed_from_epoch=result.resumed_from_epoch,
                           images_per_second=result.images_per_second)
