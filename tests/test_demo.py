"""`eczema-batch demo`: the whole path on tiny models, said loudly, and safe to run twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select
from typer.testing import CliRunner

from eczema_batch.catalogue.db import dispose_engines
from eczema_batch.catalogue.models import Head, Prediction
from eczema_batch.cli import app
from eczema_batch.config import get_settings


@pytest.mark.slow
def test_demo_with_tiny_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No real weights anywhere: the demo must fall back to tiny models and say why.
    monkeypatch.setenv("ECZEMA_BATCH_MODEL_DIR", str(tmp_path / "no-models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.setenv("ECZEMA_BATCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ECZEMA_BATCH_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    folder = tmp_path / "demo"
    try:
        first = CliRunner().invoke(app, ["demo", str(folder)])
        assert first.exit_code == 0, first.stderr
        err = first.stderr
        # tiny models, trained on the demo study first, and the banner says what that shows
        assert "TINY MODELS TRAINED ON THE DEMO STUDY" in err
        assert "they say nothing about eczema on real photographs" in err
        assert "seggpt-vit-large" in err  # why tiny: its weights were not found
        for name in ("demo-dino", "demo-seggpt"):
            assert (folder / "models" / name / "eczema-batch-model.json").is_file()
        assert "in-sample" in err and "cohort: 8 patients" in err
        assert (folder / "report" / "index.html").is_file()
        assert len(list((folder / "report" / "patients").glob("*.html"))) == 8
        # Tiny random-weight models say so on every page, not only in the terminal.
        for page in [folder / "report" / "index.html",
                     *(folder / "report" / "patients").glob("*.html")]:
            assert 'id="tiny-models"' in page.read_text(encoding="utf-8"), page.name
        engine = create_engine(f"sqlite:///{folder / 'catalogue.sqlite3'}")
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(Prediction)) == 48
            assert conn.scalar(select(func.count()).select_from(Head)) == 1
        second = CliRunner().invoke(app, ["demo", str(folder), "--json"])
        assert second.exit_code == 0, second.stderr
        assert "already written: reusing it" in second.stderr
        assert "already adapted: reusing it" in second.stderr
        assert "already tuned: reusing it" in second.stderr
        payload = json.loads(second.stdout)
        assert payload["models"] == "tiny" and payload["report"]["summary"]["patients"] == 8
        assert payload["embedder"] == "demo-dino" and payload["segmenter"] == "demo-seggpt"
        # trained models measure: the synthetic patients do not all come out stable
        by_status = payload["report"]["summary"]["by_status"]
        assert by_status.get("improving", 0) + by_status.get("worsening", 0) > 0, by_status
        with engine.connect() as conn:  # nothing trained or predicted twice
            assert conn.scalar(select(func.count()).select_from(Head)) == 1
            assert conn.scalar(select(func.count()).select_from(Prediction)) == 48
        engine.dispose()
    finally:
        dispose_engines()
        get_settings.cache_clear()
