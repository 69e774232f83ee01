"""`evaluate --robustness`: how much the held-out predictions move when the photograph changes.

For the first repeat of evaluate's splits, each fold's held-out images (a deterministic sample
spread across patients) are measured again through `pipeline.measure`, once on their pixels (the
baseline) and once per perturbation (`pipeline.perturb`): SegGPT prompted by the same references
evaluate chose for the image (retrieval ran on the unperturbed photograph, and stays fixed), the
lesion cropped and embedded, and the fold's head, refit on the fold's training patients exactly as
evaluate fits it (deterministic), predicts. Baseline and perturbation share the code path and
the batches, so a strength-zero perturbation changes nothing. Nothing of it is stored: the
perturbed pixels are not the study's images (`FeatureStore.remeasure`).

Per perturbation: the change in the expected severity score sum(k * p_k) (mean signed, mean
absolute), the share of images whose predicted class changes, and where SegGPT segmented, the
IoU of the perturbed image's mask against the baseline mask. Intervals resample patients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eczema_batch.measuring.config import SegmenterMode
from eczema_batch.pipeline.classify import predict_proba
from eczema_batch.pipeline.evaluate import (
    Split,
    mask_overlap,
    patient_bootstrap,
    percentile_interval,
)
from eczema_batch.pipeline.perturb import PARAMETERS, Perturbation, PerturbedPixels
from eczema_batch.pipeline.records import FLAG_NO_REFERENCES, Counts, Keyed, Measurement, Pixels
from eczema_batch.pipeline.train import TrainSettings, fit_head
from eczema_batch.progress import StageProgress
from eczema_batch.training.data import LabelledImages, References
from eczema_batch.training.features import (
    BATCH_IMAGES,
    FeatureRequest,
    FeatureStore,
    fold_references,
)
from eczema_batch.training.results import Doc, Forwards, Interval

# --- the report section -------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A mean over images with its patient-bootstrap 95% interval."""

    mean: float
    ci95: Interval
    #: images it is the mean of
    n: int

    @classmethod
    def from_dict(cls, doc: Doc) -> Estimate:
        return cls(mean=doc["mean"], ci95=Interval.of(doc["ci95"]), n=doc["n"])

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci95": self.ci95.as_list(), "n": self.n}


@dataclass(frozen=True)
class PerturbationResult:
    kind: str
    value: float
    name: str
    parameter: str
    #: expected score (0-3) perturbed minus baseline, per image
    score_change: Estimate
    abs_score_change: Estimate
    #: share of images whose predicted (top) class differs from the baseline's
    class_changed: Estimate
    #: IoU of the mask SegGPT made of the perturbed image against the baseline mask; None when
    #: nothing was segmented (mode none, or only manual masks)
    mask_iou: Estimate | None

    @classmethod
    def from_dict(cls, doc: Doc) -> PerturbationResult:
        iou = doc["mask_iou"]
        return cls(kind=doc["kind"], value=doc["value"], name=doc["name"],
                   parameter=doc["parameter"],
                   score_change=Estimate.from_dict(doc["score_change"]),
                   abs_score_change=Estimate.from_dict(doc["abs_score_change"]),
                   class_changed=Estimate.from_dict(doc["class_changed"]),
                   mask_iou=None if iou is None else Estimate.from_dict(iou))

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "name": self.name,
                "parameter": self.parameter, "score_change": self.score_change.as_dict(),
                "abs_score_change": self.abs_score_change.as_dict(),
                "class_changed": self.class_changed.as_dict(),
                "mask_iou": None if self.mask_iou is None else self.mask_iou.as_dict()}


