"""`evaluate --robustness`: the perturbations on hand-built images, the held-out sample, and the
pass end to end with tiny models on SQLite and PostgreSQL (zero strength changes nothing, the
catalogue is untouched, the report section through the CLI)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Embedding, Mask
from eczema_batch.cli import app
from eczema_batch.measuring.config import RunConfig
from eczema_batch.pipeline.evaluate import Split
from eczema_batch.pipeline.perturb import (
    DEFAULT_PERTURBATIONS,
    KINDS,
    Perturbation,
    PerturbedPixels,
    image_rng,
)
from eczema_batch.pipeline.train import TrainSettings
from eczema_batch.training import evaluate as evaluate_module
from eczema_batch.training.evaluate import EvaluationSettings, run_evaluation
from eczema_batch.training.report import summary_tables
from eczema_batch.training.results import EvaluationReport
from eczema_batch.training.robustness import sample_held_out
from tests._model_fixtures import (
    one_torch_thread,  # noqa: F401
    small_study_fixture,  # noqa: F401
    tiny_model_dir_fixture,  # noqa: F401
)


def _textured(seed: int = 0, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """Mid-range values (no clipping at x1.4) with fine detail: a checkerboard plus noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(size)
    board = ((rows + cols) % 2 * 60 + 60).astype(np.float64)
    image = board[..., None] + rng.uniform(0, 40, (*size, 3))
    image[..., 0] += 20  # a skin-like cast: red above blue
    return image.round().astype(np.uint8)


def _high_frequency(image: np.ndarray) -> float:
    grey = image.astype(np.float64).mean(axis=2)
    return float((np.diff(grey, axis=0) ** 2).mean() + (np.diff(grey, axis=1) ** 2).mean())


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --- the perturbations --------------------------------------------------------------------------


def test_blur_lowers_high_frequency_energy_more_as_sigma_grows() -> None:
    image = _textured()
    energies = [_high_frequency(Perturbation("blur", s).apply(image, _rng()))
                for s in (0.0, 0.005, 0.01, 0.02)]
    assert energies[0] == _high_frequency(image)
    assert energies[0] > energies[1] > energies[2] > energies[3]
    assert energies[3] < 0.2 * energies[0]


@pytest.mark.parametrize("gain", [0.6, 1.4])
def test_brightness_scales_the_mean(gain: float) -> None:
    image = _textured()
    out = Perturbation("brightness", gain).apply(image, _rng())
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert out.mean() == pytest.approx(gain * image.mean(), abs=0.5)


def test_noise_has_its_sigma_and_is_seeded() -> None:
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    noise = Perturbation("noise", 15.0)
    out = noise.apply(image, image_rng(0, 7, noise))
    assert (out.astype(np.float64) - 128).std() == pytest.approx(15.0, rel=0.05)
    assert np.array_equal(out, noise.apply(image, image_rng(0, 7, noise)))
    assert not np.array_equal(out, noise.apply(image, image_rng(1, 7, noise)))
    assert not np.array_equal(out, noise.apply(image, image_rng(0, 8, noise)))


def test_jpeg_recompression_changes_pixels_more_at_lower_quality() -> None:
    image = _textured()
    errors = [np.abs(Perturbation("jpeg", q).apply(image, _rng()).astype(np.int64)
                     - image).mean() for q in (50, 20, 10)]
    assert 0 < errors[0] < errors[1] < errors[2]


def test_white_balance_changes_the_red_to_blue_ratio() -> None:
    image = _textured()

    def ratio(a: np.ndarray) -> float:
        return float(a[..., 0].astype(np.float64).mean() / a[..., 2].astype(np.float64).mean())

    warm = Perturbation("white_balance", 0.2).apply(image, _rng())
    cool = Perturbation("white_balance", -0.2).apply(image, _rng())
    assert ratio(warm) == pytest.approx(ratio(image) * 1.2 / 0.8, rel=0.01)
    assert ratio(cool) == pytest.approx(ratio(image) * 0.8 / 1.2, rel=0.01)
    assert np.array_equal(warm[..., 1], image[..., 1])  # green, the von Kries anchor


