"""`evaluate` with derived models: the leakage rule and models compared side by side, with tiny
models on a small synthetic study, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Image, Patient, Study, Visit
from eczema_batch.cli import app
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.errors import UsageError
from eczema_batch.ingest.service import ingest_study
from eczema_batch.measuring.config import RunConfig
from eczema_batch.pipeline.derived import DerivedIdentity, PatientRef, publish
from eczema_batch.pipeline.evaluate import grouped_splits
from eczema_batch.pipeline.loading import weights_digest
from eczema_batch.pipeline.train import TrainSettings
from eczema_batch.synth import write_synthetic_study
from eczema_batch.training.data import LabelledImages, labelled_images, references
from eczema_batch.training.evaluate import EvaluationSettings, run_evaluation
from eczema_batch.training.leakage import UsedModel, check_scorable, exclusion, scored_splits
from eczema_batch.training.report import report_json, summary_tables
from eczema_batch.training.results import EvaluationReport
from tests._model_fixtures import (
    one_torch_thread,  # noqa: F401
    tiny_model_dir_fixture,  # noqa: F401
)

#: small and quick: the rule and the pairing are under test, not the figures
SETTINGS = EvaluationSettings(folds=3, repeats=1, fractions=(1.0,), bootstrap=50,
                              ablation=False, train=TrainSettings(epochs=5))


@pytest.fixture
def study(tmp_path: Path, factory: sessionmaker[Session]) -> list[PatientRef]:
    """8 patients x 3 visits (48 labelled images, 14 references); their PatientRefs."""
    root = tmp_path / "study"
    write_synthetic_study(root, patients=8, visits=3, seed=0, size=(64, 48))
    assert ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).exit_code == 0
    with factory() as session:
        rows = session.execute(select(Study.name, Patient.subject_code).join(Patient.study)
                               .order_by(Patient.subject_code)).all()
    return [PatientRef(name, code) for name, code in rows]


@pytest.fixture
def model_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A model folder of its own: the tiny models, and room for derived ones."""
    folder = tmp_path / "models"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def _derive(model_dir: Path, name: str, *, base: str, method: str,
            supervised: tuple[PatientRef, ...] = (), unlabelled: tuple[PatientRef, ...] = (),
            perturb: float = 0.0) -> None:
    """Publish `name`: `base`'s weights (moved by `perturb` x noise) with an identity."""
    source = model_dir / base
    kind = "segmenter" if "seggpt" in base else "embedder"

    def write(folder: Path) -> None:
        shutil.copy2(source / "config.json", folder / "config.json")
        tensors = load_file(source / "model.safetensors")
        generator = torch.Generator().manual_seed(1)
        save_file({k: v + perturb * torch.randn(v.shape, generator=generator, dtype=v.dtype)
                   if v.is_floating_point() else v for k, v in tensors.items()},
                  folder / "model.safetensors")

    identity = DerivedIdentity(
        name=name, kind=kind, base=base, base_digest=weights_digest(source), method=method,
        settings={}, seed=0, images=(), supervised=supervised, unlabelled=unlabelled)
    publish(model_dir, name, write, identity)


def _config(model_dir: Path, *, embedder: str = "tiny-dino", segmenter: str = "tiny-seggpt"
            ) -> RunConfig:
    return RunConfig(segmenter_model=segmenter, embedder_model=embedder,
                     model_dir=str(model_dir), device="cpu")


def _patient_codes(factory: sessionmaker[Session], image_ids: set[int]) -> set[str]:
    with factory() as session:
        return set(session.scalars(
            select(Patient.subject_code).join(Visit, Visit.patient_id == Patient.id)
            .join(Image, Image.visit_id == Visit.id).where(Image.id.in_(image_ids))))


