"""The evaluation report: out-of-fold predictions in, a typed report and summary tables out.

Two views of each method, as a statistician reads them:
- over folds: every metric per (repeat, fold), then mean +/- sample std over all folds (the
  paper's "0.67 +/- 0.01" is reported this way);
- pooled: all out-of-fold predictions of all repeats together (each image once per repeat): the
  confusion matrix, per-class precision/recall/F1/support, calibration, and a 95% interval of
  weighted F1 from a bootstrap over patients, with paired intervals of the head's margin over
  each baseline (the same resampled patients for every method).

The report's parts are the frozen dataclasses of `training.results`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from eczema_batch.pipeline.evaluate import (
    Split,
    classification_report,
    patient_bootstrap,
    percentile_interval,
    scalar_metrics,
    weighted_f1,
)
from eczema_batch.report.spreadsheet import record_writer, spreadsheet_text
from eczema_batch.training.data import LabelledImages, References
from eczema_batch.training.leakage import LeakageReport
from eczema_batch.training.results import (
    BASELINES,
    AblationRow,
    CalibrationBin,
    ClassMetrics,
    Comparison,
    ConfigurationScore,
    EvaluationReport,
    FoldRow,
    Interval,
    MeanDifference,
    MethodF1,
    MethodReport,
    MethodScores,
    MethodSummary,
    Metrics,
    ModelComparison,
    ModelDifference,
    ModelIdentities,
    NaiveForwards,
    OverlapStat,
    PooledReport,
    ScalingPoint,
    SegmentationQuality,
    Stat,
)

# --- computing it -------------------------------------------------------------------------------


@dataclass
class MethodPredictions:
    """Out-of-fold probabilities of one method, fold by fold."""

    splits: list[Split] = field(default_factory=list)
    proba: list[np.ndarray] = field(default_factory=list)
    n_train: list[int] = field(default_factory=list)
    train_patients: list[int | None] = field(default_factory=list)

    def add(self, split: Split, proba: np.ndarray, n_train: int, *,
            train_patients: int | None = None) -> None:
        self.splits.append(split)
        self.proba.append(np.asarray(proba, dtype=np.float64))
        self.n_train.append(n_train)
        self.train_patients.append(train_patients)

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, probabilities) of every out-of-fold prediction."""
        return (np.concatenate([s.test for s in self.splits]), np.concatenate(self.proba))


def _fold_rows(data: LabelledImages, preds: MethodPredictions) -> tuple[FoldRow, ...]:
    return tuple(
        FoldRow(repeat=s.repeat, fold=s.fold, n_train=n, n_test=len(s.test),
                metrics=Metrics.from_dict(scalar_metrics(data.labels[s.test], p)))
        for s, p, n in zip(preds.splits, preds.proba, preds.n_train, strict=True)
    )


def _pooled(data: LabelledImages, preds: MethodPredictions, replicates: np.ndarray
            ) -> PooledReport:
    positions, proba = preds.pooled()
    pooled = classification_report(data.labels[positions], proba, data.classes)
    return PooledReport(
        metrics=Metrics.from_dict(pooled),
        per_class=tuple(ClassMetrics.from_dict(c) for c in pooled["per_class"]),
        confusion=tuple(tuple(row) for row in pooled["confusion"]),
        calibration=tuple(CalibrationBin.from_dict(b) for b in pooled["calibration"]),
        weighted_f1_ci95=Interval.of(percentile_interval(replicates)),
        predictions=len(positions),
    )


def _method_report(data: LabelledImages, preds: MethodPredictions, replicates: np.ndarray
                   ) -> MethodReport:
    rows = _fold_rows(data, preds)
    return MethodReport(summary=MethodSummary.over(rows),
                        pooled=_pooled(data, preds, replicates), folds=rows)


def _replicates(data: LabelledImages, preds: MethodPredictions, *, bootstrap: int, seed: int
                ) -> np.ndarray:
    positions, proba = preds.pooled()
    n_classes = len(data.classes)
    return patient_bootstrap(
        data.labels[positions], proba.argmax(axis=1), data.patient_ids[positions],
        metric=lambda t, p, w: weighted_f1(t, p, w, n_classes=n_classes),
        replicates=bootstrap, seed=seed,
    )