def test_zero_strength_is_the_identity_and_inputs_are_left_alone() -> None:
    image = _textured()
    kept = image.copy()
    for p in (Perturbation("blur", 0), Perturbation("brightness", 1.0),
              Perturbation("noise", 0), Perturbation("white_balance", 0)):
        assert p.neutral
        assert np.array_equal(p.apply(image, _rng()), image)
    for p in DEFAULT_PERTURBATIONS:
        assert not p.neutral
        assert not np.array_equal(p.apply(image, image_rng(0, 1, p)), image), p.name
    assert np.array_equal(image, kept)


def test_the_default_set_names_every_kind_at_two_strengths_or_more() -> None:
    names = [p.name for p in DEFAULT_PERTURBATIONS]
    assert len(set(names)) == len(names)
    for kind in KINDS:
        assert sum(p.kind == kind for p in DEFAULT_PERTURBATIONS) >= 2
    assert "jpeg q10" in names and "blur sigma 1% of side" in names
    with pytest.raises(ValueError):
        Perturbation("jpeg", 0)
    with pytest.raises(ValueError):
        Perturbation("contrast", 1.0)  # type: ignore[arg-type]


class _Source:
    """Pixels of two images and one prompt pair, counting what was asked."""

    def __init__(self) -> None:
        self.images = {1: _textured(1), 2: _textured(2)}
        self.pair = object()

    def prefetch(self, image_ids: object) -> None:
        pass

    def get(self, image_id: int) -> np.ndarray:
        return self.images[image_id]

    def pairs(self, reference_ids: list[int], input_size: tuple[int, int]) -> dict[int, object]:
        return dict.fromkeys(reference_ids, self.pair)


def test_perturbed_pixels_change_the_query_not_the_prompts() -> None:
    source = _Source()
    noise = Perturbation("noise", 10.0)
    pixels = PerturbedPixels(source, noise, seed=3)  # type: ignore[arg-type]
    got = pixels.get(1)
    assert not np.array_equal(got, source.images[1])
    assert np.array_equal(got, PerturbedPixels(source, noise, seed=3).get(1))  # type: ignore[arg-type]
    assert pixels.pairs([5], (8, 8))[5] is source.pair
    plain = PerturbedPixels(source, None, seed=3)  # type: ignore[arg-type]
    assert plain.get(2) is source.images[2]


def test_the_sample_spreads_over_patients() -> None:
    patients = np.repeat(np.arange(6), 4)  # 6 patients x 4 images
    splits = [Split(0, f, np.array([], dtype=np.int64), np.flatnonzero(patients % 2 == f))
              for f in range(2)]
    chosen = sample_held_out(splits, patients, 6, seed=0)
    taken = np.concatenate(chosen)
    assert len(taken) == 6 and sorted(set(patients[taken].tolist())) == list(range(6))
    for split, mine in zip(splits, chosen, strict=True):
        assert set(mine.tolist()) <= set(split.test.tolist())
    assert all(np.array_equal(a, b) for a, b in
               zip(chosen, sample_held_out(splits, patients, 6, seed=0), strict=True))
    assert len(np.concatenate(sample_held_out(splits, patients, 100, seed=0))) == 24


# --- end to end ---------------------------------------------------------------------------------


def _stored(factory: sessionmaker[Session]) -> tuple[list[tuple[object, ...]], ...]:
    """Every mask and embedding row, with a digest of its payload."""
    with factory() as session:
        masks = [(i, iid, v, hashlib.sha256(png).hexdigest()) for i, iid, v, png in
                 session.execute(select(Mask.id, Mask.image_id, Mask.variant, Mask.png)
                                 .order_by(Mask.id))]
        vectors = [(i, iid, v, hashlib.sha256(b).hexdigest()) for i, iid, v, b in
                   session.execute(select(Embedding.id, Embedding.image_id, Embedding.variant,
                                          Embedding.vector).order_by(Embedding.id))]
    return masks, vectors


