"""How well a severity classifier measures: splits, metrics, baselines, bootstrap, calibration.

Pure compute on arrays (scikit-learn for splits and metrics). What scikit-learn lacks is built
from its parts: the ranked probability score is the mean Brier score of the K-1 cumulative
"severity <= k" events, and the expected calibration error bins the top-label confidence.
Nothing here touches the catalogue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_recall_fscore_support,
)
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

#: Equal-width confidence bins of the expected calibration error (the common choice in the
#: calibration literature; with a few hundred images more bins are mostly empty).
ECE_BINS = 10
#: Patient-level bootstrap replicates for the 95% interval (percentile method).
BOOTSTRAP_REPLICATES = 1000
#: Iterations for the logistic-regression probe; lbfgs converges well before on standardised
#: features, the ceiling only keeps a pathological fold from warning forever.
PROBE_MAX_ITER = 5000


@dataclass(frozen=True)
class Split:
    """One cross-validation fold: positions into the evaluated images."""

    repeat: int
    fold: int
    train: np.ndarray
    test: np.ndarray


def grouped_splits(
    labels: np.ndarray, groups: np.ndarray, *, folds: int, repeats: int, seed: int
) -> list[Split]:
    """StratifiedGroupKFold by patient, repeated with seeds seed, seed+1, ...

    No group is ever on both sides of a split: that is StratifiedGroupKFold's contract, and the
    callers' tests check it again.
    """
    splits = []
    placeholder = np.zeros((len(labels), 1))
    for repeat in range(repeats):
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for fold, (train, test) in enumerate(cv.split(placeholder, labels, groups)):
            splits.append(Split(repeat, fold, np.sort(train), np.sort(test)))
    return splits


def subsample_groups(
    positions: np.ndarray, groups: np.ndarray, fraction: float, *, seed: Sequence[int]
) -> np.ndarray:
    """Positions of a random `fraction` of the groups (patients) among `positions`; >= 1 group."""
    if fraction >= 1.0:
        return positions
    present = np.unique(groups[positions])
    keep_n = max(1, round(fraction * len(present)))
    keep = np.random.default_rng(list(seed)).choice(present, size=keep_n, replace=False)
    return positions[np.isin(groups[positions], keep)]


# --- baselines ---------------------------------------------------------------------------------


def _full_proba(model_classes: np.ndarray, proba: np.ndarray, n_classes: int) -> np.ndarray:
    """Put a fitted model's probability columns (its classes_) into all n_classes columns."""
    out = np.zeros((len(proba), n_classes), dtype=np.float64)
    out[:, model_classes.astype(int)] = proba
    return out


def majority_proba(
    train_labels: np.ndarray, n_test: int, n_classes: int
) -> np.ndarray:
    """The majority-class baseline: predicts the training fold's most frequent class, with the
    training fold's class frequencies as its probabilities (a fair RPS/ECE reference)."""
    model = DummyClassifier(strategy="prior").fit(np.zeros((len(train_labels), 1)), train_labels)
    return _full_proba(model.classes_, model.predict_proba(np.zeros((n_test, 1))), n_classes)


def logistic_proba(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    n_classes: int,
    *,
    balanced: bool,
    seed: int,
) -> np.ndarray:
    """A linear probe on the same features: standardised, multinomial logistic regression."""
    if len(np.unique(train_y)) < 2:
        return majority_proba(train_y, len(test_x), n_classes)
    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(max_iter=PROBE_MAX_ITER, random_state=seed,
                           class_weight="balanced" if balanced else None),
    )
    model.fit(train_x, train_y)
    return _full_proba(model.classes_, model.predict_proba(test_x), n_classes)


# --- metrics -----------------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def ranked_probability_score(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean RPS for ordinal classes 0..K-1: (1/(K-1)) sum_k Brier(P(y <= k), 1[y <= k])."""
    n_classes = proba.shape[1]
    if n_classes < 2:
        return 0.0
    cumulative = np.cumsum(proba, axis=1)
    scores = [
        brier_score_loss((y_true <= k).astype(int), np.clip(cumulative[:, k], 0.0, 1.0),
                         labels=[0, 1])
        for k in range(n_classes - 1)
    ]
    return float(np.mean(scores))


