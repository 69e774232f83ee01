"""`eczema-batch run` in process with tiny models of the real classes, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Embedding, Head, Image, Mask, Model, Prediction, Visit
from eczema_batch.cli import app
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.imaging import decode_mask_png
from eczema_batch.ingest.service import ingest_study
from eczema_batch.pipeline.classify import SeverityHead, head_to_bytes
from eczema_batch.synth import write_synthetic_study
from tests._model_fixtures import tiny_model_dir  # noqa: F401

runner = CliRunner()


@pytest.fixture
def study(tmp_path: Path, factory: sessionmaker[Session]) -> Path:
    root = tmp_path / "study"
    write_synthetic_study(root, patients=4, visits=2, seed=3, size=(64, 48),
                          reference_fraction=0.4)
    report = ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    assert report.exit_code == 0
    return root


def run_cli(model_dir: Path, *extra: str) -> tuple[int, dict[str, object]]:
    result = runner.invoke(app, [
        "run", "--model-dir", str(model_dir), "--segmenter-model", "tiny-seggpt",
        "--embedder-model", "tiny-dino", "--device", "cpu", "--json", *extra,
    ])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, json.loads(result.stdout)


def count(session: Session, model: type, *where: object) -> int:
    return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def test_run_measures_every_image_and_records_prompts(
    study: Path, factory: sessionmaker[Session], tiny_model_dir: Path  # noqa: F811
) -> None:
    code, payload = run_cli(tiny_model_dir)
    assert code == 0, payload
    with factory() as session:
        n = count(session, Image)
        assert count(session, Embedding, Embedding.region == "full") == n
        assert count(session, Embedding, Embedding.region == "crop") == n
        predicted = session.scalars(select(Mask).where(Mask.kind == "predicted")).all()
        assert len(predicted) == n
        patient_of = dict(session.execute(select(Image.id, Visit.patient_id).join(Visit)).all())
        references = set(session.scalars(select(Mask.image_id).where(Mask.kind == "manual")))
        for mask in predicted:
            assert mask.image_id not in mask.prompt_ids, "an image never prompts itself"
            assert set(mask.prompt_ids) <= references
            assert len(mask.prompt_ids) == 2 and len(mask.prompt_similarities) == 2
            assert mask.prompt_similarities[0] >= mask.prompt_similarities[1]
            image = session.get_one(Image, mask.image_id)
            assert decode_mask_png(mask.png).shape == (image.height, image.width)
        assert patient_of  # (same-patient prompts are allowed in `run`; evaluation excludes them)
        names = set(session.scalars(select(Model.name)))
        assert names == {"tiny-seggpt", "tiny-dino"}
    # Nothing new the second time.
    code, payload = run_cli(tiny_model_dir)
    assert code == 0 and payload["jobs"] == 0


def test_changing_the_segmenter_redoes_only_what_depends_on_it(
    study: Path, factory: sessionmaker[Session], tiny_model_dir: Path  # noqa: F811
) -> None:
    run_cli(tiny_model_dir)
    with factory() as session:
        full_before = {e.image_id: e.vector for e in session.scalars(
            select(Embedding).where(Embedding.region == "full"))}
    code, payload = run_cli(tiny_model_dir, "--segmenter", "none")
    assert code == 0
    assert payload["images"] == {"embed": 0, "measure": len(full_before)}
    with factory() as session:
        full_after = {e.image_id: e.vector for e in session.scalars(
            select(Embedding).where(Embedding.region == "full"))}
        assert full_after == full_before
        variants = set(session.scalars(select(Embedding.variant).where(
            Embedding.region == "crop")))
        assert "none" in variants and any(v.startswith("seggpt:") for v in variants)


def test_a_missing_file_fails_alone(
    study: Path, factory: sessionmaker[Session], tiny_model_dir: Path  # noqa: F811
) -> None:
    with factory() as session:
        victim = session.scalars(
            select(Image).where(~Image.id.in_(select(Mask.image_id))).order_by(Image.id)
        ).first()
        assert victim is not None
        (study / victim.path).unlink()
        total = count(session, Image)
    code, payload = run_cli(tiny_model_dir)
    assert code == 3
    failed = payload["failed_images"]
    assert list(failed) == [str(victim.id)]
    assert "gone" in failed[str(victim.id)]  # type: ignore[index]
    with factory() as session:
        assert count(session, Embedding, Embedding.region == "crop") == total - 1
        assert session.get_one(Image, victim.id).decode_status != "ok"


def test_an_active_head_predicts_every_image(
    study: Path, factory: sessionmaker[Session], tiny_model_dir: Path  # noqa: F811
) -> None:
    run_cli(tiny_model_dir)
    with factory() as session:
        embedder = session.scalars(select(Model).where(Model.name == "tiny-dino")).one()
        segmenter = session.scalars(select(Model).where(Model.name == "tiny-seggpt")).one()
        dim = session.scalars(select(Embedding.dim)).first()
        assert dim is not None
        torch.manual_seed(0)
        weights = head_to_bytes(SeverityHead(dim, 4))
        session.add(Head(name="test", classes=["clear", "mild", "moderate", "severe"],
                         embedder_model_id=embedder.id, segmenter_model_id=segmenter.id,
                         segmenter_mode="seggpt", weights=weights.data, digest=weights.digest,
                         active=True))
        session.commit()
    code, payload = run_cli(tiny_model_dir)
    assert code == 0
    assert payload["images"]["embed"] == 0
    with factory() as session:
        predictions = session.scalars(select(Prediction)).all()
        assert len(predictions) == count(session, Image)
        for p in predictions:
            assert np.isclose(sum(p.probabilities), 1.0, atol=1e-5)
            assert p.severity == int(np.argmax(p.probabilities))
            assert p.embedding_id is not None


def test_a_killed_run_resumes_its_jobs_without_duplicates(
    study: Path, db_url: str, factory: sessionmaker[Session], tiny_model_dir: Path  # noqa: F811
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from eczema_batch.catalogue.models import Job

    env = {**os.environ, "ECZEMA_BATCH_DATABASE_URL": db_url, "ECZEMA_BATCH_CHUNK_SIZE": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "eczema_batch", "run", "--model-dir", str(tiny_model_dir),
         "--segmenter-model", "tiny-seggpt", "--embedder-model", "tiny-dino", "--device", "cpu"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with factory() as session:
            if count(session, Job, Job.stage == "measure", Job.state == "done") >= 1:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with factory() as session:
        unfinished = count(session, Job, Job.state.in_(("pending", "running")))
        jobs_before = count(session, Job)
        left = sum(len(ids) for ids in session.scalars(select(Job.image_ids).where(
            Job.stage == "measure", Job.state.in_(("pending", "running")))))
    assert unfinished > 0, "the run was to be killed while jobs were left"
    # Said in words, as a user reads it: the images of the jobs it took over count as measured.
    result = runner.invoke(app, [
        "run", "--model-dir", str(tiny_model_dir), "--segmenter-model", "tiny-seggpt",
        "--embedder-model", "tiny-dino", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.stderr
    assert f": {left} images measured, " in result.stderr
    with factory() as session:
        # Every unfinished job was taken over: none was planned again.
        assert count(session, Job) == jobs_before
        n = count(session, Image)
        assert count(session, Embedding, Embedding.region == "crop") == n
        assert count(session, Embedding, Embedding.region == "full") == n
        assert count(session, Mask, Mask.kind == "predicted") == n
        assert count(session, Job, Job.state.in_(("pending", "running"))) == 0


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", "cuda"])
def test_a_wrong_or_missing_device_is_refused_before_any_job(
    study: Path, factory: sessionmaker[Session], tiny_model_dir: Path,  # noqa: F811
    device: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from eczema_batch.catalogue.models import Job, Run

    if device == "cuda":  # asked for a GPU this machine does not have
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, [
        "run", "--model-dir", str(tiny_model_dir), "--segmenter-model", "tiny-seggpt",
        "--embedder-model", "tiny-dino", "--device", device,
    ])
    assert result.exit_code == 2, result.stderr
    assert f"device {device!r}" in result.stderr
    if device == "gpu":
        assert "a GPU is `cuda`" in result.stderr
    with factory() as session:
        assert count(session, Job) == 0 and count(session, Run) == 0
    # The same rule for the setting.
    monkeypatch.setenv("ECZEMA_BATCH_DEVICE", "gpu")
    from eczema_batch.config import get_settings

    get_settings.cache_clear()
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 2 and "device 'gpu'" in result.stderr
    get_settings.cache_clear()


def test_a_new_reference_re_segments_only_images_whose_prompts_change(
    study: Path, factory: sessionmaker[Session], tiny_model_dir: Path  # noqa: F811
) -> None:
    # The README's rule: an image whose K nearest references change gets a new mask (and crop and
    # prediction) on the next run; the others keep theirs; older masks stay under their keys.
    run_cli(tiny_model_dir)
    with factory() as session, session.begin():
        before = {m.image_id: (m.id, tuple(sorted(m.prompt_ids))) for m in session.scalars(
            select(Mask).where(Mask.kind == "predicted"))}
        refs = set(session.scalars(select(Mask.image_id).where(Mask.kind == "manual")))
        # A reviewer draws a manual mask on an image that had none: a new reference.
        newcomer = min(set(before) - refs)
        png = session.scalar(select(Mask.png).where(Mask.image_id == newcomer))
        image = session.get_one(Image, newcomer)
        session.add(Mask(image_id=newcomer, kind="manual", variant="", png=png,
                         width=image.width, height=image.height, area_fraction=0.1))
        full = {e.image_id: np.frombuffer(e.vector, "<f4") for e in session.scalars(
            select(Embedding).where(Embedding.region == "full"))}
    pool = sorted(refs | {newcomer})
    expected = {}
    for iid in before:
        candidates = [r for r in pool if r != iid]
        sims = {r: float(full[iid] @ full[r] / np.linalg.norm(full[iid]) / np.linalg.norm(
            full[r])) for r in candidates}
        expected[iid] = tuple(sorted(sorted(candidates, key=lambda r: (-sims[r], r))[:2]))
    changed = {i for i in before if expected[i] != before[i][1]}
    assert changed, "the new reference should be nearest to some image"
    code, payload = run_cli(tiny_model_dir)
    assert code == 0
    assert payload["images"]["measure"] == len(changed)
    with factory() as session:
        masks = session.scalars(select(Mask).where(Mask.kind == "predicted")).all()
        assert len(masks) == len(before) + len(changed)  # the older masks stay
        for iid in before:
            crop = session.scalars(select(Embedding).join(Mask, Mask.id == Embedding.mask_id)
                                   .where(Embedding.image_id == iid, Embedding.region == "crop")
                                   .order_by(Embedding.id.desc())).first()
            assert crop is not None
            mask = session.get_one(Mask, crop.mask_id)
            assert tuple(sorted(mask.prompt_ids)) == expected[iid]
            if iid not in changed:
                assert mask.id == before[iid][0]
    code, payload = run_cli(tiny_model_dir)
    assert payload["jobs"] == 0
