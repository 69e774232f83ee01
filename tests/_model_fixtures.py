"""Shared pytest fixtures for the model tests: tiny models of the real classes, written once.

Either `from tests._model_fixtures import tiny_model_dir  # noqa: F401`, or, to keep ruff from
reading every `tiny_model_dir` parameter as a redefinition of the import (F811),
`from tests._model_fixtures import tiny_model_dir_fixture  # noqa: F401`: both register the
fixture `tiny_model_dir`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from eczema_batch.pipeline.tiny import make_tiny_models


@pytest.fixture(scope="session", name="tiny_model_dir")
def tiny_model_dir_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder holding tiny-seggpt and tiny-dino (use as model_dir=...)."""
    directory = tmp_path_factory.mktemp("models")
    make_tiny_models(directory)
    return directory


tiny_model_dir = tiny_model_dir_fixture
