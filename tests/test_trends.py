"""Severity per visit and trends per patient, checked against numbers worked out by hand.

The pure arithmetic is tested on VisitScore values; the aggregation in SQL (mean of probability
vectors, reviewed labels as one-hot, counts of flagged images) on real catalogues, SQLite and
PostgreSQL, with predictions written by hand.
"""

from __future__ import annotations

import datetime as dt
import math

import pytest
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.report.queries import (
    ReviewThresholds,
    choose_head,
    flag_reasons,
    iter_image_records,
    iter_patient_visits,
)
from eczema_batch.report.trends import (
    TrendRules,
    VisitScore,
    fit_slope,
    order_visits,
    patient_trend,
    sparkline,
    summarise_cohort,
)
from tests.report_factories import (
    make_head,
    make_image,
    make_patient,
    make_prediction,
    make_review,
    make_study,
    make_visit,
)

D0 = dt.date(2024, 1, 1)
#: t(0.975, df=1): the 95% two-sided quantile with one degree of freedom
T_975_DF1 = 12.706204736174707


def visit(vid: int, when: dt.date | None, probs: tuple[float, ...] | None, *, label: str = "",
          n: int = 1, flagged: int = 0, reviewed: int = 0) -> VisitScore:
    return VisitScore(vid, label or (when.isoformat() if when else f"v{vid}"), when, n_images=n,
                      n_scored=0 if probs is None else n, n_flagged=flagged, n_reviewed=reviewed,
                      probabilities=probs)


# --- pure arithmetic ---------------------------------------------------------------------------


def test_visit_class_and_expected_score() -> None:
    v = visit(1, D0, (0.05, 0.2, 0.45, 0.3))
    assert v.severity == 2
    assert v.expected_score == pytest.approx(0 * 0.05 + 1 * 0.2 + 2 * 0.45 + 3 * 0.3)  # 2.0
    assert visit(2, D0, None).severity is None and visit(2, D0, None).expected_score is None


def test_slope_with_t_interval_by_hand() -> None:
    # y = 2.0, 1.3, 1.0 at days 0, 30, 60: mean x 30, mean y 4.3/3; Sxx 1800, Sxy -30.
    slope = fit_slope([(0, 2.0), (30, 1.3), (60, 1.0)])
    assert slope is not None and slope.n == 3
    assert slope.per_30_days == pytest.approx(-30 / 1800 * 30)  # -0.5
    residuals = [2.0 - (4.3 / 3 + 0.5), 1.3 - 4.3 / 3, 1.0 - (4.3 / 3 - 0.5)]
    se = math.sqrt(sum(r * r for r in residuals) / 1 / 1800)
    assert slope.ci_low == pytest.approx((-1 / 60 - T_975_DF1 * se) * 30)
    assert slope.ci_high == pytest.approx((-1 / 60 + T_975_DF1 * se) * 30)
    assert slope.ci_low == pytest.approx(-1.96719, abs=1e-4)


def test_slope_needs_two_dates_and_three_points_for_an_interval() -> None:
    assert fit_slope([(0, 1.0)]) is None
    assert fit_slope([(0, 1.0), (0, 2.0)]) is None  # equal dates: no time passed
    two = fit_slope([(0, 1.0), (60, 2.0)])
    assert two is not None and two.per_30_days == pytest.approx(0.5)
    assert two.ci_low is None and two.ci_high is None


def test_visits_ordered_by_date_then_undated_by_natural_label() -> None:
    visits = [visit(1, None, None, label="visit-10"), visit(2, dt.date(2024, 2, 1), None),
              visit(3, None, None, label="visit-2"), visit(4, D0, None, label="b"),
              visit(5, D0, None, label="a")]
    assert [v.visit_id for v in order_visits(visits)] == [5, 4, 2, 3, 1]


def test_improving_patient_by_hand() -> None:
    t = patient_trend([
        visit(1, D0, (0.05, 0.2, 0.45, 0.3), n=2, flagged=1),       # moderate, score 2.0
        visit(2, D0 + dt.timedelta(30), (0.1, 0.6, 0.2, 0.1)),       # mild, 1.3
        visit(3, D0 + dt.timedelta(60), (0.0, 1.0, 0.0, 0.0), reviewed=1),  # mild, 1.0
    ])
    assert [v.days_from_baseline for v in t.visits] == [0, 30, 60]
    assert [v.change_from_baseline for v in t.visits] == pytest.approx([0.0, -0.7, -1.0])
    assert t.visits[0].change_from_previous is None
    assert [v.change_from_previous for v in t.visits[1:]] == pytest.approx([-0.7, -0.3])
    assert [v.class_change_from_baseline for v in t.visits] == [0, -1, -1]
    assert t.baseline is t.visits[0] and t.visits[0].is_baseline
    assert t.status == "improving" and t.responder is True
    assert t.slope is not None and t.slope.per_30_days == pytest.approx(-0.5)
    assert t.n_flagged == 1 and t.n_reviewed == 1
    assert t.visits[0].visit.review_status == "pending"
    assert t.visits[2].visit.review_status == "reviewed"


