"""Evaluation: metrics against scikit-learn, patient-grouped splits, the prompt cache, and
`eczema-batch evaluate` end to end with tiny models on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Image, Mask, Model, Visit
from eczema_batch.cli import app
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.ingest.service import ingest_study
from eczema_batch.measuring.config import RunConfig
from eczema_batch.pipeline.evaluate import (
    classification_report,
    expected_calibration_error,
    grouped_splits,
    mask_overlap,
    patient_bootstrap,
    percentile_interval,
    ranked_probability_score,
    scalar_metrics,
    subsample_groups,
    weighted_f1,
)
from eczema_batch.pipeline.records import MaskKey
from eczema_batch.pipeline.train import TrainSettings
from eczema_batch.synth import write_synthetic_study
from eczema_batch.training.evaluate import EvaluationResult, EvaluationSettings, run_evaluation
from eczema_batch.training.report import report_json
from eczema_batch.training.results import EvaluationReport
from tests._model_fixtures import (
    one_torch_thread,  # noqa: F401
    small_study_fixture,  # noqa: F401
    tiny_model_dir,  # noqa: F401
)

CLASSES = ("clear", "mild", "moderate", "severe")


# --- metrics on a hand-made case ----------------------------------------------------------------

#: Ten images, four ordinal classes; rows are the predicted probabilities.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
PROBA = np.array([
    [0.7, 0.2, 0.1, 0.0],
    [0.5, 0.4, 0.1, 0.0],
    [0.3, 0.6, 0.1, 0.0],  # clear called mild
    [0.2, 0.7, 0.1, 0.0],
    [0.1, 0.3, 0.6, 0.0],  # mild called moderate
    [0.0, 0.2, 0.8, 0.0],
    [0.0, 0.1, 0.3, 0.6],  # moderate called severe
    [0.0, 0.0, 0.1, 0.9],
    [0.0, 0.1, 0.2, 0.7],
    [0.6, 0.2, 0.1, 0.1],  # severe called clear: the worst ordinal error
])


def test_metrics_are_scikit_learns() -> None:
    y_pred = PROBA.argmax(axis=1)
    metrics = scalar_metrics(Y_TRUE, PROBA)
    assert metrics["weighted_f1"] == pytest.approx(f1_score(Y_TRUE, y_pred, average="weighted"))
    assert metrics["macro_f1"] == pytest.approx(f1_score(Y_TRUE, y_pred, average="macro"))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, y_pred)) == 0.6
    assert metrics["qwk"] == pytest.approx(cohen_kappa_score(Y_TRUE, y_pred, weights="quadratic"))
    report = classification_report(Y_TRUE, PROBA, CLASSES)
    precision, recall, f1, support = precision_recall_fscore_support(Y_TRUE, y_pred)
    assert [c["precision"] for c in report["per_class"]] == pytest.approx(precision)
    assert [c["recall"] for c in report["per_class"]] == pytest.approx(recall)
    assert [c["f1"] for c in report["per_class"]] == pytest.approx(f1)
    assert [c["support"] for c in report["per_class"]] == support.tolist() == [3, 2, 2, 3]
    assert report["confusion"] == confusion_matrix(Y_TRUE, y_pred).tolist()


def test_ranked_probability_score_by_hand() -> None:
    # RPS = 1/(K-1) * sum_k (CDF_pred_k - CDF_true_k)^2, averaged over images.
    by_hand = []
    for y, p in zip(Y_TRUE, PROBA, strict=True):
        cdf, truth = np.cumsum(p)[:-1], (np.arange(3) >= y).astype(float)
        by_hand.append(((cdf - truth) ** 2).sum() / 3)
    assert ranked_probability_score(Y_TRUE, PROBA) == pytest.approx(np.mean(by_hand))
    # A sure, right answer scores 0; sure and maximally wrong scores 1.
    assert ranked_probability_score(np.array([3]), np.array([[0, 0, 0, 1.0]])) == 0.0
    assert ranked_probability_score(np.array([3]), np.array([[1.0, 0, 0, 0]])) == 1.0


def test_expected_calibration_error_by_hand() -> None:
    # Two bins used: confidence 0.95 (2 images, 1 right) and 0.55 (2 images, both right).
    y = np.array([0, 1, 0, 0])
    proba = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    expected = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.55)
    assert expected_calibration_error(y, proba) == pytest.approx(expected)


def test_patient_bootstrap_is_seeded_and_paired() -> None:
    groups = np.repeat(np.arange(5), 2)
    y_pred = PROBA.argmax(axis=1)

    def metric(t: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
        return weighted_f1(t, p, w, n_classes=4)

    first = patient_bootstrap(Y_TRUE, y_pred, groups, metric=metric, replicates=200, seed=1)
    again = patient_bootstrap(Y_TRUE, y_pred, groups, metric=metric, replicates=200, seed=1)
    np.testing.assert_array_equal(first, again)
    low, high = percentile_interval(first)
    assert low <= f1_score(Y_TRUE, y_pred, average="weighted") <= high and low < high
    # Resampling is by patient: with one patient every replicate is the point estimate.
    single = patient_bootstrap(Y_TRUE, y_pred, np.zeros(10), metric=metric, replicates=20)
    assert np.all(single == single[0])
    # Paired: a method minus itself is exactly zero on every resample.
    assert percentile_interval(first - again) == [0.0, 0.0]


def test_mask_overlap_by_hand() -> None:
    manual = np.zeros((4, 4), dtype=bool)
    manual[0, :3] = manual[1, :3] = True  # 6 pixels
    predicted = np.zeros((4, 4), dtype=bool)
    predicted[1, :] = True  # 4 pixels, 3 of them on the lesion
    overlap = mask_overlap(predicted, manual)
    assert overlap["dice"] == pytest.approx(2 * 3 / (4 + 6))
    assert overlap["iou"] == pytest.approx(3 / 7)
    empty = np.zeros((2, 2), dtype=bool)
    assert mask_overlap(empty, empty) == {"dice": 1.0, "iou": 1.0}


# --- splits and prompt keys ---------------------------------------------------------------------


def test_grouped_splits_never_put_a_patient_on_both_sides() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 5)
    labels = rng.integers(0, 4, len(groups))
    splits = grouped_splits(labels, groups, folds=5, repeats=3, seed=0)
    assert len(splits) == 15
    for repeat in range(3):
        mine = [s for s in splits if s.repeat == repeat]
        tested = np.sort(np.concatenate([s.test for s in mine]))
        np.testing.assert_array_equal(tested, np.arange(len(groups)))  # each image tested once
        for split in mine:
            assert not set(groups[split.train]) & set(groups[split.test])
    firsts = [tuple(s.test) for s in splits if s.fold == 0]
    assert len(set(firsts)) == 3, "repeats must shuffle differently"
    again = grouped_splits(labels, groups, folds=5, repeats=3, seed=0)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(splits, again, strict=True))


def test_subsample_takes_whole_patients() -> None:
    groups = np.repeat(np.arange(10), 3)
    positions = np.arange(30)
    subset = subsample_groups(positions, groups, 0.2, seed=(0, 1))
    assert len(np.unique(groups[subset])) == 2 and len(subset) == 6
    np.testing.assert_array_equal(subsample_groups(positions, groups, 0.2, seed=(0, 1)), subset)
    assert len(subsample_groups(positions, groups, 0.01, seed=(0,))) == 3  # at least one patient


def test_mask_key_is_the_segmenter_and_prompt_set() -> None:
    def variant(segmenter_id: int, prompts: list[int]) -> str:
        return MaskKey.seggpt(segmenter_id, prompts).variant

    assert MaskKey.seggpt(3, [5, 2]) == MaskKey.seggpt(3, (2, 5))
    assert variant(3, [5, 2]) == variant(3, [2, 5])
    assert variant(3, [5, 2]) != variant(4, [5, 2])
    assert variant(3, [5, 2]) != variant(3, [5, 1])
    assert variant(3, []) == "seggpt:3:pnone"
    assert MaskKey("none").variant == "none" and MaskKey("manual").variant == "manual"


# --- end to end on both databases ---------------------------------------------------------------


def _config(model_dir: Path) -> RunConfig:
    return RunConfig(segmenter_model="tiny-seggpt", embedder_model="tiny-dino",
                     model_dir=str(model_dir), device="cpu")


def _numbers(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its run section (timings and forward counts)."""
    return {k: v for k, v in report.items() if k != "run"}


