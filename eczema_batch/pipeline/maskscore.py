"""Overlap of a predicted lesion mask with the true one: Dice and IoU of bool arrays.

Plain numpy (no scikit-learn), so a bench or a tuning run can score thousands of masks cheaply.
Both are 1 when both masks are empty (nothing to find, nothing found), as in
`pipeline.evaluate.mask_overlap`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


def _check(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if predicted.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} vs {truth.shape}")
    return np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """2 |P & T| / (|P| + |T|) of two bool masks of one shape."""
    p, t = _check(predicted, truth)
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, t).sum()) / total


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """|P & T| / |P | T| of two bool masks of one shape."""
    p, t = _check(predicted, truth)
    union = int(np.logical_or(p, t).sum())
    return 1.0 if union == 0 else int(np.logical_and(p, t).sum()) / union


@dataclass(frozen=True)
class OverlapSummary:
    """Mean Dice and IoU over images, with the count and per-image Dice."""

    images: int
    dice: float
    iou: float
    per_image_dice: tuple[float, ...]

    def as_dict(self) -> dict[str, object]:
        return {"images": self.images, "dice": self.dice, "iou": self.iou,
                "per_image_dice": list(self.per_image_dice)}


def summarise(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> OverlapSummary:
    """Mean Dice and IoU over (predicted, truth) mask pairs; NaN means when there are none."""
    dices, ious = [], []
    for predicted, truth in pairs:
        dices.append(dice(predicted, truth))
        ious.append(iou(predicted, truth))
    if not dices:
        return OverlapSummary(0, float("nan"), float("nan"), ())
    return OverlapSummary(len(dices), float(np.mean(dices)), float(np.mean(ious)), tuple(dices))
