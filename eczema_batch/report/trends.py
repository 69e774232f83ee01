"""Severity per visit and trends per patient: pure arithmetic on what the catalogue measured.

A visit's severity is the mean of its images' class-probability vectors (a reviewed image counts as
a one-hot vector of its reviewer's class): the class is the mean vector's argmax, the expected score
is sum(k * p_k) on the 0..C-1 scale (0-3 for clear/mild/moderate/severe). The catalogue query
(report.queries) averages the vectors; everything after that lives here, free of any database.

Per patient, visits are ordered by date (then label); undated visits come after the dated ones,
ordered by label, with no day count. The baseline is the first visit with a score. Change is
measured in expected score (and in classes); the slope is ordinary least squares of the expected
score on days since baseline, per 30 days, with a t interval when at least 3 dated visits have a
score. The status compares the last scored visit with the baseline.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import cached_property, lru_cache
from itertools import pairwise

#: Slopes are reported per this many days (about a month, the usual visit interval).
SLOPE_DAYS = 30
#: Statuses a patient can have; "unknown" when fewer than two visits have a score.
STATUSES = ("improving", "stable", "worsening", "unknown")
_SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class TrendRules:
    """What counts as a change; the defaults come from Settings (ECZEMA_BATCH_TREND_*)."""

    #: |change from baseline| (expected score) within this band is "stable"
    stable_band: float = 0.5
    #: a responder's last visit is at least this many classes better than its baseline
    responder_classes: int = 1
    #: two-sided confidence level of the slope's interval
    confidence: float = 0.95


@dataclass(slots=True)
class VisitScore:
    """One visit's aggregates, as the catalogue query returns them (class and score derived)."""

    visit_id: int
    label: str
    visit_date: date | None
    n_images: int
    #: images with a prediction or a reviewed label (the ones the mean is over)
    n_scored: int = 0
    #: images flagged for review and not reviewed yet
    n_flagged: int = 0
    #: images whose prediction a rater's reviewed label replaced
    n_reviewed: int = 0
    #: mean class-probability vector over the scored images; None when none is scored
    probabilities: tuple[float, ...] | None = None
    #: the highest class among the visit's images
    worst_severity: int | None = None
    body_sites: tuple[str, ...] = ()
    #: where the visit's date came from (manifest, a DICOM tag, folder, ..., none)
    date_source: str | None = None
    #: mean share of the image the lesion masks cover, over the images with a measured area
    lesion_area: float | None = None
    #: images with a measured lesion area (the ones `lesion_area` is the mean of)
    n_area: int = 0
    #: argmax of the mean vector (the lower class on a tie)
    severity: int | None = field(init=False, default=None)
    #: sum(k * p_k) of the mean vector
    expected_score: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        p = self.probabilities
        if p:
            self.severity = p.index(max(p))
            self.expected_score = expected_score(p)

    @property
    def review_status(self) -> str:
        """pending (flagged images wait for a rater), reviewed, or none."""
        if self.n_flagged:
            return "pending"
        return "reviewed" if self.n_reviewed else "none"

    @property
    def provisional(self) -> bool:
        """Every scored image is flagged and unreviewed: the visit's score awaits a rater."""
        return self.n_scored > 0 and self.n_flagged == self.n_scored


@dataclass(slots=True)
class VisitTrend:
    visit: VisitScore
    #: 1-based position in the patient's ordered visits
    number: int
    days_from_baseline: int | None = None
    change_from_baseline: float | None = None
    change_from_previous: float | None = None
    class_change_from_baseline: int | None = None
    is_baseline: bool = False


@dataclass(frozen=True)
class Slope:
    per_30_days: float
    n: int
    ci_low: float | None = None
    ci_high: float | None = None


@dataclass(frozen=True)
class PatientTrend:
    visits: tuple[VisitTrend, ...]
    baseline: VisitTrend | None
    last: VisitTrend | None
    status: str
    responder: bool | None
    #: (days since baseline, expected score) of the dated scored visits: the slope's data
    points: tuple[tuple[float, float], ...] = ()
    confidence: float = 0.95

    @cached_property
    def slope(self) -> Slope | None:
        # Fitted on first use: the cohort summary and the visit export never show it, and the
        # fit (with its t quantile) was a tenth of a 10,000-patient report.
        return fit_slope(self.points, confidence=self.confidence)

    @property
    def change_from_baseline(self) -> float | None:
        return self.last.change_from_baseline if self.last else None

    @property
    def class_change_from_baseline(self) -> int | None:
        return self.last.class_change_from_baseline if self.last else None

    @property
    def scored_visits(self) -> int:
        return sum(1 for v in self.visits if v.visit.expected_score is not None)

    @property
    def n_flagged(self) -> int:
        return sum(v.visit.n_flagged for v in self.visits)

    @property
    def n_reviewed(self) -> int:
        return sum(v.visit.n_reviewed for v in self.visits)


def expected_score(probabilities: Sequence[float]) -> float:
    """sum(k * p_k): the mean class on the 0..C-1 scale."""
    total = 0.0
    for k, p in enumerate(probabilities):
        total += k * p
    return total


def _natural_key(label: str) -> tuple[object, ...]:
    # "visit-2" before "visit-10": numbers compare as numbers.
    return tuple(int(part) if part.isdigit() else part.lower()
                 for part in re.split(r"(\d+)", label))


def order_visits(visits: Iterable[VisitScore]) -> list[VisitScore]:
    """Dated visits by (date, label), then undated ones by label."""
    out = list(visits)
    dates = [v.visit_date for v in out]
    if None not in dates and all(a < b for a, b in pairwise(dates)):  # type: ignore[operator]
        return out  # already in date order, no ties: the common case
    return sorted(
        out,
        key=lambda v: (v.visit_date is None, v.visit_date or date.min, _natural_key(v.label),
                       v.visit_id),
    )