# --- the JSON document's layout, pinned --------------------------------------------------------
# evaluation.json is read by users' scripts: its keys, their order and nesting and the kind of
# each value are those the report had as a nested dict (the layout below was captured from that
# version). One item stands for every item of a list; 0 an int, 0.0 a float, "" a string.

_STAT = {"mean": 0.0, "std": 0.0, "n": 0}
_METRICS = {"weighted_f1": 0.0, "accuracy": 0.0, "macro_f1": 0.0, "qwk": 0.0, "rps": 0.0,
            "ece": 0.0}
_METHOD = {
    "summary": dict.fromkeys(_METRICS, _STAT),
    "pooled": {
        **_METRICS,
        "per_class": [{"class": "", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}],
        "confusion": [[0]],
        "calibration": [{"low": 0.0, "high": 0.0, "count": 0, "confidence": 0.0,
                         "accuracy": 0.0}],
        "weighted_f1_ci95": [0.0],
        "predictions": 0,
    },
    "folds": [{"repeat": 0, "fold": 0, "n_train": 0, "n_test": 0, **_METRICS}],
}
_MODES = ("seggpt", "none")
_MODEL = {"name": "", "digest": ""}
_LAYOUT = {
    "settings": {"folds": 0, "repeats": 0, "segmenter": "", "fractions": [0.0], "seed": 0,
                 "bootstrap": 0, "ablation": [""],
                 "train": {"epochs": 0, "lr": 0.0, "hidden": 0, "dropout": 0.0, "seed": 0,
                           "class_weights": "", "batch_size": 0},
                 "reference_label": "", "subgroups": True},
    "data": {"images": 0, "patients": 0, "references": 0, "classes": [""], "class_counts": [0],
             "splits": 0},
    "results": {mode: dict.fromkeys(("head", "majority", "logistic"), _METHOD)
                for mode in _MODES},
    "comparison": {mode: {f"head_minus_{name}": {"weighted_f1": 0.0, "ci95": [0.0]}
                          for name in ("majority", "logistic")} for mode in _MODES},
    "ablation": [{"segmenter": "", "weighted_f1": _STAT, "weighted_f1_ci95": [0.0],
                  "qwk": _STAT}],
    "scaling": [{"fraction": 0.0, "train_patients": 0.0, "train_images": 0.0,
                 "weighted_f1": _STAT, "accuracy": _STAT, "qwk": _STAT}],
    "segmentation": {"images": 0, "no_prompts": 0, "dice": {**_STAT, "median": 0.0},
                     "iou": {**_STAT, "median": 0.0},
                     "per_image": [{"image_id": 0, "prompts": [0], "dice": 0.0, "iou": 0.0}]},
    "models": {"embedder": _MODEL, "prompts": 0, "segmenter": _MODEL},
    "study": None,
    "prompt_leaks": 0,
    "subgroups": {
        "segmenter": "",
        "rows": [{"grouping": "", "group": "", "source": "", "images": 0, "patients": 0,
                  "predictions": 0, "few_patients": True,
                  **dict.fromkeys(("weighted_f1", "qwk", "ece", "score_bias"),
                                  {"value": 0.0, "ci95": [0.0]})}],
        "tone_sources": {"manifest": 0, "estimated": 0, "unknown": 0},
        "bootstrap": 0, "seed": 0,
    },
    "run": {
        "forwards": {"embedder_images": 0, "segmenter_queries": 0, "segmenter_prompt_pairs": 0},
        "naive_forwards": {"embedder_images": 0, "segmenter_queries": 0},
        "seconds": {"features_seggpt": 0.0, "features_none": 0.0, "segmentation_quality": 0.0,
                    "training": 0.0, "metrics": 0.0, "subgroups": 0.0, "total": 0.0},
    },
}


