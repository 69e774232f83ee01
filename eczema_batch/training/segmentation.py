"""Segmentation quality where manual masks exist (the paper reports none).

Each reference image is segmented by SegGPT prompted with its K nearest references of *other*
patients (leave-one-patient-out: its own patient's masks would be near-copies of the answer),
and the mask is compared with its manual mask at full size (Dice, IoU). The masks are measured
like any other (`pipeline.measure`, keyed by prompt set): the cross-validation often needs the
very same ones.
"""

from __future__ import annotations

import numpy as np

from eczema_batch.pipeline.evaluate import mask_overlap, mean_std
from eczema_batch.progress import StageProgress
from eczema_batch.training.data import References
from eczema_batch.training.features import FeatureRequest, FeatureStore, study_references
from eczema_batch.training.results import MaskScore, OverlapStat, SegmentationQuality


def segmentation_quality(
    store: FeatureStore, refs: References, *, scored: np.ndarray | None = None,
    progress: StageProgress | None = None,
) -> SegmentationQuality:
    """Dice and IoU of the references where `scored` (default: all); every reference prompts.

    `scored` leaves out the references of patients whose masks trained the segmenter: scoring
    a tuned SegGPT on its own training masks would leak (`training.leakage`).
    """
    full = store.full_vectors([int(i) for i in refs.image_ids])
    by_study = study_references(refs.image_ids, refs.patient_ids, refs.study_ids, full)
    keep = np.ones(len(refs.image_ids), dtype=bool) if scored is None else scored
    ids = [int(i) for i in refs.image_ids[keep]]
    requests = [FeatureRequest(iid, int(pid), by_study[int(study)])
                for iid, pid, study in zip(ids, refs.patient_ids[keep], refs.study_ids[keep],
                                           strict=True)]
    if progress is not None:
        progress("segmentation quality", 0, len(ids))
    results = store.measure(requests)
    predicted = store.masks([(m.image_id, m.key) for m in results])
    manual = store.manual_masks(ids)
    per_image = []
    for m in results:
        overlap = mask_overlap(predicted[(m.image_id, m.key)], manual[m.image_id].mask)
        per_image.append(MaskScore(m.image_id, m.prompts.ids, float(overlap["dice"]),
                                   float(overlap["iou"])))
    if progress is not None:
        progress("segmentation quality", len(ids), len(ids))
    return SegmentationQuality(
        images=len(per_image),
        no_prompts=sum(1 for m in results if not m.prompts.ids),
        dice=_overlap([p.dice for p in per_image]),
        iou=_overlap([p.iou for p in per_image]),
        per_image=tuple(per_image),
    )


def _overlap(values: list[float]) -> OverlapStat:
    return OverlapStat.from_dict({**mean_std(values), "median": float(np.median(values))})