def score_methods(
    data: LabelledImages,
    results: Mapping[str, Mapping[str, MethodPredictions]],
    *,
    segmenter: str,
    fractions: Sequence[float],
    bootstrap: int,
    seed: int,
) -> MethodScores:
    """Metrics, bootstrap intervals, the ablation and the scaling curve of every method."""
    reports: dict[str, dict[str, MethodReport]] = {}
    comparison: dict[str, dict[str, Comparison]] = {}
    ablation: list[AblationRow] = []
    scaling: tuple[ScalingPoint, ...] = ()
    replicates: dict[str, dict[str, np.ndarray]] = {}
    for mode, methods in results.items():
        reps = {name: _replicates(data, methods[name], bootstrap=bootstrap, seed=seed)
                for name in ("head", *BASELINES)}
        reports[mode] = {name: _method_report(data, methods[name], reps[name]) for name in reps}
        replicates[mode] = reps
        head = reports[mode]["head"]
        comparison[mode] = {
            f"head_minus_{name}": Comparison(
                weighted_f1=head.pooled.metrics.weighted_f1
                - reports[mode][name].pooled.metrics.weighted_f1,
                ci95=Interval.of(percentile_interval(reps["head"] - reps[name])),
            )
            for name in BASELINES
        }
        ablation.append(AblationRow(
            segmenter=mode, weighted_f1=head.summary.weighted_f1,
            weighted_f1_ci95=head.pooled.weighted_f1_ci95, qwk=head.summary.qwk,
        ))
        scaled = sorted((float(k.split("@")[1]), v) for k, v in methods.items() if "@" in k)
        if scaled or mode == segmenter:
            scaling = _scaling(data, scaled, methods["head"], fractions)
    return MethodScores(results=reports, comparison=comparison, ablation=tuple(ablation),
                        scaling=scaling, replicates=replicates)


#: the methods a model comparison reports: the head, and the linear probe (a common measure of
#: an embedder's features on their own)
COMPARED_METHODS = ("head", "logistic")


def compare_models(
    data: LabelledImages,
    results: Sequence[Mapping[str, MethodPredictions]],
    models: Sequence[ModelIdentities],
    *,
    segmenter: str,
    bootstrap: int,
    seed: int,
    segmentation: Sequence[SegmentationQuality | None] = (),
    refs: References | None = None,
    first_replicates: Mapping[str, np.ndarray] | None = None,
) -> ModelComparison:
    """Each configuration's weighted F1 and every later one minus the first, paired.

    All configurations were cross-validated on the same splits, so their pooled predictions
    cover the same images in the same order and one bootstrap seed resamples the same patients
    for each: replicate minus replicate is the paired difference.
    """
    # The first configuration's replicates, when `score_methods` made them: the same draws.
    known = first_replicates or {}
    reps = [{name: known[name] if index == 0 and name in known
             else _replicates(data, methods[name], bootstrap=bootstrap, seed=seed)
             for name in COMPARED_METHODS} for index, methods in enumerate(results)]
    pooled = [{name: weighted_f1(data.labels[methods[name].pooled()[0]],
                                 methods[name].pooled()[1].argmax(axis=1),
                                 n_classes=len(data.classes))
               for name in COMPARED_METHODS} for methods in results]
    seg = list(segmentation) or [None] * len(results)
    configurations = tuple(
        ConfigurationScore(models=identities, dice=_dice(seg[index]), iou=_iou(seg[index]),
                           methods={
            name: MethodF1(
                weighted_f1=Stat.of([r.metrics.weighted_f1
                                     for r in _fold_rows(data, methods[name])]),
                pooled=pooled[index][name],
                pooled_ci95=Interval.of(percentile_interval(reps[index][name])))
            for name in COMPARED_METHODS})
        for index, (methods, identities) in enumerate(zip(results, models, strict=True)))
    differences = tuple(
        ModelDifference(of=index, minus=0, methods={
            name: Comparison(weighted_f1=pooled[index][name] - pooled[0][name],
                             ci95=Interval.of(percentile_interval(reps[index][name]
                                                                  - reps[0][name])))
            for name in COMPARED_METHODS},
            dice=_dice_difference(seg[index], seg[0], refs, bootstrap=bootstrap, seed=seed))
        for index in range(1, len(results)))
    return ModelComparison(segmenter=segmenter, configurations=configurations,
                           differences=differences)