def test_a_tuned_segmenter_never_scores_the_patients_whose_masks_trained_it(
    study: list[PatientRef], model_dir: Path, factory: sessionmaker[Session],
) -> None:
    trained = tuple(study[:2])
    _derive(model_dir, "seggpt-tuned", base="tiny-seggpt", method="seggpt-tuning",
            supervised=trained)
    result = run_evaluation(factory, config=_config(model_dir, segmenter="seggpt-tuned"),
                            settings=SETTINGS)
    report = result.report
    excluded = {r.subject for r in trained}

    scored = {row["patient"] for row in result.predictions}
    assert scored == {r.subject for r in study} - excluded
    assert report.results["seggpt"]["head"].pooled.predictions == len(result.predictions)
    # Their masks are not scored either, but they still prompt the others.
    assert report.segmentation is not None
    assert not _patient_codes(factory, {s.image_id for s in report.segmentation.per_image}) \
        & excluded
    prompted_by = _patient_codes(factory, {p for use in result.prompt_audit
                                           for p in use.prompt_ids})
    assert prompted_by & excluded and report.prompt_leaks == 0

    leakage = report.leakage
    assert leakage is not None
    assert [(d.kind, d.name, d.supervised) for d in leakage.derived] == [
        ("segmenter", "seggpt-tuned", 2)]
    assert [(e.subject, e.models) for e in leakage.excluded] == [
        (r.subject, ("seggpt-tuned",)) for r in trained]
    assert sum(e.labelled_images for e in leakage.excluded) == 48 - len(result.predictions) == 12
    assert sum(e.references for e in leakage.excluded) == 14 - report.segmentation.images > 0
    assert (leakage.scored_patients, leakage.not_evaluated) == (6, 0)
    assert leakage.adapted_on_unlabelled == ()
    document = json.loads(report_json(report))
    assert list(document)[-4:] == ["prompt_leaks", "leakage", "subgroups", "run"]
    # The subgroups score only the scored patients' images.
    assert report.subgroups is not None
    assert sum(r.images for r in report.subgroups.rows if r.grouping == "device") == len(
        {row["image_id"] for row in result.predictions})
    assert "model_comparison" not in document
    assert EvaluationReport.from_dict(document).leakage == leakage
    titles = [title for title, _, _ in summary_tables(report)]
    assert any("leakage rule" in t for t in titles) and any("not scored" in t for t in titles)

    # Too few patients left for the folds: an error that says what to do.
    _derive(model_dir, "seggpt-greedy", base="tiny-seggpt", method="seggpt-tuning",
            supervised=tuple(study[:6]))
    with pytest.raises(UsageError, match=r"only 2 labelled patient\(s\) left .*--holdout"):
        run_evaluation(factory, config=_config(model_dir, segmenter="seggpt-greedy"),
                       settings=SETTINGS)


def test_embedders_side_by_side_paired_on_the_same_patients(
    study: list[PatientRef], model_dir: Path, factory: sessionmaker[Session], tmp_path: Path,
) -> None:
    # Adapted self-supervised on every patient's images: nobody excluded, and said so.
    _derive(model_dir, "dino-adapted", base="tiny-dino", method="dino-adaptation",
            unlabelled=tuple(study), perturb=0.2)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, [
        "evaluate", "--folds", "3", "--repeats", "1", "--fractions", "1.0", "--bootstrap", "50",
        "--epochs", "5", "--no-ablation", "--model-dir", str(model_dir),
        "--segmenter-model", "tiny-seggpt", "--embedder-model", "tiny-dino",
        "--embedder-model", "dino-adapted", "--embedder-model", "tiny-dino", "-o", str(out),
    ])
    assert result.exit_code == 0, result.stderr
    assert "models compared" in result.stderr and "model difference" in result.stderr
    assert "adapted on unlabelled images" in result.stderr
    report = EvaluationReport.from_dict(json.loads(out.read_text()))

    leakage = report.leakage
    assert leakage is not None and leakage.excluded == ()
    assert leakage.adapted_on_unlabelled == ("dino-adapted",)
    assert leakage.scored_patients == 8 == report.results["seggpt"]["head"].pooled.predictions / 6

    comparison = report.model_comparison
    assert comparison is not None and comparison.segmenter == "seggpt"
    assert [c.models.embedder.name for c in comparison.configurations] == [
        "tiny-dino", "dino-adapted", "tiny-dino"]
    first, adapted, again = comparison.configurations
    assert adapted.models.embedder.digest != first.models.embedder.digest
    # The first configuration is the report's main one.
    head = report.results["seggpt"]["head"].pooled
    assert first.methods["head"].pooled == head.metrics.weighted_f1
    assert first.methods["head"].pooled_ci95 == head.weighted_f1_ci95
    assert [(d.of, d.minus) for d in comparison.differences] == [(1, 0), (2, 0)]
    moved, same = comparison.differences
    for name in ("head", "logistic"):
        difference = moved.methods[name]
        assert difference.weighted_f1 == pytest.approx(
            adapted.methods[name].pooled - first.methods[name].pooled)
        assert difference.ci95.low <= difference.ci95.high
        # A model against itself: the same predictions, exactly zero on every resample.
        assert same.methods[name].weighted_f1 == 0.0
        assert (same.methods[name].ci95.low, same.methods[name].ci95.high) == (0.0, 0.0)
        assert again.methods[name] == first.methods[name]
    assert moved.methods["logistic"].weighted_f1 != 0.0  # other weights, other features
    # Each embedder picks its own prompts: Dice on the same references, paired too.
    assert report.segmentation is not None and first.dice == report.segmentation.dice
    assert all(c.dice is not None and c.dice.n == 14 for c in comparison.configurations)
    assert moved.dice is not None and same.dice is not None
    assert (same.dice.difference, same.dice.ci95.low, same.dice.ci95.high) == (0.0, 0.0, 0.0)