def _layout(document: Any) -> list[str]:
    """'path: kinds' for every value in a JSON document, in document order; the items of a
    list share the path `[]`. Null counts only where nothing else was found (an empty
    calibration bin or an undefined kappa is null beside numbers)."""
    kinds: dict[str, set[str]] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            kinds.setdefault(path, set()).add("object")
            for key, item in value.items():
                walk(item, f"{path}.{key}")
        elif isinstance(value, list):
            kinds.setdefault(path, set()).add("array")
            for item in value:
                walk(item, f"{path}[]")
        else:
            kind = "null" if value is None else type(value).__name__
            kinds.setdefault(path, set()).add(kind)

    walk(document, "")
    return [f"{path}: {'|'.join(sorted(k - {'null'} or k))}" for path, k in kinds.items()]


def _check_layout(report: EvaluationReport) -> None:
    document = json.loads(report_json(report))
    assert document == report.as_dict()
    assert list(document) == list(_LAYOUT)
    # Which of a subgroup row's intervals are defined differs by row: its paths in any order.
    assert sorted(_layout(document.pop("subgroups"))) == sorted(_layout(_LAYOUT["subgroups"]))
    assert _layout(document) == _layout({k: v for k, v in _LAYOUT.items() if k != "subgroups"})


def test_evaluate_is_leak_free_cached_and_repeatable(
    small_study: Path, factory: sessionmaker[Session], tiny_model_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = EvaluationSettings(folds=3, repeats=2, fractions=(0.5, 1.0), bootstrap=100,
                                  train=TrainSettings(epochs=20))
    first = run_evaluation(factory, config=_config(tiny_model_dir), settings=settings)
    report = first.report
    assert report.prompt_leaks == 0
    forwards, naive = report.run.forwards, report.run.naive_forwards
    assert 0 < forwards.segmenter_queries < naive.segmenter_queries
    assert 0 < forwards.embedder_images < naive.embedder_images
    assert set(report.results) == {"seggpt", "none"}
    assert [p.fraction for p in report.scaling] == [0.5, 1.0]
    assert report.segmentation is not None
    assert report.segmentation.images == report.data.references == 14
    _check_layout(report)
    _check_prompts(factory, first)

    # The same command again: every feature from the cache, the same numbers to the bit.
    json_file, csv_file = tmp_path / "report.json", tmp_path / "oof.csv"
    victim = tmp_path / "someone-elses.csv"
    victim.write_text("theirs\n")
    csv_file.symlink_to(victim)  # a pre-placed link is replaced, its target left alone
    result = CliRunner().invoke(app, [
        "evaluate", "--folds", "3", "--repeats", "2", "--fractions", "0.5,1.0",
        "--bootstrap", "100", "--epochs", "20", "--lr", "1e-4",  # not the tiny default
        "--model-dir", str(tiny_model_dir),
        "--segmenter-model", "tiny-seggpt", "--embedder-model", "tiny-dino",
        "--output", str(json_file), "--predictions", str(csv_file),
    ])
    assert result.exit_code == 0, result.stderr
    assert "weighted F1" in result.stderr and "confusion matrix" in result.stderr
    second = json.loads(json_file.read_text())
    assert second["run"]["forwards"] == {"embedder_images": 0, "segmenter_queries": 0,
                                         "segmenter_prompt_pairs": 0}
    assert _numbers(second) == json.loads(json.dumps(_numbers(report.as_dict())))
    # Read back, the document is the typed report again (run aside: it was another run).
    assert replace(EvaluationReport.from_dict(second), run=report.run) == report
    with csv_file.open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{k: str(v) for k, v in row.items()} for row in first.predictions]
    assert len(rows) == 2 * 2 * 48  # segmenter modes x repeats x images
    assert victim.read_text() == "theirs\n" and not csv_file.is_symlink()
    _check_patient_sides(rows)


