"""`eczema-batch train`: fit the severity head on the study's labelled lesion-crop embeddings.

The features are exactly those `eczema-batch run` computes and predicts from (same embedder,
segmenter and current mask key), so the head is trained on what it will be applied to. This command
does not compute them: it is a seconds-long CPU step, while the embeddings are the run's work
(batched on GPU workers, with jobs and leases); a missing embedding is an error that says to run
`eczema-batch run` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.measurements import Targets, vectors
from eczema_batch.catalogue.models import Event, Head, Image, Model
from eczema_batch.errors import UsageError
from eczema_batch.measuring.config import RunConfig
from eczema_batch.measuring.current import current_keys
from eczema_batch.measuring.runtime import resolve_targets, run_precision
from eczema_batch.pipeline.classify import head_to_bytes, predict_proba
from eczema_batch.pipeline.evaluate import scalar_metrics
from eczema_batch.pipeline.records import MaskKey
from eczema_batch.pipeline.train import (
    TrainSettings,
    check_class_counts,
    fit_head,
    state_digest,
)
from eczema_batch.training.data import labelled_images
from eczema_batch.training.heads import HeadSummary, activate_head, describe_head


class MissingFeaturesError(UsageError):
    """labelled images have no lesion-crop embedding yet: run `eczema-batch run` first"""


def crop_features(session: Session, config: RunConfig, targets: Targets, ids: list[int]
                  ) -> tuple[dict[int, np.ndarray], dict[int, MaskKey]]:
    """The crop embeddings `eczema-batch run` made for `ids` as they stand now (their current
    mask keys: measuring.current's rule), and those keys."""
    keys = current_keys(session, config, targets, Image.id.in_(ids))
    found: dict[int, np.ndarray] = {}
    for variant in sorted({k.variant for k in keys.values()}):
        mine = [i for i in ids if i in keys and keys[i].variant == variant]
        found.update(vectors(session, mine, model_id=targets.embedder_id, region="crop",
                             variant=variant))
    return found, keys


@dataclass(frozen=True)
class TrainedHead:
    """`train`: the new head, the heads it replaced, and its in-sample figures."""

    head: HeadSummary
    replaced: list[int]
    #: labelled images per class
    class_counts: list[int]
    final_loss: float
    #: on the training images themselves: optimistic by construction
    in_sample: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {**self.head.as_dict(), "replaced": self.replaced,
                "class_counts": self.class_counts, "final_loss": self.final_loss,
                "in_sample": self.in_sample}


def train_head(
    factory: sessionmaker[Session],
    *,
    config: RunConfig,
    settings: TrainSettings,
    study: str | None = None,
    activate: bool = True,
    name: str | None = None,
    reference_label: str = "newest",
) -> TrainedHead:
    """Train, store and (unless told not to) activate a head; returns its description.

    `reference_label` is the rule that picks each image's truth (`catalogue.labels`)."""
    with factory() as session, session.begin():
        data = labelled_images(session, study=study, rule=reference_label)
        if len(data) == 0:
            raise UsageError("no labelled images: add a severity column to the manifest and "
                             "ingest again, or label images in review")
        check_class_counts(data.labels, data.classes)
        targets = resolve_targets(session, config, use_head=False)
        ids = [int(i) for i in data.image_ids]
        found, keys = crop_features(session, config, targets, ids)
        missing = [i for i in ids if i not in found]
        if missing:
            raise MissingFeaturesError(
                f"{len(missing)} of {len(ids)} labelled images have no lesion-crop embedding for "
                f"embedder {config.embedder_model} in {run_precision(config)} with --segmenter "
                f"{config.segmenter_mode} (a run on a GPU computes in bf16: train there, or set "
                f"ECZEMA_BATCH_PRECISION to the run's): run "
                f"`eczema-batch run --segmenter {config.segmenter_mode}` with the same models "
                "first, then train again"
            )
        features = np.stack([found[i] for i in ids])
        fit = fit_head(features, data.labels, n_classes=len(data.classes), settings=settings)
        in_sample = scalar_metrics(data.labels, predict_proba(fit.head, features))
        weights = head_to_bytes(fit.head)
        models = {mid: {"name": n, "digest": d, "precision": p} for mid, n, d, p in session.execute(
            select(Model.id, Model.name, Model.digest, Model.precision).where(
                Model.id.in_([targets.embedder_id, targets.segmenter_id or -1])))}
        head = Head(
            name=name or f"{config.embedder_model}+{config.segmenter_mode}",
            classes=list(data.classes),
            embedder_model_id=targets.embedder_id,
            segmenter_model_id=targets.segmenter_id,
            segmenter_mode=config.segmenter_mode,
            settings={
                **settings.as_dict(), "study": study, "prompts": config.prompts,
                "reference_label": str(reference_label),
                "feature_variants": sorted({keys[i].variant for i in ids}),
                "in_dim": weights.in_dim,
                "embedder": models[targets.embedder_id],
                "segmenter": models.get(targets.segmenter_id) if targets.segmenter_id else None,
            },
            metrics={
                "images": len(ids),
                "patients": len(np.unique(data.patient_ids)),
                "class_counts": np.bincount(data.labels, minlength=len(data.classes)).tolist(),
                "class_weights": fit.class_weights,
                "losses": [round(v, 6) for v in fit.losses],
                # On the training images themselves: optimistic by construction.
                "in_sample": in_sample,
                "note": "in-sample figures; `eczema-batch evaluate` estimates accuracy",
            },
            training_image_ids=ids,
            weights=weights.data,
            digest=state_digest(fit.head),
            active=False,
        )
        session.add(head)
        session.flush()
        session.add(Event(kind="head.trained", subject_type="head", subject_id=head.id,
                          detail={"images": len(ids), "seed": settings.seed}))
        replaced = activate_head(session, head) if activate else []
        return TrainedHead(describe_head(session, head), replaced,
                           class_counts=head.metrics["class_counts"], final_loss=fit.losses[-1],
                           in_sample=in_sample)