def test_single_visit_patient() -> None:
    t = patient_trend([visit(1, D0, (0.0, 0.0, 1.0, 0.0))])
    assert t.status == "unknown" and t.responder is None and t.slope is None
    assert t.baseline is t.last
    assert t.change_from_baseline == 0.0 and t.visits[0].days_from_baseline == 0


def test_equal_dates_give_no_slope_but_a_change() -> None:
    t = patient_trend([visit(2, D0, (0.0, 0.0, 0.0, 1.0), label="pm"),
                       visit(1, D0, (0.0, 1.0, 0.0, 0.0), label="am")])
    assert [v.visit.label for v in t.visits] == ["am", "pm"]
    assert [v.days_from_baseline for v in t.visits] == [0, 0]
    assert t.slope is None
    assert t.change_from_baseline == pytest.approx(2.0)
    assert t.status == "worsening" and t.responder is False


def test_undated_visits_ordered_by_label_without_days() -> None:
    t = patient_trend([visit(1, None, (0.0, 0.0, 1.0, 0.0), label="visit-10"),
                       visit(2, None, (0.0, 0.0, 0.0, 1.0), label="visit-2")])
    assert [v.visit.label for v in t.visits] == ["visit-2", "visit-10"]
    assert [v.days_from_baseline for v in t.visits] == [None, None]
    assert t.slope is None
    assert t.change_from_baseline == pytest.approx(-1.0)
    assert t.status == "improving" and t.responder is True


def test_unscored_visits_are_skipped_and_a_late_baseline_dates_earlier_visits() -> None:
    t = patient_trend([visit(1, D0, None, n=2), visit(2, D0 + dt.timedelta(10), (1.0, 0, 0, 0)),
                       visit(3, D0 + dt.timedelta(20), None),
                       visit(4, D0 + dt.timedelta(40), (0, 1.0, 0, 0))])
    assert t.baseline is t.visits[1]
    assert [v.days_from_baseline for v in t.visits] == [-10, 0, 10, 30]
    assert [v.change_from_baseline for v in t.visits] == [None, 0.0, None, 1.0]
    assert t.visits[3].change_from_previous == pytest.approx(1.0)
    assert t.scored_visits == 2


def test_a_visit_with_only_flagged_images_still_counts_and_says_so() -> None:
    v = visit(1, D0, (0.4, 0.3, 0.2, 0.1), n=2, flagged=2)
    assert v.provisional and v.review_status == "pending"
    t = patient_trend([visit(0, D0 - dt.timedelta(30), (0.0, 0.0, 1.0, 0.0)), v])
    assert t.last is not None and t.last.visit is v
    assert t.change_from_baseline == pytest.approx(1.0 - 2.0)


def test_status_band_and_responder_rule_are_configurable() -> None:
    visits = [visit(1, D0, (0.0, 1.0, 0.0, 0.0)), visit(2, D0 + dt.timedelta(30),
                                                          (0.0, 0.6, 0.4, 0.0))]  # +0.4
    assert patient_trend(visits).status == "stable"
    assert patient_trend(visits, TrendRules(stable_band=0.3)).status == "worsening"
    better = [visit(1, D0, (0, 0, 0, 1.0)), visit(2, D0 + dt.timedelta(30), (0, 0, 1.0, 0))]
    assert patient_trend(better).responder is True
    assert patient_trend(better, TrendRules(responder_classes=2)).responder is False


def test_sparkline() -> None:
    assert sparkline([0.0, 1.5, 3.0, None]) == "▁▅█·"


