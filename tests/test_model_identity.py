"""A model identity says how the model ran: bf16 and fp32 results are told apart (revision 0004)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.db import (
    alembic_config,
    dispose_engines,
    get_engine,
    migration_connection,
    open_catalogue,
)
from eczema_batch.catalogue.models import (
    UNRECORDED_PRECISION,
    Embedding,
    Head,
    Mask,
    Model,
    Prediction,
    Run,
)
from eczema_batch.cli import app
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS, get_settings
from eczema_batch.errors import UsageError
from eczema_batch.ingest.service import ingest_study
from eczema_batch.measuring.config import RunConfig
from eczema_batch.measuring.runtime import run_precision
from eczema_batch.pipeline.records import MaskKey
from eczema_batch.synth import write_synthetic_study
from tests._model_fixtures import tiny_model_dir  # noqa: F401
from tests.report_factories import (
    make_head,
    make_image,
    make_patient,
    make_prediction,
    make_study,
    make_visit,
)

runner = CliRunner()
MODELS = ("--segmenter-model", "tiny-seggpt", "--embedder-model", "tiny-dino")


def _config(precision: str = "auto", device: str = "cpu") -> RunConfig:
    return RunConfig(segmenter_model="tiny-seggpt", embedder_model="tiny-dino",
                     precision=precision, device=device)


def test_auto_precision_is_settled_where_the_run_is_planned() -> None:
    assert run_precision(_config()) == "fp32"  # this process, on the CPU
    assert run_precision(_config(), queue="local") == "fp32"
    assert run_precision(_config(), queue="gpu") == "bf16"
    assert run_precision(_config(), queue="cpu") == "fp32"
    assert run_precision(_config(), queue="site-b") == "fp32"
    assert run_precision(_config("fp16"), queue="cpu") == "fp16"  # asked for: kept
    with pytest.raises(UsageError, match="precision 'fp8'"):
        run_precision(_config("fp8"))


def _migrate(db_url: str, target: str) -> None:
    engine = get_engine(db_url)
    cfg = alembic_config(db_url)
    with migration_connection(engine) as connection:
        cfg.attributes["connection"] = connection
        (command.downgrade if target != "head" else command.upgrade)(cfg, target)


def test_0004_keeps_models_as_unrecorded_and_refuses_to_merge_precisions(
    db_url: str, factory: sessionmaker[Session]
) -> None:
    with factory() as s, s.begin():
        head_id = make_head(s).id
    _migrate(db_url, "0003")
    _migrate(db_url, "head")
    dispose_engines()
    factory = open_catalogue(db_url)
    with factory() as s, s.begin():
        rows = s.execute(select(Model.name, Model.precision).order_by(Model.name)).all()
        assert rows == [("tiny-dino", UNRECORDED_PRECISION), ("tiny-seggpt", UNRECORDED_PRECISION)]
        head = s.get_one(Head, head_id)
        embedder = s.get_one(Model, head.embedder_model_id)
        # The same weights at a recorded precision are another identity.
        s.add(Model(kind="embedder", name=embedder.name, digest=embedder.digest,
                    precision="bf16", config={}))
    dispose_engines()
    with pytest.raises(RuntimeError, match="several precisions"):
        _migrate(db_url, "0003")


def test_fp32_and_bf16_runs_keep_their_own_results_and_share_the_head(
    tmp_path: Path, db_url: str, factory: sessionmaker[Session],
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    root = tmp_path / "study"
    write_synthetic_study(root, patients=8, visits=4, seed=5, size=(64, 48),
                          reference_fraction=0.5)
    assert ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).exit_code == 0

    def cli(*args: str) -> dict[str, object]:
        get_settings.cache_clear()
        result = runner.invoke(app, [*args, *MODELS, "--model-dir", str(tiny_model_dir),
                                     "--json"])
        assert result.exit_code == 0, result.stderr
        return dict(json.loads(result.stdout))

    cli("run", "--device", "cpu")
    trained = cli("train", "--epochs", "3")
    cli("run", "--device", "cpu")  # the fp32 predictions with the new head
    monkeypatch.setenv("ECZEMA_BATCH_PRECISION", "bf16")
    cli("run", "--device", "cpu")
    with factory() as s:
        precisions = dict(s.execute(select(Model.precision, func.count()).group_by(
            Model.precision)).all())
        assert precisions == {"fp32": 2, "bf16": 2}  # embedder and segmenter, twice
        runs = [r.settings["precision"] for r in s.scalars(select(Run).order_by(Run.id))]
        assert runs == ["fp32", "fp32", "bf16"]
        crops = dict(s.execute(
            select(Model.precision, func.count()).join(Embedding, Embedding.model_id == Model.id)
            .where(Embedding.region == "crop").group_by(Model.precision)).all())
        images = crops["fp32"]
        assert crops == {"fp32": images, "bf16": images}  # nothing overwritten
        # The head trained on fp32 features is the bf16 run's head too (the same weights). A head
        # predicts an image once, from the crop of the latest run: the bf16 run's, and says so.
        heads = [r.settings["targets"]["head_id"] for r in s.scalars(select(Run).order_by(Run.id))]
        assert heads == [None, trained["id"], trained["id"]]
        linked = dict(s.execute(
            select(Model.precision, func.count()).select_from(Prediction)
            .join(Embedding, Embedding.id == Prediction.embedding_id)
            .join(Model, Model.id == Embedding.model_id)
            .where(Prediction.head_id == trained["id"]).group_by(Model.precision)).all())
        assert linked == {"bf16": images}


def test_0005_keys_runs_masks_by_their_prompt_set_and_merges_what_evaluate_had(
    db_url: str, factory: sessionmaker[Session]
) -> None:
    with factory() as s, s.begin():
        study = make_study(s)
        images = [make_image(s, make_visit(s, make_patient(s, study, code), dt.date(2026, 1, 5)))
                  for code in ("P1", "P2")]
        head = make_head(s)
        prediction = make_prediction(s, images[0], head, [0.7, 0.1, 0.1, 0.1])
        other = make_prediction(s, images[1], head, [0.1, 0.7, 0.1, 0.1])
        ids = {"kept": prediction.id, "merged": other.id}
        segmenter = s.get_one(Head, prediction.head_id).segmenter_model_id
        # Both as `run` wrote them before revision 0005 ...
        for p in (prediction, other):
            crop = s.get_one(Embedding, p.embedding_id)
            mask = s.get_one(Mask, crop.mask_id)
            mask.variant = crop.variant = f"seggpt:{segmenter}:k2"
        # ... and, for the second image, the same mask already stored by `evaluate`.
        mask = s.get_one(Mask, s.get_one(Embedding, other.embedding_id).mask_id)
        new_key = MaskKey.seggpt(segmenter, mask.prompt_ids).variant
        evaluated = Mask(image_id=mask.image_id, kind="predicted", variant=new_key,
                         model_id=mask.model_id, prompt_ids=mask.prompt_ids,
                         prompt_similarities=mask.prompt_similarities, width=mask.width,
                         height=mask.height, area_fraction=mask.area_fraction, png=mask.png)
        s.add(evaluated)
        s.flush()
        evaluated_id = evaluated.id
    _migrate(db_url, "0004")
    _migrate(db_url, "head")
    dispose_engines()
    factory = open_catalogue(db_url)
    with factory() as s:
        for name, pid in ids.items():
            p = s.get_one(Prediction, pid)
            crop = s.get_one(Embedding, p.embedding_id)  # still linked
            mask = s.get_one(Mask, crop.mask_id)
            assert crop.variant == mask.variant == MaskKey.seggpt(segmenter,
                                                                  mask.prompt_ids).variant
            if name == "merged":
                assert mask.id == evaluated_id
        assert s.scalar(select(func.count()).select_from(Mask).where(
            Mask.variant.like("%:k%"))) == 0
        assert s.scalar(select(func.count()).select_from(Mask)) == 2
