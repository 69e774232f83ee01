"""Derived models (adapted, tuned) are found by name in the model folder and load like any other."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from eczema_batch.errors import UsageError
from eczema_batch.pipeline.derived import (
    IDENTITY_FILE,
    DerivedIdentity,
    PatientRef,
    list_derived,
    publish,
    read_identity,
)
from eczema_batch.pipeline.loading import load_embedder, weights_digest
from eczema_batch.pipeline.registry import get_spec
from tests._model_fixtures import tiny_model_dir  # noqa: F401


def _identity(name: str, base_digest: str) -> DerivedIdentity:
    return DerivedIdentity(
        name=name, kind="embedder", base="tiny-dino", base_digest=base_digest,
        method="dino-adaptation", settings={"epochs": 1}, seed=3, images=(4, 5),
        unlabelled=(PatientRef("study", "P01"),), holdout=(PatientRef("study", "P02"),),
        loss_curve=(2.5, 2.0), created_at="2026-11-26T00:00:00+00:00",
    )


def _copy_weights(source: Path) -> object:
    return lambda folder: [shutil.copy2(p, folder / p.name) for p in source.iterdir()]


def test_a_published_model_loads_by_name_and_records_its_base(
    tiny_model_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    base = tiny_model_dir / "tiny-dino"
    identity = _identity("dino-mine", weights_digest(base))
    folder = publish(tmp_path, "dino-mine", _copy_weights(base), identity)  # type: ignore[arg-type]

    assert read_identity(folder) == identity
    assert [d.name for d in list_derived(tmp_path)] == ["dino-mine"]
    spec = get_spec("dino-mine", model_dir=tmp_path)
    assert (spec.kind, spec.family, spec.hub_id) == ("embedder", "hf-vit", None)
    embedder = load_embedder("dino-mine", model_dir=tmp_path, device="cpu")
    assert embedder.identity.name == "dino-mine"
    assert embedder.identity.config["derived_from"]["base"] == "tiny-dino"
    with pytest.raises(UsageError, match="unknown model 'dino-mine'"):
        get_spec("dino-mine")  # a derived model is only found in its folder


def test_a_failed_write_leaves_no_model_and_an_existing_one_is_kept(
    tiny_model_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    base = tiny_model_dir / "tiny-dino"
    identity = _identity("dino-mine", weights_digest(base))

    def half_then_fail(folder: Path) -> None:
        shutil.copy2(base / "config.json", folder / "config.json")
        raise KeyboardInterrupt  # killed while writing the weights

    with pytest.raises(KeyboardInterrupt):
        publish(tmp_path, "dino-mine", half_then_fail, identity)
    assert list(tmp_path.iterdir()) == []
    publish(tmp_path, "dino-mine", _copy_weights(base), identity)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="already exists"):
        publish(tmp_path, "dino-mine", _copy_weights(base), identity)  # type: ignore[arg-type]
    assert (tmp_path / "dino-mine" / IDENTITY_FILE).is_file()
    with pytest.raises(UsageError, match="model name"):
        publish(tmp_path, "../escape", _copy_weights(base), identity)  # type: ignore[arg-type]