def _dice(seg: SegmentationQuality | None) -> OverlapStat | None:
    return None if seg is None else seg.dice


def _iou(seg: SegmentationQuality | None) -> OverlapStat | None:
    return None if seg is None else seg.iou


def _dice_difference(of: SegmentationQuality | None, minus: SegmentationQuality | None,
                     refs: References | None, *, bootstrap: int, seed: int
                     ) -> MeanDifference | None:
    """Mean Dice of `of` minus `minus` on the same references; patients resampled (paired)."""
    if of is None or minus is None or refs is None:
        return None
    theirs = {p.image_id: p.dice for p in minus.per_image}
    ids = [p.image_id for p in of.per_image]
    if not ids or set(ids) != set(theirs):
        return None
    difference = np.array([p.dice - theirs[p.image_id] for p in of.per_image])
    patient = dict(zip(refs.image_ids.tolist(), refs.patient_ids.tolist(), strict=True))
    groups = np.array([patient[i] for i in ids])
    replicates = patient_bootstrap(
        difference, difference, groups,
        metric=lambda values, _, weight: float(np.average(values, weights=weight)),
        replicates=bootstrap, seed=seed)
    return MeanDifference(difference=float(difference.mean()),
                          ci95=Interval.of(percentile_interval(replicates)))


def _scaling(data: LabelledImages, scaled: list[tuple[float, MethodPredictions]],
             full: MethodPredictions, fractions: Sequence[float]) -> tuple[ScalingPoint, ...]:
    points = list(scaled)
    if 1.0 in fractions:
        whole = MethodPredictions(full.splits, full.proba, full.n_train, [
            len(np.unique(data.patient_ids[s.train])) for s in full.splits])
        points.append((1.0, whole))
    out = []
    for fraction, preds in points:
        rows = _fold_rows(data, preds)
        out.append(ScalingPoint(
            fraction=fraction,
            train_patients=Stat.of([p for p in preds.train_patients if p is not None]).mean,
            train_images=Stat.of([float(n) for n in preds.n_train]).mean,
            weighted_f1=Stat.of([r.metrics.weighted_f1 for r in rows]),
            accuracy=Stat.of([r.metrics.accuracy for r in rows]),
            qwk=Stat.of([r.metrics.qwk for r in rows]),
        ))
    return tuple(out)


def prediction_rows(data: LabelledImages, results: dict[str, dict[str, MethodPredictions]]
                    ) -> list[dict[str, Any]]:
    """The head's out-of-fold predictions, one row per (segmenter mode, repeat, image)."""
    rows = []
    for mode, methods in results.items():
        preds = methods["head"]
        for split, proba in zip(preds.splits, preds.proba, strict=True):
            for pos, p in zip(split.test, proba, strict=True):
                row: dict[str, Any] = {
                    "image_id": int(data.image_ids[pos]),
                    "patient": data.patient_codes[int(data.patient_ids[pos])],
                    "segmenter": mode, "repeat": split.repeat, "fold": split.fold,
                    "true": int(data.labels[pos]), "predicted": int(np.argmax(p)),
                }
                row.update({f"p_{name}": round(float(v), 6)
                            for name, v in zip(data.classes, p, strict=True)})
                rows.append(row)
    rows.sort(key=lambda r: (r["segmenter"], r["repeat"], r["image_id"]))
    return rows


