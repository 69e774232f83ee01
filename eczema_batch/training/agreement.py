"""Agreement between raters, within a rater, and between the model and each rater.

A model's agreement with a rater means something only beside the raters' agreement with each
other: a kappa of 0.6 is poor where raters agree at 0.9 and as good as a rater where they agree
at 0.6. So the figures come together:

- rater vs rater: quadratic-weighted Cohen's kappa of each pair on the images both rated
  (scikit-learn's `cohen_kappa_score(weights="quadratic")`), and the share of exact agreement;
- all raters: Krippendorff's alpha, ordinal (the `krippendorff` package), on every image two or
  more raters labelled; and ICC(2,1) (Shrout and Fleiss: two-way random effects, absolute
  agreement, one rater) on the images every rater labelled, the class numbers as scores;
- intra-rater: each rater's blinded repeats against their own first reading (kappa);
- model vs rater: the head's predicted class against each rater's own label; in `evaluate` the
  cross-validated (out-of-fold) predictions of every repeat, each image once per repeat.

Every kappa and alpha has a 95% percentile interval from a bootstrap that resamples patients
(their images are correlated), seeded. A rater's own label is their newest, repeats aside
(`catalogue.labels`); the reference rule plays no part here but is reported alongside.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import krippendorff
import numpy as np
from sklearn.metrics import cohen_kappa_score
from sqlalchemy.orm import Session

from eczema_batch.catalogue.labels import ImageRatings, read_ratings
from eczema_batch.pipeline.evaluate import (
    BOOTSTRAP_REPLICATES,
    patient_bootstrap,
    percentile_interval,
)
from eczema_batch.severity import DEFAULT_CLASSES

#: The model's name in the model-vs-rater rows.
MODEL = "model"

Table = tuple[str, list[str], list[list[str]]]


# --- the statistics (pure) ----------------------------------------------------------------------


def quadratic_kappa(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray, n_classes: int,
                    sample_weight: np.ndarray | None = None) -> float | None:
    """Quadratic-weighted Cohen's kappa over the classes 0..n-1; None where undefined (no
    images, or both sides give one and the same class throughout)."""
    if len(a) == 0:
        return None
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        value = cohen_kappa_score(a, b, labels=list(range(n_classes)), weights="quadratic",
                                  sample_weight=sample_weight)
    return float(value) if np.isfinite(value) else None


def ordinal_alpha(matrix: np.ndarray, n_classes: int) -> float | None:
    """Krippendorff's alpha, ordinal, of a raters x images matrix (NaN: not rated); None where
    undefined (fewer than one image with two ratings, or a single class throughout)."""
    pairable = np.sum(~np.isnan(matrix), axis=0) >= 2
    if not pairable.any():
        return None
    data = matrix[:, pairable]
    if len(np.unique(data[~np.isnan(data)])) < 2:
        return None
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        value = krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal",
                                   value_domain=list(range(n_classes)))
    return float(value) if np.isfinite(value) else None


def icc_2_1(scores: np.ndarray) -> float | None:
    """ICC(2,1) of an images x raters matrix with no gaps (Shrout & Fleiss 1979): two-way
    random effects, absolute agreement, a single rater. None with fewer than 2 images or raters,
    or no variance at all."""
    n, k = scores.shape
    if n < 2 or k < 2:
        return None
    grand = scores.mean()
    ss_rows = k * np.sum((scores.mean(axis=1) - grand) ** 2)
    ss_cols = n * np.sum((scores.mean(axis=0) - grand) ** 2)
    ss_error = np.sum((scores - grand) ** 2) - ss_rows - ss_cols
    ms_rows = ss_rows / (n - 1)
    ms_cols = ss_cols / (k - 1)
    ms_error = ss_error / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    if denominator <= 0:
        return None
    return float((ms_rows - ms_error) / denominator)


def _interval(values: np.ndarray) -> list[float] | None:
    kept = values[np.isfinite(values)]
    return percentile_interval(kept) if len(kept) else None


def kappa_estimate(a: np.ndarray, b: np.ndarray, patients: np.ndarray, n_classes: int, *,
                   bootstrap: int, seed: int) -> Estimate:
    """Kappa of two parallel label arrays with its patient-bootstrap 95% interval."""
    value = quadratic_kappa(a, b, n_classes)
    ci = None
    if value is not None and bootstrap > 0:
        replicates = patient_bootstrap(
            a, b, patients, replicates=bootstrap, seed=seed,
            metric=lambda t, p, w: _nan(quadratic_kappa(t, p, n_classes, w)))
        ci = _interval(replicates)
    exact = float(np.mean(a == b)) if len(a) else None
    return Estimate(value=value, ci95=ci, images=len(a), patients=len(np.unique(patients)),
                    exact=exact)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def alpha_estimate(matrix: np.ndarray, patients: np.ndarray, n_classes: int, *, bootstrap: int,
                   seed: int) -> Estimate:
    """Ordinal alpha of a raters x images matrix with its patient-bootstrap 95% interval."""
    value = ordinal_alpha(matrix, n_classes)
    pairable = np.sum(~np.isnan(matrix), axis=0) >= 2
    ci = None
    if value is not None and bootstrap > 0:
        groups, index = np.unique(patients, return_inverse=True)
        columns = [np.flatnonzero(index == g) for g in range(len(groups))]
        rng = np.random.default_rng(seed)
        replicates = np.empty(bootstrap)
        for r in range(bootstrap):
            drawn = rng.integers(0, len(groups), len(groups))
            replicates[r] = _nan(ordinal_alpha(
                matrix[:, np.concatenate([columns[g] for g in drawn])], n_classes))
        ci = _interval(replicates)
    return Estimate(value=value, ci95=ci, images=int(pairable.sum()),
                    patients=len(np.unique(patients[pairable])), exact=None)


# --- the report's parts -------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    value: float | None
    #: 95% patient-bootstrap percentile interval; None where not computed or undefined
    ci95: list[float] | None
    images: int
    patients: int
    #: share of images with the same class on both sides (kappa rows)
    exact: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": self.ci95, "images": self.images,
                "patients": self.patients, "exact": self.exact}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Estimate:
        return cls(value=doc["value"], ci95=doc["ci95"], images=doc["images"],
                   patients=doc["patients"], exact=doc.get("exact"))


@dataclass(frozen=True)
class PairAgreement:
    """Quadratic-weighted kappa of `a` against `b` (for intra-rater rows a == b: first reading
    against repeat; for model rows a is "model")."""

    a: str
    b: str
    kappa: Estimate

    def as_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "kappa": self.kappa.as_dict()}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> PairAgreement:
        return cls(a=doc["a"], b=doc["b"], kappa=Estimate.from_dict(doc["kappa"]))


@dataclass(frozen=True)
class IccResult:
    value: float | None
    #: images every rater labelled (the ones it is computed on), and the raters
    images: int
    raters: int
    kind: str = "ICC(2,1)"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "images": self.images,
                "raters": self.raters}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> IccResult:
        return cls(value=doc["value"], images=doc["images"], raters=doc["raters"],
                   kind=doc["kind"])


@dataclass(frozen=True)
class AgreementReport:
    """`eczema-batch agreement --json`, and the `agreement` section of the evaluate report."""

    #: the reference-label rule in force (training's truth), reported beside the raters
    reference_rule: str
    classes: tuple[str, ...]
    #: rater -> images they labelled
    raters: dict[str, int]
    #: images with labels from two raters or more
    multi_rated: int
    pairs: tuple[PairAgreement, ...]
    alpha: Estimate
    icc: IccResult
    intra: tuple[PairAgreement, ...]
    #: the head against each rater (evaluate: out-of-fold predictions); empty without one
    model: tuple[PairAgreement, ...] = ()
    #: where the model rows' predictions came from
    model_source: str | None = None
    bootstrap: int = BOOTSTRAP_REPLICATES
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "reference_rule": self.reference_rule, "classes": list(self.classes),
            "raters": dict(self.raters), "multi_rated": self.multi_rated,
            "pairs": [p.as_dict() for p in self.pairs], "alpha": self.alpha.as_dict(),
            "icc": self.icc.as_dict(), "intra": [p.as_dict() for p in self.intra],
            "model": [p.as_dict() for p in self.model], "model_source": self.model_source,
            "bootstrap": self.bootstrap, "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> AgreementReport:
        return cls(
            reference_rule=doc["reference_rule"], classes=tuple(doc["classes"]),
            raters=dict(doc["raters"]), multi_rated=doc["multi_rated"],
            pairs=tuple(PairAgreement.from_dict(p) for p in doc["pairs"]),
            alpha=Estimate.from_dict(doc["alpha"]), icc=IccResult.from_dict(doc["icc"]),
            intra=tuple(PairAgreement.from_dict(p) for p in doc["intra"]),
            model=tuple(PairAgreement.from_dict(p) for p in doc["model"]),
            model_source=doc["model_source"], bootstrap=doc["bootstrap"], seed=doc["seed"],
        )


# --- from ratings to the report -----------------------------------------------------------------


def agreement_report(
    ratings: Sequence[ImageRatings],
    *,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    reference_rule: str = "newest",
    predictions: Sequence[tuple[int, int, int]] = (),
    model_source: str | None = None,
    bootstrap: int = BOOTSTRAP_REPLICATES,
    seed: int = 0,
) -> AgreementReport:
    """Every figure from the raters' labels; `predictions` are (image id, patient id, predicted
    class) rows of the model (an image may appear once per repeat)."""
    n = len(classes)
    raters = sorted({r for item in ratings for r in item.own})
    counts = {r: sum(r in item.own for item in ratings) for r in raters}
    patients = np.array([item.patient_id for item in ratings], dtype=np.int64)
    pairs = []
    for a, b in itertools.combinations(raters, 2):
        both = [i for i, item in enumerate(ratings) if a in item.own and b in item.own]
        if not both:
            continue
        first = np.array([ratings[i].own[a] for i in both])
        second = np.array([ratings[i].own[b] for i in both])
        pairs.append(PairAgreement(a, b, kappa_estimate(first, second, patients[both], n,
                                                        bootstrap=bootstrap, seed=seed)))
    matrix = np.full((len(raters), len(ratings)), np.nan)
    for col, item in enumerate(ratings):
        for row, r in enumerate(raters):
            if r in item.own:
                matrix[row, col] = item.own[r]
    complete = ~np.isnan(matrix).any(axis=0) if raters else np.zeros(len(ratings), bool)
    icc = IccResult(value=icc_2_1(matrix[:, complete].T) if len(raters) >= 2 else None,
                    images=int(complete.sum()) if len(raters) >= 2 else 0, raters=len(raters))
    intra = []
    for r in raters:
        both = [i for i, item in enumerate(ratings) if r in item.own and r in item.repeats]
        if both:
            intra.append(PairAgreement(r, r, kappa_estimate(
                np.array([ratings[i].own[r] for i in both]),
                np.array([ratings[i].repeats[r] for i in both]),
                patients[both], n, bootstrap=bootstrap, seed=seed)))
    model = []
    by_image = {item.image_id: item for item in ratings}
    for r in raters:
        rows = [(p, by_image[iid].own[r], pred) for iid, p, pred in predictions
                if iid in by_image and r in by_image[iid].own]
        if rows:
            groups, truth, guess = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
            estimate = kappa_estimate(guess, truth, groups, n, bootstrap=bootstrap, seed=seed)
            images = len({iid for iid, _, _ in predictions if iid in by_image
                          and r in by_image[iid].own})
            model.append(PairAgreement(MODEL, r, Estimate(
                value=estimate.value, ci95=estimate.ci95, images=images,
                patients=estimate.patients, exact=estimate.exact)))
    return AgreementReport(
        reference_rule=reference_rule, classes=tuple(classes), raters=counts,
        multi_rated=sum(len(item.own) >= 2 for item in ratings), pairs=tuple(pairs),
        alpha=alpha_estimate(matrix, patients, n, bootstrap=bootstrap, seed=seed),
        icc=icc, intra=tuple(intra), model=tuple(model), model_source=model_source,
        bootstrap=bootstrap, seed=seed)


def catalogue_agreement(session: Session, *, study: str | None = None,
                        classes: tuple[str, ...] = DEFAULT_CLASSES, reference_rule: str = "newest",
                        predictions: Sequence[tuple[int, int, int]] = (),
                        model_source: str | None = None, bootstrap: int = BOOTSTRAP_REPLICATES,
                        seed: int = 0) -> AgreementReport:
    """The agreement report of the catalogue's labels (`study`, or every study)."""
    return agreement_report(read_ratings(session, study=study), classes=classes,
                            reference_rule=reference_rule, predictions=predictions,
                            model_source=model_source, bootstrap=bootstrap, seed=seed)