def test_a_comparison_scores_only_patients_no_compared_model_trained(
    study: list[PatientRef], model_dir: Path, factory: sessionmaker[Session],
) -> None:
    _derive(model_dir, "seggpt-tuned", base="tiny-seggpt", method="seggpt-tuning",
            supervised=(study[0],))
    result = run_evaluation(factory, config=_config(model_dir),
                            compare=[_config(model_dir, segmenter="seggpt-tuned")],
                            settings=SETTINGS)
    report = result.report
    assert {row["patient"] for row in result.predictions} == {r.subject for r in study[1:]}
    assert report.leakage is not None
    assert [e.subject for e in report.leakage.excluded] == [study[0].subject]
    comparison = report.model_comparison
    assert comparison is not None
    assert [c.models.segmenter.name for c in comparison.configurations  # type: ignore[union-attr]
            ] == ["tiny-seggpt", "seggpt-tuned"]
    # The tuned copy has the base's weights: the same masks, on the references of 7 patients.
    difference = comparison.differences[0].dice
    assert difference is not None and difference.difference == pytest.approx(0.0, abs=1e-9)
    assert report.segmentation is not None
    assert comparison.configurations[1].dice == report.segmentation.dice
    with pytest.raises(UsageError, match="--segmenter none uses no segmenter"):
        run_evaluation(factory, config=_config(model_dir),
                       compare=[_config(model_dir, segmenter="seggpt-tuned")],
                       settings=EvaluationSettings(folds=3, segmenter="none"))


def test_scored_splits_keep_the_excluded_in_every_training_fold() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(10), 4)
    data = LabelledImages(image_ids=np.arange(40), labels=rng.integers(0, 4, 40),
                          patient_ids=groups, study_ids=np.zeros(40, dtype=np.int64),
                          patient_codes={})
    plain = grouped_splits(data.labels, groups, folds=3, repeats=2, seed=0)
    same = scored_splits(data, frozenset(), folds=3, repeats=2, seed=0)
    assert all(np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
               for a, b in zip(plain, same, strict=True))  # nobody excluded: today's folds
    excluded = frozenset({0, 7})
    splits = scored_splits(data, excluded, folds=3, repeats=2, seed=0)
    out = np.flatnonzero(np.isin(groups, sorted(excluded)))
    for split in splits:
        assert not set(groups[split.test]) & excluded
        assert set(out) <= set(split.train)
        assert not set(groups[split.train]) - excluded & set(groups[split.test])
    for repeat in range(2):  # every other image tested once per repeat
        tested = np.concatenate([s.test for s in splits if s.repeat == repeat])
        assert sorted(tested) == sorted(set(range(40)) - set(out))
    with pytest.raises(UsageError, match=r"only 2 labelled patient\(s\) left"):
        check_scorable(data, frozenset(range(8)), folds=3, models=["seggpt-tuned"])
    check_scorable(data, excluded, folds=3, models=["seggpt-tuned"])


def test_one_kind_of_model_compared_at_a_time() -> None:
    result = CliRunner().invoke(app, [
        "evaluate", "--embedder-model", "tiny-dino", "--embedder-model", "dino-study",
        "--segmenter-model", "tiny-seggpt", "--segmenter-model", "seggpt-study",
    ])
    assert result.exit_code != 0
    assert "one kind at a time" in result.stderr


def test_a_patient_with_masks_but_no_label_is_excluded_from_the_dice(
    study: list[PatientRef], factory: sessionmaker[Session],
) -> None:
    """The rule itself: a supervised patient counts when they have labelled images *or*
    references here; one the catalogue does not hold is only counted."""
    with factory() as session:
        data, refs = labelled_images(session), references(session)
        codes = {int(pid): str(code) for pid, code in session.execute(
            select(Patient.id, Patient.subject_code))}
        # A patient with references, their labels taken away (as if never labelled).
        masked = int(refs.patient_ids[0])
        keep = data.patient_ids != masked
        unlabelled = replace(data, image_ids=data.image_ids[keep], labels=data.labels[keep],
                             patient_ids=data.patient_ids[keep], study_ids=data.study_ids[keep])
        ref = next(r for r in study if r.subject == codes[masked])
        identity = DerivedIdentity(
            name="seggpt-tuned", kind="segmenter", base="tiny-seggpt", base_digest="0",
            method="seggpt-tuning", settings={}, seed=0, images=(),
            supervised=(ref, study[1], PatientRef("another-study", "P01")))
        found = exclusion(session, [UsedModel("segmenter", "seggpt-tuned", identity),
                                    UsedModel("embedder", "tiny-dino")], unlabelled, refs)
    assert masked in found.patient_ids and len(found.patient_ids) == 2
    report = found.report
    assert report is not None and report.not_evaluated == 1
    first = next(e for e in report.excluded if e.subject == ref.subject)
    assert first.labelled_images == 0
    assert first.references == int((refs.patient_ids == masked).sum()) > 0
    assert report.scored_patients == 6  # 7 labelled patients, one of them excluded