def naive_forwards(data: LabelledImages, refs: References, splits: list[Split],
                   modes: tuple[str, ...], segmentation: bool) -> NaiveForwards:
    """Model forwards if every (segmenter mode, repeat, fold) recomputed its features.

    Per fold: whole-image embeddings of the fold's images and of its reference pool (for the
    prompts), one SegGPT query and one crop embedding per image. The scaling curve is not
    counted (its heads reuse the fold's features even without a cache), nor a second pass.
    """
    embedder = segmenter = 0
    labelled = set(data.image_ids.tolist())
    manual = set(refs.image_ids.tolist())
    for split in splits:
        test_patients = np.unique(data.patient_ids[split.test])
        pool = set(refs.image_ids[~np.isin(refs.patient_ids, test_patients)].tolist())
        for mode in modes:
            if mode == "none":
                embedder += len(labelled)
                continue
            segmented = labelled - manual if mode == "manual" else labelled
            embedder += len(segmented | pool) + len(labelled)
            segmenter += len(segmented)
    if segmentation:
        embedder += len(manual)
        segmenter += len(manual)
    return NaiveForwards(embedder_images=embedder, segmenter_queries=segmenter)


def report_json(report: EvaluationReport) -> str:
    # allow_nan=False: an undefined metric must be None (null), never an invalid NaN token.
    return json.dumps(report.as_dict(), indent=2, allow_nan=False, default=str) + "\n"


def write_predictions_csv(rows: list[dict[str, Any]], out: TextIO, *,
                          verbatim: bool = False) -> None:
    """One line per prediction; text cells neutralised for spreadsheets unless `verbatim`."""
    if not rows:
        raise ValueError("no predictions to write")
    columns = list(rows[0])
    writerow = record_writer(out)
    writerow(columns)
    for row in rows:
        writerow(row[c] if verbatim or not isinstance(row[c], str) else spreadsheet_text(row[c])
                 for c in columns)


# --- readable summary ---------------------------------------------------------------------------


def _pm(stat: Stat) -> str:
    if stat.mean is None:
        return "-"
    return f"{stat.mean:.3f} ± {stat.std:.3f}"


def _ci(ci: Interval) -> str:
    return f"[{ci.low:.3f}, {ci.high:.3f}]"


Table = tuple[str, list[str], list[list[str]]]


def summary_tables(report: EvaluationReport) -> list[Table]:
    """(title, columns, rows) tables for a terminal: the CLI renders them."""
    main = report.settings.segmenter
    head = report.results[main]["head"].pooled
    tables = [_methods_table(report), _per_class_table(main, head),
              _confusion_table(main, head, report.data.classes), _comparison_table(report)]
    if report.scaling:
        tables.append(_scaling_table(main, report.scaling))
    if report.segmentation is not None:
        tables.append(_segmentation_table(report.segmentation))
    if report.model_comparison is not None:
        tables += _model_comparison_tables(report.model_comparison)
    if report.leakage is not None:
        tables += _leakage_tables(report.leakage)
    if report.robustness is not None:
        from eczema_batch.training.robustness import robustness_tables

        tables += robustness_tables(report.robustness)
    if report.agreement is not None:
        from eczema_batch.training.agreement import agreement_tables

        tables += agreement_tables(report.agreement)
    else:
        tables.append(("reference label", ["rule"], [[report.settings.reference_label]]))
    if report.subgroups is not None:
        from eczema_batch.training.subgroups import subgroup_tables

        tables += subgroup_tables(report.subgroups)
    return tables


def _methods_table(report: EvaluationReport) -> Table:
    rows = []
    for mode, methods in report.results.items():
        for name, r in methods.items():
            s, pooled = r.summary, r.pooled
            rows.append([mode, name, _pm(s.weighted_f1),
                         f"{pooled.metrics.weighted_f1:.3f} {_ci(pooled.weighted_f1_ci95)}",
                         _pm(s.accuracy), _pm(s.macro_f1), _pm(s.qwk), _pm(s.rps), _pm(s.ece)])
    return (
        "severity: mean ± std over folds; pooled out-of-fold weighted F1 with its 95% interval "
        "from a patient bootstrap",
        ["segmenter", "method", "weighted F1", "pooled [95% CI]", "accuracy", "macro F1", "QWK",
         "RPS", "ECE"], rows)


def _per_class_table(main: str, pooled: PooledReport) -> Table:
    return (
        f"head ({main}), pooled out-of-fold predictions of all repeats",
        ["class", "precision", "recall", "F1", "support"],
        [[c.name, f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.f1:.3f}", str(c.support)]
         for c in pooled.per_class])