@dataclass(frozen=True)
class RobustnessReport:
    """The JSON report's `robustness` section."""

    segmenter: str
    #: the repeat whose folds were used (the first)
    repeat: int
    #: held-out images measured, of how many there were, and their patients
    images: int
    available: int
    patients: int
    #: mean expected score of the unperturbed images
    baseline_score: Estimate
    #: largest |probability| difference between the baseline and evaluate's own prediction from
    #: its stored crop embedding: the baseline is evaluate's measurement (float noise only)
    baseline_max_difference: float
    perturbations: tuple[PerturbationResult, ...]
    #: model forwards of the robustness pass (never cached: every one is recomputed)
    forwards: Forwards = field(default_factory=lambda: Forwards.from_dict(Counts().as_dict()))

    @classmethod
    def from_dict(cls, doc: Doc) -> RobustnessReport:
        return cls(segmenter=doc["segmenter"], repeat=doc["repeat"], images=doc["images"],
                   available=doc["available"], patients=doc["patients"],
                   baseline_score=Estimate.from_dict(doc["baseline_score"]),
                   baseline_max_difference=doc["baseline_max_difference"],
                   perturbations=tuple(PerturbationResult.from_dict(p)
                                       for p in doc["perturbations"]),
                   forwards=Forwards.from_dict(doc["forwards"]))

    def as_dict(self) -> dict[str, Any]:
        return {"segmenter": self.segmenter, "repeat": self.repeat, "images": self.images,
                "available": self.available, "patients": self.patients,
                "baseline_score": self.baseline_score.as_dict(),
                "baseline_max_difference": self.baseline_max_difference,
                "perturbations": [p.as_dict() for p in self.perturbations],
                "forwards": self.forwards.as_dict()}


# --- the measurement ----------------------------------------------------------------------------


def sample_held_out(splits: Sequence[Split], patients: np.ndarray, images: int, *, seed: int
                    ) -> list[np.ndarray]:
    """Per split, the sorted test positions to measure: at most `images` in all, taken one per
    patient in turn (patients and each patient's images in a seeded order), so a cap spreads over
    as many patients as it can rather than exhausting the first ones."""
    rng = np.random.default_rng(seed)
    by_patient: dict[int, list[int]] = {}
    for position in np.concatenate([s.test for s in splits]).tolist():
        by_patient.setdefault(int(patients[position]), []).append(position)
    queues = [list(rng.permutation(by_patient[p])) for p in rng.permutation(sorted(by_patient))]
    chosen: set[int] = set()
    while len(chosen) < images and any(queues):
        for queue in queues:
            if queue and len(chosen) < images:
                chosen.add(int(queue.pop(0)))
    return [np.array(sorted(set(s.test.tolist()) & chosen), dtype=np.int64) for s in splits]


@dataclass
class _Rows:
    """Per-image values of one condition, in measurement order."""

    scores: list[float] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    patients: list[int] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    iou_patients: list[int] = field(default_factory=list)


def measure_robustness(
    store: FeatureStore,
    data: LabelledImages,
    refs: References,
    splits: Sequence[Split],
    keys: Sequence[Sequence[Keyed]],
    vectors: Mapping[Keyed, np.ndarray],
    *,
    mode: SegmenterMode,
    train: TrainSettings,
    perturbations: Sequence[Perturbation],
    images: int,
    seed: int,
    bootstrap: int,
    progress: StageProgress | None = None,
) -> RobustnessReport:
    """`splits`, `keys` and `vectors` are evaluate's (every repeat; the first is used)."""
    first = [i for i, s in enumerate(splits) if s.repeat == splits[0].repeat]
    folds = [splits[i] for i in first]
    chosen = sample_held_out(folds, data.patient_ids, images, seed=seed)
    total = sum(len(c) for c in chosen)
    classes = np.arange(len(data.classes), dtype=np.float64)
    segments = mode != "none"
    full = (store.full_vectors(np.concatenate([data.image_ids, refs.image_ids]).tolist())
            if segments else {})
    manual = store.manual_masks(refs.image_ids.tolist()) if mode == "manual" else {}
    counts = Counts()
    base = _Rows()
    rows = [_Rows() for _ in perturbations]
    largest = 0.0
    done = 0
    for index, split, positions in zip(first, folds, chosen, strict=True):
        if not len(positions):
            continue
        x = np.stack([vectors[k] for k in keys[index]])
        head = fit_head(x[split.train], data.labels[split.train], n_classes=len(classes),
                        settings=train).head
        evaluated = predict_proba(head, x[positions])
        by_study = fold_references(split, data, refs, full) if segments else {}
        for start in range(0, len(positions), BATCH_IMAGES):
            batch = positions[start : start + BATCH_IMAGES]
            requests = [FeatureRequest(int(data.image_ids[p]), int(data.patient_ids[p]),
                                       by_study.get(int(data.study_ids[p])),
                                       manual.get(int(data.image_ids[p]))) for p in batch]
            baseline = store.remeasure(requests, pixels=_perturbed(None, seed), head=head,
                                       counts=counts)
            probabilities = _probabilities(baseline)
            largest = max(largest, float(np.abs(
                probabilities - evaluated[start : start + len(batch)]).max()))
            _add(base, baseline, baseline, batch, data.patient_ids, classes)
            for perturbation, out in zip(perturbations, rows, strict=True):
                changed = store.remeasure(requests, pixels=_perturbed(perturbation, seed),
                                          head=head, counts=counts)
                _add(out, changed, baseline, batch, data.patient_ids, classes)
            done += len(batch)
            if progress is not None:
                progress("robustness: perturbed images", done, total)
    base_scores = np.asarray(base.scores)
    base_classes = np.asarray(base.classes)
    patients = np.asarray(base.patients)
    results = []
    for perturbation, out in zip(perturbations, rows, strict=True):
        change = np.asarray(out.scores) - base_scores
        flips = (np.asarray(out.classes) != base_classes).astype(np.float64)
        iou = (_estimate(np.asarray(out.ious), np.asarray(out.iou_patients), bootstrap, seed)
               if out.ious else None)
        results.append(PerturbationResult(
            kind=perturbation.kind, value=float(perturbation.value), name=perturbation.name,
            parameter=PARAMETERS[perturbation.kind],
            score_change=_estimate(change, patients, bootstrap, seed),
            abs_score_change=_estimate(np.abs(change), patients, bootstrap, seed),
            class_changed=_estimate(flips, patients, bootstrap, seed), mask_iou=iou))
    return RobustnessReport(
        segmenter=mode, repeat=splits[0].repeat, images=total,
        available=sum(len(s.test) for s in folds), patients=len(np.unique(patients)),
        baseline_score=_estimate(base_scores, patients, bootstrap, seed),
        baseline_max_difference=largest, perturbations=tuple(results),
        forwards=Forwards.from_dict(counts.as_dict()))