@lru_cache(maxsize=64)
def _t_quantile(confidence: float, df: int) -> float:
    from scipy.stats import t  # imported here: scipy.stats costs ~0.3 s to import

    return float(t.ppf(0.5 + confidence / 2, df))


def fit_slope(points: Sequence[tuple[float, float]], *, confidence: float = 0.95
              ) -> Slope | None:
    """OLS slope of y on x (x in days), per 30 days; a t interval when n >= 3.

    None when fewer than two points or all x are equal (no time passed: no slope).
    """
    n = len(points)
    if n < 2:
        return None
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    beta = sxy / sxx
    if n < 3:
        return Slope(per_30_days=beta * SLOPE_DAYS, n=n)
    residual = sum((y - mean_y - beta * (x - mean_x)) ** 2 for x, y in points)
    se = math.sqrt(residual / (n - 2) / sxx)
    half = _t_quantile(confidence, n - 2) * se
    return Slope(per_30_days=beta * SLOPE_DAYS, n=n, ci_low=(beta - half) * SLOPE_DAYS,
                 ci_high=(beta + half) * SLOPE_DAYS)


def patient_trend(visits: Iterable[VisitScore], rules: TrendRules = TrendRules()) -> PatientTrend:
    """Order the visits and measure change, slope, status and response against the baseline."""
    ordered = order_visits(visits)
    trends: list[VisitTrend] = []
    baseline: VisitTrend | None = None
    last: VisitTrend | None = None
    base_score = 0.0
    base_class = 0
    base_date: date | None = None
    points: list[tuple[float, float]] = []
    for number, visit in enumerate(ordered, start=1):
        trend = VisitTrend(visit, number)
        trends.append(trend)
        score = visit.expected_score
        if score is None:
            if visit.visit_date is not None and base_date is not None:
                trend.days_from_baseline = (visit.visit_date - base_date).days
            continue
        if baseline is None:
            baseline, base_score, base_date = trend, score, visit.visit_date
            base_class = visit.severity or 0
            trend.is_baseline = True
            # Visits before the first scored one are dated against it too.
            if base_date is not None:
                for earlier in trends[:-1]:
                    if earlier.visit.visit_date is not None:
                        earlier.days_from_baseline = (earlier.visit.visit_date - base_date).days
        if visit.visit_date is not None and base_date is not None:
            trend.days_from_baseline = (visit.visit_date - base_date).days
            points.append((float(trend.days_from_baseline), score))
        trend.change_from_baseline = score - base_score
        trend.class_change_from_baseline = (visit.severity or 0) - base_class
        if last is not None:
            trend.change_from_previous = score - (last.visit.expected_score or 0.0)
        last = trend
    status, responder = "unknown", None
    if last is not None and last is not baseline:
        change = last.change_from_baseline or 0.0
        if change <= -rules.stable_band:
            status = "improving"
        elif change >= rules.stable_band:
            status = "worsening"
        else:
            status = "stable"
        responder = -(last.class_change_from_baseline or 0) >= rules.responder_classes
    return PatientTrend(visits=tuple(trends), baseline=baseline, last=last, status=status,
                        responder=responder, points=tuple(points), confidence=rules.confidence)


def sparkline(values: Sequence[float | None], *, low: float = 0.0, high: float = 3.0) -> str:
    """One block character per value on [low, high]; a middle dot where there is no value."""
    out = []
    span = (high - low) or 1.0
    for value in values:
        if value is None:
            out.append("·")
            continue
        share = min(max((value - low) / span, 0.0), 1.0)
        out.append(_SPARK[min(int(share * len(_SPARK)), len(_SPARK) - 1)])
    return "".join(out)


@dataclass(frozen=True)
class VisitNumberSummary:
    """Change from baseline at the n-th visit, across the patients that have it."""

    number: int
    n: int
    mean_days: float | None
    mean_change: float
    sd_change: float | None


@dataclass
class CohortSummary:
    patients: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    responders: int = 0
    #: patients with a responder verdict (at least two scored visits)
    evaluable: int = 0
    images: int = 0
    scored_images: int = 0
    flagged_images: int = 0
    reviewed_images: int = 0
    per_visit: list[VisitNumberSummary] = field(default_factory=list)


def summarise_cohort(trends: Iterable[PatientTrend]) -> CohortSummary:
    """Patients by status, responders, and mean change from baseline per visit number."""
    summary = CohortSummary()
    changes: dict[int, list[float]] = {}
    days: dict[int, list[int]] = {}
    for trend in trends:
        summary.patients += 1
        summary.by_status[trend.status] += 1
        if trend.responder is not None:
            summary.evaluable += 1
            summary.responders += trend.responder
        for visit in trend.visits:
            summary.images += visit.visit.n_images
            summary.scored_images += visit.visit.n_scored
            summary.flagged_images += visit.visit.n_flagged
            summary.reviewed_images += visit.visit.n_reviewed
            if visit.change_from_baseline is not None:
                changes.setdefault(visit.number, []).append(visit.change_from_baseline)
                if visit.days_from_baseline is not None:
                    days.setdefault(visit.number, []).append(visit.days_from_baseline)
    for number in sorted(changes):
        values = changes[number]
        mean = sum(values) / len(values)
        sd = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
              if len(values) > 1 else None)
        d = days.get(number)
        summary.per_visit.append(VisitNumberSummary(
            number=number, n=len(values), mean_days=sum(d) / len(d) if d else None,
            mean_change=mean, sd_change=sd))
    return summary