def _check_patient_sides(rows: list[dict[str, str]]) -> None:
    """Within a repeat every image of a patient is in one test fold: never on both sides."""
    folds: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for row in rows:
        folds[(row["segmenter"], row["repeat"], row["patient"])].add(row["fold"])
    assert folds and all(len(f) == 1 for f in folds.values())


def _check_prompts(factory: sessionmaker[Session], result: EvaluationResult) -> None:
    """No prompt from the image's own patient, nor (for a test image) from the test fold; and
    the catalogue's mask for each prompt set records exactly those prompts."""
    with factory() as session:
        patient = dict(session.execute(select(Image.id, Visit.patient_id).join(Visit)).all())
        seg_id = session.scalar(select(Model.id).where(Model.name == "tiny-seggpt"))
        stored = {(iid, variant): ids for iid, variant, ids in session.execute(
            select(Mask.image_id, Mask.variant, Mask.prompt_ids).where(Mask.kind == "predicted"))}
    test_patients: dict[tuple[int, int], set[int]] = defaultdict(set)
    for use in result.prompt_audit:
        if use.test:
            test_patients[(use.repeat, use.fold)].add(patient[use.image_id])
    assert result.prompt_audit and test_patients
    for use in result.prompt_audit:
        prompt_patients = {patient[p] for p in use.prompt_ids}
        assert patient[use.image_id] not in prompt_patients
        if use.test:
            assert not prompt_patients & test_patients[(use.repeat, use.fold)]
        key = (use.image_id, MaskKey.seggpt(seg_id, use.prompt_ids).variant)
        assert sorted(stored[key]) == sorted(use.prompt_ids)


