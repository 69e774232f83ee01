"""The subgroup section of `evaluate`: the head's out-of-fold accuracy per skin tone, body site and
device, each with its counts and patient-bootstrap intervals.

A model that is right on average can be wrong for one group (darker skin, where erythema is less
visible; one clinic's camera), and a trial reports its endpoint per subgroup. Skin tone is the
manifest's Fitzpatrick type where given, else the ITA estimated from the pixels around the lesion
(`measuring.skintone`), and every row says which. A group's interval resamples its own patients;
the pooled predictions of every repeat are scored together, as in the main report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from eczema_batch.catalogue.models import Image
from eczema_batch.imaging.skintone import skin_tone, tone_order
from eczema_batch.pipeline.evaluate import ECE_BINS, percentile_interval

#: the groupings, in the order they are reported
GROUPINGS = ("skin tone", "body site", "device")
#: a group with fewer patients gets no interval (a bootstrap of one patient says nothing)
MIN_PATIENTS_FOR_INTERVAL = 2
#: below this many patients a group's figures are marked as too few to read
FEW_PATIENTS = 5
NOT_RECORDED = "not recorded"


@dataclass(frozen=True)
class GroupScore:
    """One metric of one group: the value and its 95% patient-bootstrap interval."""

    value: float | None
    ci95: list[float] | None

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": self.ci95}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> GroupScore:
        return cls(value=doc["value"], ci95=doc["ci95"])


@dataclass(frozen=True)
class SubgroupRow:
    grouping: str
    group: str
    #: where the group came from: manifest, estimated (ITA from the pixels), exif/dicom, none
    source: str
    images: int
    patients: int
    #: out-of-fold predictions scored (images x repeats)
    predictions: int
    weighted_f1: GroupScore
    #: quadratic-weighted Cohen's kappa of the head's class against the reference label
    qwk: GroupScore
    #: expected calibration error of the top-class probability
    ece: GroupScore
    #: mean of (expected score - reference class): > 0 the head scores the group too severe
    score_bias: GroupScore

    @property
    def few(self) -> bool:
        return self.patients < FEW_PATIENTS

    def as_dict(self) -> dict[str, Any]:
        return {"grouping": self.grouping, "group": self.group, "source": self.source,
                "images": self.images, "patients": self.patients,
                "predictions": self.predictions, "few_patients": self.few,
                "weighted_f1": self.weighted_f1.as_dict(), "qwk": self.qwk.as_dict(),
                "ece": self.ece.as_dict(), "score_bias": self.score_bias.as_dict()}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> SubgroupRow:
        return cls(grouping=doc["grouping"], group=doc["group"], source=doc["source"],
                   images=doc["images"], patients=doc["patients"],
                   predictions=doc["predictions"],
                   weighted_f1=GroupScore.from_dict(doc["weighted_f1"]),
                   qwk=GroupScore.from_dict(doc["qwk"]), ece=GroupScore.from_dict(doc["ece"]),
                   score_bias=GroupScore.from_dict(doc["score_bias"]))


@dataclass(frozen=True)
class SubgroupReport:
    #: the segmenter mode whose head predictions were scored
    segmenter: str
    rows: tuple[SubgroupRow, ...]
    #: scored images by where their skin tone came from: manifest, estimated, unknown
    tone_sources: dict[str, int]
    bootstrap: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {"segmenter": self.segmenter, "rows": [r.as_dict() for r in self.rows],
                "tone_sources": dict(self.tone_sources), "bootstrap": self.bootstrap,
                "seed": self.seed}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> SubgroupReport:
        return cls(segmenter=doc["segmenter"],
                   rows=tuple(SubgroupRow.from_dict(r) for r in doc["rows"]),
                   tone_sources=dict(doc["tone_sources"]), bootstrap=doc["bootstrap"],
                   seed=doc["seed"])


@dataclass(frozen=True)
class ImageAttributes:
    body_site: str | None
    device: str | None
    fitzpatrick: int | None
    skin_ita: float | None

    def group(self, grouping: str) -> tuple[str, str]:
        """(group, source) of this image in `grouping`."""
        if grouping == "skin tone":
            group, source = skin_tone(self.fitzpatrick, self.skin_ita)
            return (group, source) if group and source else ("unknown", "none")
        if grouping == "body site":
            return (self.body_site, "catalogue") if self.body_site else (NOT_RECORDED, "none")
        if grouping == "device":
            return (self.device, "exif/dicom") if self.device else (NOT_RECORDED, "none")
        raise ValueError(f"unknown grouping {grouping!r}")


def image_attributes(session: Session, image_ids: Sequence[int]) -> dict[int, ImageAttributes]:
    stmt = select(Image.id, Image.body_site, Image.device, Image.fitzpatrick,
                  Image.skin_ita).where(Image.id.in_(list(image_ids)))
    return {iid: ImageAttributes(site, device, fitz, ita)
            for iid, site, device, fitz, ita in session.execute(stmt)}


def subgroup_report(
    *,
    image_ids: np.ndarray,
    patient_ids: np.ndarray,
    labels: np.ndarray,
    proba: np.ndarray,
    attributes: Mapping[int, ImageAttributes],
    segmenter: str,
    bootstrap: int,
    seed: int,
) -> SubgroupReport:
    """Score every group of every grouping; one row per prediction in the parallel arrays
    (an image appears once per repeat)."""
    rows: list[SubgroupRow] = []
    sources: dict[str, int] = {"manifest": 0, "estimated": 0, "unknown": 0}
    for iid in np.unique(image_ids).tolist():
        source = attributes[iid].group("skin tone")[1]
        sources["unknown" if source == "none" else source] += 1
    for g_index, grouping in enumerate(GROUPINGS):
        found = [attributes[int(i)].group(grouping) for i in image_ids]
        names = sorted({name for name, _ in found}, key=_group_order(grouping))
        for index, name in enumerate(names):
            members = np.array([n == name for n, _ in found])
            source = next(s for n, s in found if n == name)
            rows.append(_score_group(
                grouping, name, source, image_ids[members], patient_ids[members],
                labels[members], proba[members], bootstrap=bootstrap,
                rng=np.random.default_rng([seed, g_index, index])))
    return SubgroupReport(segmenter=segmenter, rows=tuple(rows), tone_sources=sources,
                          bootstrap=bootstrap, seed=seed)


def _group_order(grouping: str) -> Any:
    def key(name: str) -> tuple[int, str]:
        if grouping == "skin tone":
            return tone_order(name)
        return (name in (NOT_RECORDED, "unknown"), name)

    return key


def _score_group(grouping: str, name: str, source: str, image_ids: np.ndarray,
                 patient_ids: np.ndarray, labels: np.ndarray, proba: np.ndarray, *,
                 bootstrap: int, rng: np.random.Generator) -> SubgroupRow:
    n_classes = proba.shape[1]
    predicted = proba.argmax(axis=1)
    confidence = proba.max(axis=1)
    expected = proba @ np.arange(n_classes, dtype=np.float64)
    patients, index = np.unique(patient_ids, return_inverse=True)

    def metrics(weight: np.ndarray) -> tuple[float, float | None, float, float]:
        confusion = np.bincount(labels * n_classes + predicted, weights=weight,
                                minlength=n_classes * n_classes).reshape(n_classes, n_classes)
        return (weighted_f1_from_confusion(confusion), quadratic_kappa_from_confusion(confusion),
                weighted_ece(labels, predicted, confidence, weight),
                float(np.average(expected - labels, weights=weight)))

    point = metrics(np.ones(len(labels)))
    intervals: list[list[float] | None] = [None] * 4
    if len(patients) >= MIN_PATIENTS_FOR_INTERVAL:
        draws = np.empty((bootstrap, 4))
        for b in range(bootstrap):
            multiplicity = np.bincount(rng.integers(0, len(patients), len(patients)),
                                       minlength=len(patients))
            values = metrics(multiplicity[index].astype(np.float64))
            draws[b] = [np.nan if v is None else v for v in values]
        intervals = [_interval(draws[:, k]) for k in range(4)]
    f1, qwk, ece, bias = point
    return SubgroupRow(
        grouping=grouping, group=name, source=source,
        images=len(np.unique(image_ids)), patients=len(patients), predictions=len(labels),
        weighted_f1=GroupScore(f1, intervals[0]), qwk=GroupScore(qwk, intervals[1]),
        ece=GroupScore(ece, intervals[2]), score_bias=GroupScore(bias, intervals[3]))


def _interval(values: np.ndarray) -> list[float] | None:
    finite = values[np.isfinite(values)]
    # Kappa is undefined on resamples with one class only; too few defined values: no interval.
    if len(finite) < 0.9 * len(values):
        return None
    return percentile_interval(finite)


# --- metrics from a weighted confusion matrix (a bootstrap replicate costs a bincount) ----------


def weighted_f1_from_confusion(confusion: np.ndarray) -> float:
    """Support-weighted F1 (scikit-learn's average="weighted", zero_division=0); rows: truth."""
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    denominator = support + predicted
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp, dtype=np.float64),
                   where=denominator > 0)
    total = support.sum()
    return float((f1 * support).sum() / total) if total > 0 else 0.0


