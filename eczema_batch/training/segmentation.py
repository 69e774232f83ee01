"""Segmentation quality where manual masks exist (the paper reports none).

Each reference image is segmented by SegGPT prompted with its K nearest references of *other*
patients (leave-one-patient-out: its own patient's masks would be near-copies of the answer),
and the mask is compared with its manual mask at full size (Dice, IoU). The masks go through the
same prompt-set cache as the cross-validation, which often needs the very same ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eczema_batch.imaging import decode_mask_png
from eczema_batch.jobs import inputs
from eczema_batch.pipeline.evaluate import mask_overlap, mean_std
from eczema_batch.progress import StageProgress
from eczema_batch.training.data import References
from eczema_batch.training.features import FeatureStore


def segmentation_quality(
    store: FeatureStore, refs: References, *, progress: StageProgress | None = None
) -> dict[str, Any]:
    ids = [int(i) for i in refs.image_ids]
    full = store.full_vectors(ids)
    sets = store.prompt_sets(refs.image_ids, refs.patient_ids, refs.study_ids,
                             refs.image_ids, refs.patient_ids, refs.study_ids, full)
    requests = [store.seggpt_request(i, sets[i]) for i in ids]
    if progress is not None:
        progress("segmentation quality", 0, len(ids))
    predicted = store.predicted_masks(requests)
    with store.factory() as session:
        manual = inputs.manual_masks(session, ids)
    per_image: list[dict[str, Any]] = []
    for r in requests:
        overlap = mask_overlap(predicted[r.key], decode_mask_png(manual[r.image_id][1]))
        per_image.append({"image_id": r.image_id, "prompts": list(r.prompt_ids), **overlap})
    if progress is not None:
        progress("segmentation quality", len(ids), len(ids))
    dice = [float(p["dice"]) for p in per_image]
    iou = [float(p["iou"]) for p in per_image]
    return {
        "images": len(per_image),
        "no_prompts": sum(1 for r in requests if not r.prompt_ids),
        "dice": {**mean_std(dice), "median": float(np.median(dice))},
        "iou": {**mean_std(iou), "median": float(np.median(iou))},
        "per_image": per_image,
    }