def test_robustness_zero_changes_nothing_and_stores_nothing(
    small_study: Path, factory: sessionmaker[Session], tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    config = RunConfig(segmenter_model="tiny-seggpt", embedder_model="tiny-dino",
                       model_dir=str(tiny_model_dir), device="cpu")
    settings = EvaluationSettings(folds=3, repeats=2, fractions=(1.0,), bootstrap=50,
                                  ablation=False, train=TrainSettings(lr=1e-2, epochs=30))
    plain = run_evaluation(factory, config=config, settings=settings).report
    assert plain.robustness is None and "robustness" not in plain.as_dict()
    assert "robustness_images" not in plain.as_dict()["settings"]
    before = _stored(factory)
    assert before[0] and before[1]

    zero = (Perturbation("blur", 0), Perturbation("brightness", 1.0), Perturbation("noise", 0),
            Perturbation("white_balance", 0))
    strong = (Perturbation("jpeg", 10), Perturbation("brightness", 0.3))
    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "DEFAULT_PERTURBATIONS", zero + strong)
        report = run_evaluation(factory, config=config,
                                settings=replace(settings, robustness_images=20)).report
    robust = report.robustness
    assert robust is not None
    # The cross-validation itself is what it was without the robustness pass.
    assert report.results == plain.results
    assert robust.images == 20 and robust.available == 48 and robust.repeat == 0
    assert robust.patients == 8  # 20 images spread over all 8 patients
    # The unperturbed pass is evaluate's measurement: its head, its prompts, its crop.
    assert robust.baseline_max_difference < 1e-4
    assert robust.forwards.segmenter_queries == 20 * 7  # baseline + 6 perturbations
    for p in robust.perturbations[: len(zero)]:
        assert p.score_change.mean == 0 and p.abs_score_change.mean == 0, p.name
        assert p.class_changed.mean == 0 and p.abs_score_change.ci95.high == 0
        assert p.mask_iou is not None and p.mask_iou.mean == 1.0 and p.mask_iou.n == 20
    for p in robust.perturbations[len(zero):]:
        assert p.abs_score_change.mean > 0, p.name
        assert p.abs_score_change.ci95.low <= p.abs_score_change.mean \
            <= p.abs_score_change.ci95.high
        assert p.mask_iou is not None and p.mask_iou.mean < 1.0
    # Nothing of the perturbed images reached the catalogue.
    assert _stored(factory) == before

    # Through the CLI, with the default perturbations: the section and its table.
    def cli(out: Path) -> str:
        result = CliRunner().invoke(app, [
            "evaluate", "--folds", "3", "--repeats", "1", "--fractions", "1.0", "--bootstrap",
            "50", "--epochs", "30", "--no-ablation", "--model-dir", str(tiny_model_dir),
            "--segmenter-model", "tiny-seggpt", "--embedder-model", "tiny-dino",
            "--robustness", "--robustness-images", "9", "--output", str(out),
        ])
        assert result.exit_code == 0, result.stderr
        return result.stderr

    out, again = tmp_path / "report.json", tmp_path / "again.json"
    stderr = cli(out)
    assert "robustness (seggpt" in stderr and "jpeg q10" in stderr
    document = json.loads(out.read_text())
    cli(again)  # the same seed: the same section, noise draws included
    assert json.loads(again.read_text())["robustness"] == document["robustness"]
    assert document["settings"]["robustness_images"] == 9
    refused = CliRunner().invoke(app, ["evaluate", "--robustness-images", "9"])
    assert refused.exit_code == 2 and "give --robustness too" in refused.stderr
    section = document["robustness"]
    assert section["images"] == 9 and section["segmenter"] == "seggpt"
    assert [p["name"] for p in section["perturbations"]] == [
        p.name for p in DEFAULT_PERTURBATIONS]
    for p in section["perturbations"]:
        assert set(p) == {"kind", "value", "name", "parameter", "score_change",
                          "abs_score_change", "class_changed", "mask_iou"}
        for key in ("score_change", "abs_score_change", "class_changed", "mask_iou"):
            assert set(p[key]) == {"mean", "ci95", "n"} and len(p[key]["ci95"]) == 2
        assert 0 <= p["class_changed"]["mean"] <= 1 and 0 <= p["mask_iou"]["mean"] <= 1
    typed = EvaluationReport.from_dict(document)
    assert typed.robustness is not None and typed.as_dict() == document
    assert any(title.startswith("robustness") for title, _, _ in summary_tables(typed))
    assert _stored(factory) == before