def quadratic_kappa_from_confusion(confusion: np.ndarray) -> float | None:
    """Cohen's kappa with quadratic weights; None where undefined (one class on both sides)."""
    n = confusion.shape[0]
    total = confusion.sum()
    if total <= 0 or n < 2:
        return None
    i, j = np.indices((n, n))
    weights = (i - j) ** 2 / (n - 1) ** 2
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / total
    disagreement_expected = float((weights * expected).sum())
    if disagreement_expected <= 1e-12:
        return None
    return 1.0 - float((weights * confusion).sum()) / disagreement_expected


def weighted_ece(labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                 weight: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """`pipeline.evaluate.expected_calibration_error` with a weight per prediction."""
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = weight.sum()
    if total <= 0:
        return 0.0
    mass = np.bincount(index, weights=weight, minlength=bins)
    correct = np.bincount(index, weights=weight * (predicted == labels), minlength=bins)
    sure = np.bincount(index, weights=weight * confidence, minlength=bins)
    filled = mass > 0
    return float(np.abs(correct[filled] - sure[filled]).sum() / total)


# --- tables (the CLI prints them; the HTML report renders them from a saved evaluation) ---------

SUBGROUP_COLUMNS = ["grouping", "group", "source", "patients", "images", "weighted F1 [95% CI]",
                    "QWK [95% CI]", "ECE [95% CI]", "score bias [95% CI]"]


def subgroup_title(report: SubgroupReport) -> str:
    sources = report.tone_sources
    return (f"subgroups (head, segmenter {report.segmenter}): pooled out-of-fold predictions; 95% "
            f"intervals from a bootstrap of each group's patients; skin tone from the manifest "
            f"for {sources.get('manifest', 0)} images, estimated (ITA outside the lesion mask) "
            f"for {sources.get('estimated', 0)}, unknown for {sources.get('unknown', 0)}; "
            f"score bias > 0: scored more severe than the reference label; * fewer than "
            f"{FEW_PATIENTS} patients")


def subgroup_cells(row: SubgroupRow) -> list[str]:
    return [row.grouping, row.group + (" *" if row.few else ""), row.source, str(row.patients),
            str(row.images), _cell(row.weighted_f1), _cell(row.qwk), _cell(row.ece),
            _cell(row.score_bias, signed=True)]


def subgroup_tables(report: SubgroupReport) -> list[tuple[str, list[str], list[list[str]]]]:
    return [(subgroup_title(report), SUBGROUP_COLUMNS,
             [subgroup_cells(r) for r in report.rows])]


def _cell(score: GroupScore, *, signed: bool = False) -> str:
    if score.value is None:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    text = fmt.format(score.value)
    if score.ci95 is not None:
        low, high = score.ci95
        text += f" [{fmt.format(low)}, {fmt.format(high)}]"
    return text