def _confusion_table(main: str, pooled: PooledReport, classes: Sequence[str]) -> Table:
    return (
        f"confusion matrix, head ({main}): rows truth, columns prediction", ["", *classes],
        [[name, *map(str, row)] for name, row in zip(classes, pooled.confusion, strict=True)])


def _comparison_table(report: EvaluationReport) -> Table:
    return (
        "head minus baseline, weighted F1 (paired patient bootstrap)",
        ["segmenter", "comparison", "difference", "95% CI"],
        [[mode, name, f"{c.weighted_f1:+.3f}", _ci(c.ci95)]
         for mode, comp in report.comparison.items() for name, c in comp.items()])


def _scaling_table(main: str, scaling: Sequence[ScalingPoint]) -> Table:
    return (
        f"data scaling ({main}): head trained on a fraction of each training fold's patients",
        ["fraction", "train patients", "train images", "weighted F1", "QWK"],
        [[f"{p.fraction:g}", f"{p.train_patients:.1f}", f"{p.train_images:.1f}",
          _pm(p.weighted_f1), _pm(p.qwk)] for p in scaling])


def _segmentation_table(seg: SegmentationQuality) -> Table:
    return (
        "segmentation vs manual masks (prompts leave-one-patient-out)",
        ["references", "Dice", "Dice median", "IoU", "IoU median", "no prompts"],
        [[str(seg.images), _pm(seg.dice), f"{seg.dice.median:.3f}", _pm(seg.iou),
          f"{seg.iou.median:.3f}", str(seg.no_prompts)]])


def _configuration_label(comparison: ModelComparison, index: int) -> str:
    """The compared models' names, each configuration told apart by what differs."""
    models = comparison.configurations[index].models
    segmenters = {c.models.segmenter for c in comparison.configurations}
    name = (models.embedder.name if len(segmenters) == 1 or models.segmenter is None
            else models.segmenter.name)
    return f"{index + 1}: {name}"


def _model_comparison_tables(comparison: ModelComparison) -> list[Table]:
    scores = (
        f"models compared ({comparison.segmenter}), same folds, seeds and patients: weighted F1 "
        "mean ± std over folds; pooled with its patient-bootstrap 95% interval",
        ["configuration", "embedder", "segmenter", "method", "weighted F1", "pooled [95% CI]"],
        [[_configuration_label(comparison, i), c.models.embedder.name,
          c.models.segmenter.name if c.models.segmenter is not None else "-", name,
          _pm(m.weighted_f1), f"{m.pooled:.3f} {_ci(m.pooled_ci95)}"]
         for i, c in enumerate(comparison.configurations) for name, m in c.methods.items()]
        + [[_configuration_label(comparison, i), c.models.embedder.name,
            c.models.segmenter.name if c.models.segmenter is not None else "-",
            "Dice (references)", _pm(c.dice), "-"]
           for i, c in enumerate(comparison.configurations) if c.dice is not None])
    differences = (
        "model difference, pooled weighted F1 and mean Dice (paired patient bootstrap: the "
        "same resamples for both)",
        ["comparison", "method", "difference", "95% CI"],
        [[f"{_configuration_label(comparison, d.of)} minus "
          f"{_configuration_label(comparison, d.minus)}", name, f"{c.weighted_f1:+.3f}",
          _ci(c.ci95)] for d in comparison.differences for name, c in d.methods.items()]
        + [[f"{_configuration_label(comparison, d.of)} minus "
            f"{_configuration_label(comparison, d.minus)}", "mean Dice (references)",
            f"{d.dice.difference:+.3f}", _ci(d.dice.ci95)]
           for d in comparison.differences if d.dice is not None])
    return [scores, differences]


def _leakage_tables(leakage: LeakageReport) -> list[Table]:
    tables: list[Table] = [(
        "leakage rule: no patient is scored by a model their labels or masks trained",
        ["derived models and who was scored"], [[line] for line in leakage.sentences()])]
    if leakage.excluded:
        tables.append((
            "patients not scored (still in every training fold)",
            ["study", "subject", "labelled images", "manual masks", "trained"],
            [[e.study, e.subject, str(e.labelled_images), str(e.references), ", ".join(e.models)]
             for e in leakage.excluded]))
    return tables
