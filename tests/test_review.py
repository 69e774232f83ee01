"""The review queue: what is flagged and why; a decision is a new label plus an audit event."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Event, Label, Prediction
from eczema_batch.cli import app
from eczema_batch.config import get_settings
from tests.report_factories import (
    make_head,
    make_image,
    make_patient,
    make_prediction,
    make_study,
    make_visit,
)


@pytest.fixture
def images(factory: sessionmaker[Session]) -> dict[str, int]:
    with factory() as s, s.begin():
        head = make_head(s)
        visit = make_visit(s, make_patient(s, make_study(s), "P1"), dt.date(2024, 1, 1))
        ids = {}
        for name, probs, kwargs in (
            ("confident", [0.9, 0.1, 0.0, 0.0], {}),
            ("unsure", [0.3, 0.45, 0.25, 0.0], {}),
            ("empty_mask", [0.0, 0.9, 0.1, 0.0], {"mask_flag": "SegGPT found no lesion"}),
            ("weak_prompts", [0.0, 0.1, 0.9, 0.0], {"similarities": (0.35, 0.25)}),
        ):
            image = make_image(s, visit, body_site=name)
            make_prediction(s, image, head, probs, **kwargs)  # type: ignore[arg-type]
            ids[name] = image.id
        return ids


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_queue_lists_flagged_images_with_reasons(images: dict[str, int]) -> None:
    code, stdout, err = _invoke("review", "list", "--json")
    assert code == 0, err
    items = {i["image_id"]: i for i in json.loads(stdout)["items"]}
    assert set(items) == {images["unsure"], images["empty_mask"], images["weak_prompts"]}
    assert items[images["unsure"]]["reasons"] == ["low confidence: top probability 0.45 < 0.50"]
    assert items[images["empty_mask"]]["reasons"] == ["mask: SegGPT found no lesion"]
    assert items[images["weak_prompts"]]["reasons"] == [
        "weak prompts: mean similarity 0.30 < 0.50"]
    assert items[images["unsure"]]["predicted_class"] == "mild"
    code, _, err = _invoke("review", "list")
    assert code == 0 and "review queue: 3 images" in err


def test_thresholds_come_from_settings(images: dict[str, int],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECZEMA_BATCH_REVIEW_MIN_CONFIDENCE", "0.95")
    monkeypatch.setenv("ECZEMA_BATCH_REVIEW_MIN_PROMPT_SIMILARITY", "0.2")
    get_settings.cache_clear()
    code, stdout, _ = _invoke("review", "list", "--json")
    assert code == 0
    reasons = {i["image_id"]: i["reasons"] for i in json.loads(stdout)["items"]}
    assert len(reasons) == 4
    assert not any("weak prompts" in r for rs in reasons.values() for r in rs)


def test_set_records_a_label_and_an_event_and_overwrites_nothing(
    images: dict[str, int], factory: sessionmaker[Session]
) -> None:
    image = images["unsure"]
    code, stdout, err = _invoke("review", "set", str(image), "--severity", "moderate",
                                "--by", "rater-07", "--note", "crusted", "--json")
    assert code == 0, err
    first = json.loads(stdout)
    assert (first["severity"], first["previous"], first["previous_source"]) == (
        2, 1, "prediction")
    code, stdout, err = _invoke("review", "set", str(image), "--severity", "3", "--by", "rater-08")
    assert code == 0, err
    assert "severe by rater-08 (was 2 from the review)" in err
    with factory() as s:
        labels = s.execute(select(Label.severity, Label.source, Label.rater, Label.note)
                           .where(Label.image_id == image).order_by(Label.id)).all()
        events = s.execute(select(Event.kind, Event.actor, Event.subject_id, Event.detail)
                           .order_by(Event.id)).all()
        prediction = s.scalar(select(Prediction.severity).where(Prediction.image_id == image))
    assert [tuple(r) for r in labels] == [(2, "review", "rater-07", "crusted"),
                                          (3, "review", "rater-08", None)]
    assert [(k, a, i) for k, a, i, _ in events] == [("review.label", "rater-07", image),
                                                    ("review.label", "rater-08", image)]
    assert events[0][3]["note"] == "crusted" and events[1][3]["previous"] == 2
    assert prediction == 1  # the model's answer is kept
    code, stdout, _ = _invoke("review", "list", "--json")
    assert image not in {i["image_id"] for i in json.loads(stdout)["items"]}
    code, stdout, _ = _invoke("export", "--level", "image", "--format", "json")
    row = next(r for r in json.loads(stdout) if r["image_id"] == image)
    assert (row["severity"], row["reviewed_severity"], row["review_status"]) == (3, 3, "reviewed")


def test_set_rejects_bad_input_with_exit_2(images: dict[str, int]) -> None:
    image = str(images["unsure"])
    assert _invoke("review", "set", image, "--severity", "7", "--by", "r")[0] == 2
    assert _invoke("review", "set", image, "--severity", "awful", "--by", "r")[0] == 2
    assert _invoke("review", "set", image, "--severity", "1", "--by", " ")[0] == 2
    code, _, err = _invoke("review", "set", "999999", "--severity", "1", "--by", "r")
    assert code == 2 and "no image 999999" in err