@pytest.mark.slow
@pytest.mark.one_database
def test_trained_head_beats_the_majority_baseline(
    tmp_path: Path, factory: sessionmaker[Session], tiny_model_dir: Path  # noqa: F811
) -> None:
    """On 200 synthetic images with the tiny random-weight models, SegGPT crops.

    The schedule is longer than the paper's (lr 1e-2 x 300 epochs, not 1e-4 x 50): the tiny
    DINO's 32-d features vary ~0.2 per dimension, so the paper's schedule barely moves the head
    (weighted F1 ~0.26 here). Real DINO features are far larger; see README. Background at an
    edge of most synthetic photographs leaves the frozen tiny head a pooled margin of ~0.16
    (0.33 against 0.17): the bounds are 0.15 (mean over folds) and 0.1 (pooled);
    `bench/accuracy.py` shows what adapting the models to the study adds.
    """
    root = tmp_path / "study"
    write_synthetic_study(root, patients=25, visits=4, seed=0, size=(96, 72))
    ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    settings = EvaluationSettings(folds=5, repeats=1, fractions=(1.0,), bootstrap=100,
                                  ablation=False, train=TrainSettings(lr=1e-2, epochs=300))
    report = run_evaluation(factory, config=_config(tiny_model_dir), settings=settings).report
    results = report.results["seggpt"]
    head, majority = results["head"], results["majority"]
    head_mean, majority_mean = head.summary.weighted_f1.mean, majority.summary.weighted_f1.mean
    assert head_mean is not None and majority_mean is not None
    assert head_mean - majority_mean >= 0.15
    assert head.pooled.metrics.weighted_f1 - majority.pooled.metrics.weighted_f1 >= 0.1
    assert report.comparison["seggpt"]["head_minus_majority"].ci95.low > 0