def evaluation_agreement(session: Session, *, study: str | None, classes: tuple[str, ...],
                         reference_rule: str, predictions: Sequence[Mapping[str, Any]],
                         segmenter: str, bootstrap: int, seed: int) -> AgreementReport | None:
    """The agreement section of `evaluate`: None unless some image has two raters or more.

    `predictions` are evaluate's out-of-fold rows (`prediction_rows`); the model rows use the
    head's under `segmenter`, every repeat.
    """
    ratings = read_ratings(session, study=study)
    if not any(len(item.own) >= 2 for item in ratings):
        return None
    patient_of = {item.image_id: item.patient_id for item in ratings}
    rows = [(int(r["image_id"]), patient_of.get(int(r["image_id"]), -1), int(r["predicted"]))
            for r in predictions if r["segmenter"] == segmenter]
    return agreement_report(ratings, classes=classes, reference_rule=reference_rule,
                            predictions=rows, model_source=f"out-of-fold head ({segmenter})",
                            bootstrap=bootstrap, seed=seed)


# --- readable summary ---------------------------------------------------------------------------


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ci(ci: list[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def agreement_tables(report: AgreementReport) -> list[Table]:
    """(title, columns, rows) tables: kappas side by side, then alpha, ICC and the raters."""
    rows = []
    for kind, group in (("rater vs rater", report.pairs), ("model vs rater", report.model),
                        ("intra-rater (repeat)", report.intra)):
        for p in group:
            who = f"{p.a} (first vs repeat)" if kind.startswith("intra") else f"{p.a} vs {p.b}"
            k = p.kappa
            rows.append([kind, who, str(k.images), str(k.patients), _value(k.value), _ci(k.ci95),
                         _value(k.exact)])
    kappas = (
        f"agreement: quadratic-weighted kappa with its 95% patient-bootstrap interval "
        f"(reference label: {report.reference_rule}"
        + (f"; model: {report.model_source})" if report.model_source else ")"),
        ["", "pair", "images", "patients", "kappa", "95% CI", "exact"], rows)
    overall = (
        "agreement of all raters",
        ["statistic", "value", "95% CI", "images", "raters"],
        [["Krippendorff's alpha (ordinal)", _value(report.alpha.value), _ci(report.alpha.ci95),
          str(report.alpha.images), str(len(report.raters))],
         [f"{report.icc.kind}, images every rater labelled", _value(report.icc.value), "-",
          str(report.icc.images), str(report.icc.raters)]])
    return [kappas, overall]
