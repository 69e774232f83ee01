"""Training the severity head: the pure fit; `eczema-batch train` and `heads` on both databases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Event, Head, Prediction
from eczema_batch.cli import app
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.ingest.service import ingest_study
from eczema_batch.pipeline.classify import head_from_bytes, head_to_bytes, predict_proba
from eczema_batch.pipeline.train import (
    TooFewLabelsError,
    TrainSettings,
    check_class_counts,
    class_weight_vector,
    fit_head,
    state_digest,
)
from eczema_batch.synth import write_synthetic_study
from eczema_batch.training.data import labelled_images
from tests._model_fixtures import (
    one_torch_thread,  # noqa: F401
    small_study_fixture,  # noqa: F401
    tiny_model_dir,  # noqa: F401
)

runner = CliRunner()
MODELS = ("--segmenter-model", "tiny-seggpt", "--embedder-model", "tiny-dino")


def _blobs(n: int = 120, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four separable classes in `dim` dimensions."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    centres = rng.normal(0, 1, (4, dim))
    return (centres[labels] + rng.normal(0, 0.3, (n, dim))).astype(np.float32), labels


# --- pure ---------------------------------------------------------------------------------------


def test_same_seed_trains_the_same_head_and_leaves_the_caller_alone() -> None:
    x, y = _blobs()
    settings = TrainSettings(epochs=5, lr=1e-3, seed=7)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = fit_head(x, y, n_classes=4, settings=settings)
    after = torch.rand(1)
    second = fit_head(x, y, n_classes=4, settings=settings)
    assert torch.equal(before, after), "training must not consume the caller's random stream"
    assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()
    assert first.losses == second.losses
    for (name, a), (_, b) in zip(first.head.state_dict().items(),
                                 second.head.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = fit_head(x, y, n_classes=4, settings=TrainSettings(epochs=5, lr=1e-3, seed=8))
    assert not torch.equal(other.head.net[0].weight, first.head.net[0].weight)


def test_head_learns_separable_classes_with_the_paper_defaults() -> None:
    x, y = _blobs(n=400)
    fit = fit_head(x, y, n_classes=4)  # 768->128->4 shape aside: Adam 1e-4, 50 epochs, dropout
    accuracy = (predict_proba(fit.head, x).argmax(1) == y).mean()
    assert fit.losses[-1] < fit.losses[0] and accuracy > 0.9


def test_saved_and_loaded_head_predicts_the_same_probabilities() -> None:
    x, y = _blobs()
    head = fit_head(x, y, n_classes=4, settings=TrainSettings(epochs=3, hidden=24)).head
    loaded = head_from_bytes(head_to_bytes(head).data)
    assert loaded.hidden == 24 and not loaded.training
    np.testing.assert_array_equal(predict_proba(head, x), predict_proba(loaded, x))
    assert state_digest(loaded) == state_digest(head)


def test_balanced_class_weights_are_sklearns() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 3])
    weights = class_weight_vector(labels, 4, "balanced")
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=labels)
    np.testing.assert_allclose(weights[[0, 1, 3]], expected)
    assert weights[2] == 1.0  # absent: never in the loss
    assert class_weight_vector(labels, 4, "none").tolist() == [1.0] * 4


def test_too_few_labels_names_every_count() -> None:
    with pytest.raises(TooFewLabelsError) as caught:
        check_class_counts([0] * 9 + [1] * 6 + [2] * 2, ("clear", "mild", "moderate", "severe"))
    message = str(caught.value)
    assert "clear 9, mild 6, moderate 2, severe 0" in message and "at least 5" in message


# --- catalogue + CLI ----------------------------------------------------------------------------


@pytest.fixture
def study(small_study: Path) -> Path:
    return small_study


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    # rich wraps long messages at the terminal width: compare words, not line breaks.
    return result.exit_code, result.stdout, " ".join(result.stderr.split())


def test_train_then_run_predicts_with_the_active_head(
    study: Path, factory: sessionmaker[Session], tiny_model_dir: Path  # noqa: F811
) -> None:
    model_dir = ("--model-dir", str(tiny_model_dir))
    code, out, err = cli("train", "--segmenter", "none", *MODELS, *model_dir)
    assert code == 2 and "eczema-batch run --segmenter none" in err, err

    code, out, err = cli("run", "--segmenter", "none", *MODELS, *model_dir, "--device", "cpu",
                         "--json")
    assert code == 0, err
    code, out, err = cli("train", "--segmenter", "none", "--epochs", "5", "--seed", "3",
                         *MODELS, *model_dir, "--json")
    assert code == 0, err
    trained = json.loads(out)
    assert trained["active"] and trained["class_counts"] == [22, 12, 8, 6]
    with factory() as session:
        head = session.get_one(Head, trained["id"])
        data = labelled_images(session)
        assert head.training_image_ids == data.image_ids.tolist()
        assert head.segmenter_mode == "none" and head.segmenter_model_id is None
        assert head.settings["seed"] == 3 and head.settings["epochs"] == 5
        assert head.classes == ["clear", "mild", "moderate", "severe"]
        assert session.scalar(select(Event.id).where(Event.kind == "head.trained"))

    # `run` now predicts with it, and its stored probabilities are the loaded head's.
    code, out, err = cli("run", "--segmenter", "none", *MODELS, *model_dir, "--device", "cpu",
                         "--json")
    assert code == 0 and json.loads(out)["head"] == trained["id"], err
    with factory() as session:
        rows = session.execute(select(Prediction.image_id, Prediction.probabilities)
                               .where(Prediction.head_id == trained["id"])
                               .order_by(Prediction.image_id)).all()
        assert [r[0] for r in rows] == data.image_ids.tolist()
        from eczema_batch.catalogue import measurements

        vectors = measurements.vectors(session, data.image_ids.tolist(),
                                 model_id=head.embedder_model_id, region="crop", variant="none")
    loaded = head_from_bytes(head.weights)
    expected = predict_proba(loaded, np.stack([vectors[i] for i in data.image_ids.tolist()]))
    np.testing.assert_allclose(np.array([r[1] for r in rows]), expected, rtol=1e-6, atol=1e-7)

    # The same command and seed train the same weights; --no-activate keeps the active head.
    code, out, _ = cli("train", "--segmenter", "none", "--epochs", "5", "--seed", "3",
                       "--no-activate", *MODELS, *model_dir, "--json")
    second = json.loads(out)
    assert code == 0 and not second["active"] and second["digest"] == trained["digest"]
    code, out, _ = cli("heads", "list", "--json")
    listed = {h["id"]: h["active"] for h in json.loads(out)}
    assert listed == {trained["id"]: True, second["id"]: False}
    code, out, _ = cli("heads", "use", str(second["id"]), "--json")
    assert code == 0 and json.loads(out)["replaced"] == [trained["id"]]
    code, out, _ = cli("heads", "list", "--json")
    assert {h["id"]: h["active"] for h in json.loads(out)} == {trained["id"]: False,
                                                               second["id"]: True}
    code, _, err = cli("heads", "use", "999")
    assert code == 2 and "heads list" in err


def test_train_with_too_few_labels_names_the_counts(
    tmp_path: Path, factory: sessionmaker[Session], tiny_model_dir: Path  # noqa: F811
) -> None:
    root = tmp_path / "small"
    write_synthetic_study(root, patients=2, visits=2, seed=0, size=(64, 48))
    ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    code, _, err = cli("train", "--segmenter", "none", *MODELS, "--model-dir",
                       str(tiny_model_dir))
    assert code == 2
    assert "too few labelled images per class" in err and "clear" in err and "severe" in err


def test_the_default_schedule_suits_the_embedder(tmp_path: Path) -> None:
    """Tiny embedders (and models derived from them) train 300 epochs at 1e-2 unless told;
    real ones keep the paper's 50 at 1e-4; given values always win."""
    import json as _json

    from eczema_batch.cli.training import _train_settings
    from eczema_batch.measuring.config import RunConfig
    from eczema_batch.pipeline.derived import IDENTITY_FILE

    def settings(embedder: str, epochs: int | None = None, lr: float | None = None
                 ) -> TrainSettings:
        config = RunConfig(segmenter_model="tiny-seggpt", embedder_model=embedder,
                           model_dir=str(tmp_path))
        return _train_settings(config, epochs, lr, 128, 0.3, 0, "balanced", 32)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / IDENTITY_FILE).write_text(_json.dumps({
        "version": 1, "name": "mine", "kind": "embedder", "base": "tiny-dino",
        "base_digest": "0" * 64, "method": "dino-adaptation"}))
    assert (settings("tiny-dino").epochs, settings("tiny-dino").lr) == (300, 1e-2)
    assert (settings("mine").epochs, settings("mine").lr) == (300, 1e-2)
    assert (settings("dino-vitb16").epochs, settings("dino-vitb16").lr) == (50, 1e-4)
    assert (settings("tiny-dino", 7, 1e-3).epochs, settings("tiny-dino", 7, 1e-3).lr) == (7, 1e-3)