def calibration_bins(
    y_true: np.ndarray, proba: np.ndarray, *, bins: int = ECE_BINS
) -> list[dict[str, Any]]:
    """Top-label reliability: per equal-width confidence bin, count, mean confidence, accuracy."""
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(np.float64)
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 joins bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        table.append({
            "low": b / bins, "high": (b + 1) / bins, "count": count,
            "confidence": float(confidence[members].mean()) if count else None,
            "accuracy": float(correct[members].mean()) if count else None,
        })
    return table


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, *, bins: int = ECE_BINS
                               ) -> float:
    """sum_b (n_b / N) |accuracy_b - confidence_b| over the top-label confidence bins."""
    total = len(y_true)
    if total == 0:
        return 0.0
    return float(sum(
        row["count"] / total * abs(row["accuracy"] - row["confidence"])
        for row in calibration_bins(y_true, proba, bins=bins) if row["count"]
    ))


def quadratic_kappa(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float | None:
    """Cohen's kappa with quadratic weights; None where it is undefined (one class only)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = cohen_kappa_score(y_true, y_pred, labels=list(range(n_classes)),
                                  weights="quadratic")
    return _finite(value)


def scalar_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """The headline numbers for one set of predictions (argmax of `proba`)."""
    n_classes = proba.shape[1]
    y_pred = proba.argmax(axis=1)
    labels = list(range(n_classes))
    return {
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted",
                                      zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro",
                                   zero_division=0)),
        "qwk": quadratic_kappa(y_true, y_pred, n_classes),
        "rps": ranked_probability_score(y_true, proba),
        "ece": expected_calibration_error(y_true, proba),
    }


def classification_report(
    y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Scalar metrics plus per-class precision/recall/F1/support, the confusion matrix (rows:
    truth, columns: prediction) and the reliability table."""
    labels = list(range(len(class_names)))
    y_pred = proba.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        **scalar_metrics(y_true, proba),
        "per_class": [
            {"class": name, "precision": float(p), "recall": float(r), "f1": float(f),
             "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        ],
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "calibration": calibration_bins(y_true, proba),
    }


def mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and sample standard deviation (ddof=1) of the defined values."""
    finite = np.array([v for v in values if v is not None], dtype=np.float64)
    if finite.size == 0:
        return {"mean": None, "std": None, "n": 0}
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return {"mean": float(finite.mean()), "std": std, "n": int(finite.size)}


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray, sample_weight: np.ndarray | None = None,
                *, n_classes: int) -> float:
    return float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="weighted",
                          sample_weight=sample_weight, zero_division=0))


def patient_bootstrap(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray,
    *,
    metric: Callable[[np.ndarray, np.ndarray, np.ndarray], float],
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = 0,
) -> np.ndarray:
    """`metric` on `replicates` resamples of patients (not images), drawn with replacement.

    Images of one patient are correlated, so resampling images would understate the spread.
    Each resample draws as many patients as there are; a patient drawn m times weighs m, all its
    rows (every repeat's out-of-fold prediction) included. The draws depend only on `groups` and
    `seed`, so two methods bootstrapped with one seed see the same resamples: their replicate
    values can be subtracted for a paired interval of the difference.
    `metric(y_true, y_pred, sample_weight)` must accept weights.
    """
    patients, patient_index = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    values = np.empty(replicates, dtype=np.float64)
    for b in range(replicates):
        multiplicity = np.bincount(rng.integers(0, len(patients), len(patients)),
                                   minlength=len(patients))
        weight = multiplicity[patient_index].astype(np.float64)
        values[b] = metric(y_true, y_pred, weight)
    return values


def percentile_interval(values: np.ndarray, *, level: float = 0.95) -> list[float]:
    """[low, high] percentile interval of bootstrap replicate values."""
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return [float(low), float(high)]


# --- segmentation ------------------------------------------------------------------------------


def mask_overlap(predicted: np.ndarray, manual: np.ndarray) -> dict[str, float]:
    """Dice (the F1 of lesion pixels) and IoU (Jaccard) of a predicted mask against the manual
    one; both are 1 when both masks are empty."""
    if predicted.shape != manual.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} vs {manual.shape}")
    truth, guess = manual.ravel().astype(bool), predicted.ravel().astype(bool)
    return {
        "dice": float(f1_score(truth, guess, zero_division=1.0)),
        "iou": float(jaccard_score(truth, guess, zero_division=1.0)),
    }