def test_cohort_summary_by_hand() -> None:
    a = patient_trend([visit(1, D0, (0, 0, 1.0, 0)), visit(2, D0 + dt.timedelta(28),
                                                             (0, 1.0, 0, 0))])  # -1
    b = patient_trend([visit(3, D0, (0, 1.0, 0, 0)), visit(4, D0 + dt.timedelta(30),
                                                           (0, 0, 1.0, 0))])  # +1
    c = patient_trend([visit(5, D0, (1.0, 0, 0, 0))])
    s = summarise_cohort([a, b, c])
    assert s.patients == 3 and dict(s.by_status) == {"improving": 1, "worsening": 1,
                                                     "unknown": 1}
    assert (s.responders, s.evaluable) == (1, 2)
    first, second = s.per_visit
    assert (first.number, first.n, first.mean_change) == (1, 3, 0.0)
    assert (second.number, second.n, second.mean_days) == (2, 2, 29.0)
    assert second.mean_change == 0.0 and second.sd_change == pytest.approx(math.sqrt(2))


# --- aggregation in the catalogue (SQLite and PostgreSQL) --------------------------------------


def test_visit_aggregates_in_sql(factory: sessionmaker[Session]) -> None:
    with factory() as s, s.begin():
        study = make_study(s)
        head = make_head(s)
        p = make_patient(s, study, "P1")
        v1 = make_visit(s, p, D0)
        v2 = make_visit(s, p, D0 + dt.timedelta(30))
        v3 = make_visit(s, p, D0 + dt.timedelta(60))
        low = make_image(s, v1, body_site="trunk")
        make_prediction(s, low, head, [0.1, 0.2, 0.3, 0.4])             # top 0.4: flagged
        make_prediction(s, make_image(s, v1), head, [0.0, 0.2, 0.6, 0.2])
        make_prediction(s, make_image(s, v2), head, [0.1, 0.6, 0.2, 0.1])
        make_image(s, v2)                                                 # not measured
        reviewed = make_image(s, v3)
        make_prediction(s, reviewed, head, [0.7, 0.2, 0.1, 0.0])
        make_review(s, reviewed, 3, rater="first")
        make_review(s, reviewed, 1, rater="second")                       # the newest wins
        q = make_patient(s, study, "Q1")
        only_flagged = make_visit(s, q, D0)
        for similarity in ((0.2, 0.1), (0.9, 0.8)):
            make_prediction(s, make_image(s, only_flagged), head, [0.9, 0.1, 0.0, 0.0],
                            similarities=similarity,
                            mask_flag=None if similarity[0] < 0.5 else "SegGPT found no lesion")
    with factory() as s:
        head_info = choose_head(s)
        groups = list(iter_patient_visits(s, head=head_info, thresholds=ReviewThresholds()))
        records = list(iter_image_records(s, head=head_info))
    assert [g.key.patient for g in groups] == ["P1", "Q1"]
    first, second, third = groups[0].visits
    assert first.probabilities == pytest.approx((0.05, 0.2, 0.45, 0.3))
    assert (first.severity, first.worst_severity) == (2, 3)
    assert first.expected_score == pytest.approx(2.0)
    assert (first.n_images, first.n_scored, first.n_flagged, first.n_reviewed) == (2, 2, 1, 0)
    assert first.body_sites == ("left-arm", "trunk")
    assert (second.n_images, second.n_scored) == (2, 1)
    assert second.probabilities == pytest.approx((0.1, 0.6, 0.2, 0.1))
    assert third.probabilities == pytest.approx((0.0, 1.0, 0.0, 0.0))
    assert (third.n_reviewed, third.n_flagged, third.worst_severity) == (1, 0, 1)
    trend = patient_trend(groups[0].visits)
    assert trend.status == "improving" and trend.slope is not None
    assert trend.slope.per_30_days == pytest.approx(-0.5)
    (flagged_visit,) = groups[1].visits
    assert flagged_visit.provisional and flagged_visit.n_flagged == 2
    reasons = {r.image_id: flag_reasons(r, ReviewThresholds()) for r in records
               if r.patient == "Q1"}
    assert sorted(" ".join(x) for x in reasons.values()) == [
        "mask: SegGPT found no lesion", "weak prompts: mean similarity 0.15 < 0.50"]
    assert flag_reasons(next(r for r in records if r.image_id == low.id), ReviewThresholds()) == [
        "low confidence: top probability 0.40 < 0.50"]


def test_report_and_demo_never_import_the_cli_toolkit() -> None:
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "eczema_batch"
    for path in [*sorted((package / "report").glob("*.py")), package / "demo.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.Import) for alias in node.names}
        names |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom)}
        assert not names & {"typer", "rich", "celery", "click"}, path