def _perturbed(perturbation: Perturbation | None, seed: int) -> Callable[[Pixels], Pixels]:
    def wrap(pixels: Pixels) -> Pixels:
        return PerturbedPixels(pixels, perturbation, seed=seed)

    return wrap


def _probabilities(results: Sequence[Measurement]) -> np.ndarray:
    return np.stack([m.probabilities for m in results if m.probabilities is not None])


def _add(out: _Rows, results: Sequence[Measurement], baseline: Sequence[Measurement],
         positions: np.ndarray, patients: np.ndarray, classes: np.ndarray) -> None:
    for m, b, position in zip(results, baseline, positions, strict=True):
        assert m.probabilities is not None and m.key == b.key
        patient = int(patients[position])
        out.scores.append(float(m.probabilities @ classes))
        out.classes.append(int(np.argmax(m.probabilities)))
        out.patients.append(patient)
        # SegGPT's masks only: a manual mask is the same on any pixels, and an image with no
        # reference to prompt it has no mask (the whole image is used).
        if (m.new_mask is not None and b.new_mask is not None
                and b.new_mask.flag != FLAG_NO_REFERENCES):
            out.ious.append(mask_overlap(m.new_mask.mask, b.new_mask.mask)["iou"])
            out.iou_patients.append(patient)


def _estimate(values: np.ndarray, patients: np.ndarray, bootstrap: int, seed: int) -> Estimate:
    replicates = patient_bootstrap(
        values, values, patients, replicates=bootstrap, seed=seed,
        metric=lambda v, _p, w: float(np.average(v, weights=w)))
    return Estimate(mean=float(values.mean()), ci95=Interval.of(percentile_interval(replicates)),
                    n=len(values))


# --- the terminal table -------------------------------------------------------------------------


def robustness_tables(report: RobustnessReport) -> list[tuple[str, list[str], list[list[str]]]]:
    def ci(e: Estimate, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{e.mean:{sign}.3f} [{e.ci95.low:{sign}.3f}, {e.ci95.high:{sign}.3f}]"

    base = report.baseline_score
    title = (
        f"robustness ({report.segmenter}, repeat {report.repeat}'s folds): {report.images} of "
        f"{report.available} held-out images, {report.patients} patients; baseline expected "
        f"score {ci(base)}. Change = perturbed minus unperturbed; [95% CI] resamples patients")
    rows = [[p.name, ci(p.score_change, signed=True), ci(p.abs_score_change),
             ci(p.class_changed), "-" if p.mask_iou is None else ci(p.mask_iou)]
            for p in report.perturbations]
    return [(title, ["perturbation", "score change", "|score change|", "class changed",
                     "mask IoU vs unperturbed"], rows)]
