"""Shared pytest fixtures for the model tests: tiny models of the real classes, written once.

Either `from tests._model_fixtures import tiny_model_dir  # noqa: F401`, or, to keep ruff from
reading every `tiny_model_dir` parameter as a redefinition of the import (F811),
`from tests._model_fixtures import tiny_model_dir_fixture  # noqa: F401`: both register the
fixture `tiny_model_dir`. `from tests._model_fixtures import one_torch_thread  # noqa: F401`
runs a whole test module on one torch thread, and `small_study_fixture` (imported the same way)
registers `small_study`, the synthetic study the training and evaluation tests share, ingested.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.ingest.service import ingest_study
from eczema_batch.pipeline.tiny import make_tiny_models
from eczema_batch.synth import write_synthetic_study


@pytest.fixture(scope="session", name="tiny_model_dir")
def tiny_model_dir_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder holding tiny-seggpt and tiny-dino (use as model_dir=...)."""
    directory = tmp_path_factory.mktemp("models")
    make_tiny_models(directory)
    return directory


tiny_model_dir = tiny_model_dir_fixture


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the importing module's tests: the tiny models are latency-bound, so
    on a shared 2-core machine extra threads only contend, and one thread keeps float sums in one
    order (the adaptation's resume test compares weights exactly)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(name="small_study")
def small_study_fixture(tmp_path: Path, factory: sessionmaker[Session]) -> Path:
    """48 images of 8 patients (3 visits, 64 x 48 px), 14 references, labels per class 22, 12, 8,
    6 (all >= 5), ingested into `factory`."""
    root = tmp_path / "study"
    write_synthetic_study(root, patients=8, visits=3, seed=0, size=(64, 48))
    assert ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).exit_code == 0
    return root
