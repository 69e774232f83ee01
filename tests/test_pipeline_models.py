"""Model registry, weight lookup, digests and loading, with tiny models of the real classes."""

from __future__ import annotations

import importlib.util
import shutil
import socket
from pathlib import Path

import pytest
import torch

from eczema_batch.errors import ModelNotFoundError, UsageError
from eczema_batch.pipeline.device import autocast_dtype, resolve_device
from eczema_batch.pipeline.loading import (
    find_weights,
    load_embedder,
    load_segmenter,
    weights_digest,
)
from eczema_batch.pipeline.registry import get_spec, list_specs
from eczema_batch.pipeline.tiny import make_tiny_models
from tests._model_fixtures import tiny_model_dir_fixture  # noqa: F401

#: a commit hash as the hub cache names snapshot folders
FAKE_REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_specs_resolve_by_exact_name() -> None:
    seggpt = get_spec("seggpt-vit-large")
    assert (seggpt.kind, seggpt.family, seggpt.hub_id) == (
        "segmenter",
        "seggpt",
        "BAAI/seggpt-vit-large",
    )
    dino = get_spec("dino-vitb16")
    assert (dino.hub_id, dino.image_size, dino.tiny) == ("facebook/dino-vitb16", 224, False)
    assert get_spec("tiny-dino").tiny
    real = {spec.name for spec in list_specs(include_tiny=False)}
    assert "tiny-seggpt" not in real and {"seggpt-vit-large", "timm-dinov2-vitb14"} <= real
    assert {spec.name for spec in list_specs(kind="segmenter")} == {
        "seggpt-vit-large",
        "tiny-seggpt",
    }


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UsageError) as error:
        get_spec("seggpt")  # a prefix is not a name
    assert "dino-vitb16" in str(error.value) and "seggpt-vit-large" in str(error.value)


def test_missing_weights_name_every_place_and_the_fix(
    tmp_path: Path, empty_hub_cache: Path, no_network: None
) -> None:
    with pytest.raises(ModelNotFoundError) as error:
        load_segmenter("seggpt-vit-large", model_dir=tmp_path / "models", device="cpu")
    message = str(error.value)
    assert str(tmp_path / "models" / "seggpt-vit-large") in message
    assert str(empty_hub_cache) in message and "BAAI/seggpt-vit-large" in message
    assert "download BAAI/seggpt-vit-large --local-dir DIR/seggpt-vit-large" in message
    assert "ECZEMA_BATCH_MODEL_DIR=DIR" in message


def test_an_empty_model_folder_is_not_used(tmp_path: Path, empty_hub_cache: Path) -> None:
    (tmp_path / "dino-vitb16").mkdir()
    (tmp_path / "dino-vitb16" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        find_weights(get_spec("dino-vitb16"), model_dir=tmp_path)


def test_a_tiny_model_never_stands_in_for_a_real_one(
    tiny_model_dir: Path, empty_hub_cache: Path
) -> None:
    with pytest.raises(ModelNotFoundError):
        load_embedder("dino-vitb16", model_dir=tiny_model_dir, device="cpu")


def test_a_folder_of_the_wrong_model_type_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_model_dir / "tiny-dino", tmp_path / "tiny-seggpt")
    with pytest.raises(UsageError, match="holds a 'vit' model"):
        load_segmenter("tiny-seggpt", model_dir=tmp_path, device="cpu")


def test_kind_must_match() -> None:
    with pytest.raises(UsageError, match="is a segmenter; the embedders are: .*tiny-dino"):
        load_embedder("tiny-seggpt", device="cpu")


def test_tiny_models_have_a_stable_digest(tmp_path: Path) -> None:
    first = make_tiny_models(tmp_path / "a")
    second = make_tiny_models(tmp_path / "b")
    for name in ("tiny-seggpt", "tiny-dino"):
        assert weights_digest(first[name]) == weights_digest(second[name])
    assert weights_digest(first["tiny-seggpt"]) != weights_digest(first["tiny-dino"])
    # Changing one byte of the weights changes the digest (the per-file cache sees mtime + size).
    weights = first["tiny-dino"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_digest(first["tiny-dino"]) != weights_digest(second["tiny-dino"])


def test_loading_gives_frozen_eval_models_once(tiny_model_dir: Path) -> None:
    embedder = load_embedder("tiny-dino", model_dir=tiny_model_dir, device="cpu")
    assert load_embedder("tiny-dino", model_dir=tiny_model_dir, device="cpu") is embedder
    assert not embedder.model.training
    assert not any(p.requires_grad for p in embedder.model.parameters())
    assert embedder.dim == 32 and embedder.input_size == (32, 32)
    assert embedder.identity.digest == weights_digest(tiny_model_dir / "tiny-dino")
    assert embedder.identity.config["attn_implementation"] == "sdpa"
    assert embedder.identity.config["precision"] == "fp32"

    segmenter = load_segmenter("tiny-seggpt", model_dir=tiny_model_dir, device="cpu")
    assert segmenter.input_size == (16, 16)  # from config.image_size [32, 16]: prompt + query
    assert segmenter.identity.config["attn_implementation"].startswith("sdpa")
    eager = load_segmenter("tiny-seggpt", model_dir=tiny_model_dir, device="cpu", attention="eager")
    assert eager is not segmenter and eager.identity.config["attn_implementation"] == "eager"


def test_hub_cache_lookup_never_touches_the_network(
    tiny_model_dir: Path, empty_hub_cache: Path, no_network: None
) -> None:
    repo = empty_hub_cache / "models--facebook--dino-vitb16"
    snapshot = repo / "snapshots" / FAKE_REVISION
    shutil.copytree(tiny_model_dir / "tiny-dino", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_REVISION)

    assert find_weights(get_spec("dino-vitb16")) == snapshot
    embedder = load_embedder("dino-vitb16", device="cpu")
    # Whatever the cache holds is what runs: here a 32-d model under the real name.
    assert embedder.identity.name == "dino-vitb16" and embedder.dim == 32
    assert embedder.identity.digest == weights_digest(tiny_model_dir / "tiny-dino")


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_models_say_how_to_install_timm(tmp_path: Path) -> None:
    folder = tmp_path / "timm-vit-base-dino"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match=r"pip install 'eczema-batch\[timm\]'.*torchvision"):
        load_embedder("timm-vit-base-dino", model_dir=tmp_path, device="cpu")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    for bad in ("gpu", "cpu:1", "cuda:x"):
        with pytest.raises(UsageError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_autocast_dtype() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") == torch.float32
    assert autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "fp32") == torch.float32
    with pytest.raises(UsageError):
        autocast_dtype(cpu, "fp8")


def test_importing_the_pipeline_does_not_initialise_cuda() -> None:
    import eczema_batch.pipeline.loading  # noqa: F401

    assert not torch.cuda.is_initialized()
