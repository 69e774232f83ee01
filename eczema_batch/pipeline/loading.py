"""Find model weights on disk, fingerprint them and load ready-to-run models.

Weights come from disk only: first `<model_dir>/<name>/` (a `save_pretrained` or
`hf download --local-dir` folder), then the local Hugging Face cache for the spec's hub id.
Every lookup passes `local_files_only=True`, so nothing here ever opens a network connection.
Models are loaded once per process and argument set (`lru_cache`), in eval mode, frozen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from eczema_batch.errors import ModelNotFoundError, UsageError
from eczema_batch.pipeline.derived import read_identity
from eczema_batch.pipeline.device import autocast_dtype, precision_name, resolve_device
from eczema_batch.pipeline.embed import Embedder
from eczema_batch.pipeline.registry import Kind, ModelSpec, get_spec, list_specs
from eczema_batch.pipeline.segment import Attention, Segmenter, seggpt_input_size

logger = logging.getLogger(__name__)

#: config.json model_type each transformers family must have
_MODEL_TYPES = {"seggpt": "seggpt", "hf-vit": "vit"}
_TIMM_MISSING = (
    "model {name!r} needs timm: pip install 'eczema-batch[timm]' with torchvision from the same "
    "index as your torch (e.g. --index-url https://download.pytorch.org/whl/cu124), or pip may "
    "swap your torch for another build"
)
_HASH_CHUNK = 1 << 20  # bytes read at a time while hashing weights


@dataclass(frozen=True)
class ModelIdentity:
    """What made a result: registry name, sha256 of the weights, and how the model was run."""

    name: str
    digest: str
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


# --- where the weights are ---------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _weight_files(folder: Path) -> list[Path]:
    """The weight files a loader reads: safetensors when present, else PyTorch .bin files."""
    safetensors = sorted(folder.glob("*.safetensors"))
    return safetensors or sorted(folder.glob("*.bin"))


def _usable(folder: Path) -> bool:
    return (folder / "config.json").is_file() and bool(_weight_files(folder))


def _from_hub_cache(repo_id: str, cache_dir: Path) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, OSError):
        return None
    return Path(folder)


def find_weights(spec: ModelSpec, *, model_dir: Path | str | None = None) -> Path:
    """The folder holding `spec`'s config.json and weights, or ModelNotFoundError."""
    looked: list[str] = []
    if model_dir is not None:
        folder = Path(model_dir).expanduser() / spec.name
        if _usable(folder):
            return folder
        state = "has no config.json + weights" if folder.is_dir() else "does not exist"
        looked.append(f"{folder} ({state})")
    else:
        looked.append("no model folder given (ECZEMA_BATCH_MODEL_DIR)")
    if spec.hub_id is not None:
        cache = hub_cache_dir()
        snapshot = _from_hub_cache(spec.hub_id, cache)
        if snapshot is not None and _usable(snapshot):
            return snapshot
        state = "incomplete snapshot" if snapshot is not None else "not cached"
        looked.append(f"Hugging Face cache {cache} for {spec.hub_id} ({state})")
    raise ModelNotFoundError(_not_found_message(spec, looked))


def _not_found_message(spec: ModelSpec, looked: list[str]) -> str:
    places = "\n".join(f"  - {place}" for place in looked)
    if spec.tiny:
        how = (
            "tiny test models are built, not downloaded: "
            "`eczema-batch models make-tiny DIR`, then set ECZEMA_BATCH_MODEL_DIR=DIR"
        )
    else:
        how = (
            "on a machine that reaches the hub run\n"
            f"  hf download {spec.hub_id} --local-dir DIR/{spec.name}\n"
            f"(older huggingface_hub: huggingface-cli download {spec.hub_id} "
            f"--local-dir DIR/{spec.name}),\ncopy DIR here and set ECZEMA_BATCH_MODEL_DIR=DIR;\n"
            "or, for a dry run whose numbers mean nothing: `eczema-batch models make-tiny DIR` "
            "and ECZEMA_BATCH_MODEL_DIR=DIR ECZEMA_BATCH_SEGMENTER_MODEL=tiny-seggpt "
            "ECZEMA_BATCH_EMBEDDER_MODEL=tiny-dino"
        )
    return f"weights for model {spec.name!r} not found; looked in:\n{places}\n{how}"


# --- fingerprint -------------------------------------------------------------------------------

_digest_lock = threading.Lock()
_file_digests: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of one file, remembered per (real path, mtime, size) for this process."""
    real = path.resolve()
    stat = real.stat()
    key = (str(real), stat.st_mtime_ns, stat.st_size)
    with _digest_lock:
        cached = _file_digests.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with real.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _digest_lock:
        _file_digests[key] = value
    return value


def weights_digest(folder: Path) -> str:
    """sha256 over config.json and the weight files (by name, sorted) of a model folder."""
    files = sorted([folder / "config.json", *_weight_files(folder)], key=lambda p: p.name)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{_file_sha256(path)}\n".encode())
    return digest.hexdigest()


# --- loading -----------------------------------------------------------------------------------


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers progress bars on stderr while loading: the CLI owns the terminal."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _check_model_type(spec: ModelSpec, folder: Path) -> None:
    expected = _MODEL_TYPES[spec.family]
    found = json.loads((folder / "config.json").read_text()).get("model_type")
    if found != expected:
        raise UsageError(
            f"{folder} holds a {found!r} model, not the {expected!r} model {spec.name!r} needs"
        )


def _load_transformers(spec: ModelSpec, folder: Path) -> tuple[torch.nn.Module, str]:
    """A transformers model in float32 (autocast does reduced precision) and its attention."""
    from transformers import SegGptForImageSegmentation, ViTModel

    _check_model_type(spec, folder)
    cls: Any = SegGptForImageSegmentation if spec.family == "seggpt" else ViTModel
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch.float32}
    if spec.family == "hf-vit":
        kwargs["add_pooling_layer"] = False  # DINO features are the CLS token, not the pooler
    # transformers raises for attn_implementation="sdpa" on classes without SDPA (SegGPT in 5.x).
    attn = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    with _quiet_transformers():
        model = cls.from_pretrained(folder, attn_implementation=attn, **kwargs)
    return model, str(model.config._attn_implementation)


def _prepare(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model.to(device)


def _identity_config(spec: ModelSpec, dtype: torch.dtype, folder: Path, **extra: Any
                     ) -> dict[str, Any]:
    import transformers

    derived = read_identity(folder)
    if derived is not None:  # what it was trained from is part of what made a result
        extra["derived_from"] = {"base": derived.base, "base_digest": derived.base_digest,
                                 "method": derived.method}
    return {
        "kind": spec.kind,
        "family": spec.family,
        "hub_id": spec.hub_id,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "resample": spec.resample,
        "precision": precision_name(dtype),
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        **extra,
    }


def _spec_of_kind(name: str, kind: Kind, model_dir: Path | str | None) -> ModelSpec:
    spec = get_spec(name, model_dir=model_dir)
    if spec.kind != kind:
        names = ", ".join(s.name for s in list_specs(kind=kind))
        raise UsageError(f"model {name!r} is a {spec.kind}; the {kind}s are: {names}")
    return spec


def load_embedder(
    name: str,
    *,
    model_dir: Path | str | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    image_size: int | None = None,
) -> Embedder:
    """The embedder registered as `name`, loaded once per process.

    `image_size` overrides the input size of timm models (timm resamples the position embedding);
    transformers ViTs run at their config's size.
    """
    spec = _spec_of_kind(name, "embedder", model_dir)
    if image_size is not None and spec.family != "timm":
        raise UsageError(f"image_size can only be changed for timm models, not {name!r}")
    folder = find_weights(spec, model_dir=model_dir)
    torch_device = resolve_device(device)
    dtype = autocast_dtype(torch_device, precision)
    return _load_embedder(spec, str(folder.resolve()), str(torch_device), dtype, image_size)


@lru_cache(maxsize=8)
def _load_embedder(
    spec: ModelSpec, folder_name: str, device_name: str, dtype: torch.dtype,
    image_size: int | None
) -> Embedder:
    name = spec.name
    folder = Path(folder_name)
    device = torch.device(device_name)
    digest = weights_digest(folder)
    if spec.family == "timm":
        model, features, dim, size, attn = _load_timm(spec, folder, image_size)
    else:
        model, attn = _load_transformers(spec, folder)
        config: Any = model.config
        size = _pair(config.image_size)

        def features(pixels: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=pixels).last_hidden_state[:, 0]

        dim = int(config.hidden_size)
    model = _prepare(model, device)
    if size != (spec.image_size, spec.image_size) and spec.family != "timm":
        logger.warning("%s: config input size %s differs from the registry's", name, size)
    identity = ModelIdentity(
        name=name,
        digest=digest,
        config=_identity_config(
            spec,
            dtype,
            folder,
            dim=dim,
            input_size=list(size),
            attn_implementation=attn,
            model_class=type(model).__name__,
        ),
    )
    logger.info("loaded embedder %s (%s, dim %d) on %s", name, digest[:12], dim, device)
    return Embedder(
        model=model,
        features=features,
        dim=dim,
        input_size=size,
        spec=spec,
        identity=identity,
        device=device,
        dtype=dtype,
    )


def load_segmenter(
    name: str,
    *,
    model_dir: Path | str | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    attention: Attention = "sdpa",
) -> Segmenter:
    """The SegGPT segmenter registered as `name`, loaded once per process."""
    spec = _spec_of_kind(name, "segmenter", model_dir)
    if attention not in ("sdpa", "eager"):
        raise UsageError(f"attention {attention!r} is not one of sdpa, eager")
    folder = find_weights(spec, model_dir=model_dir)
    torch_device = resolve_device(device)
    dtype = autocast_dtype(torch_device, precision)
    return _load_segmenter(spec, str(folder.resolve()), str(torch_device), dtype, attention)


@lru_cache(maxsize=4)
def _load_segmenter(
    spec: ModelSpec, folder_name: str, device_name: str, dtype: torch.dtype,
    attention: Attention
) -> Segmenter:
    name = spec.name
    folder = Path(folder_name)
    device = torch.device(device_name)
    digest = weights_digest(folder)
    model, hf_attn = _load_transformers(spec, folder)
    model = _prepare(model, device)
    size = seggpt_input_size(model.config)
    if size != (spec.image_size, spec.image_size):
        logger.warning("%s: config input size %s differs from the registry's", name, size)
    attn = (
        "sdpa (eczema-batch: relative positions folded into q/k)"
        if attention == "sdpa"
        else hf_attn
    )
    identity = ModelIdentity(
        name=name,
        digest=digest,
        config=_identity_config(
            spec,
            dtype,
            folder,
            input_size=list(size),
            attn_implementation=attn,
            model_class=type(model).__name__,
            feature_ensemble="when K >= 2",
            embedding_type="instance",
        ),
    )
    logger.info("loaded segmenter %s (%s) on %s", name, digest[:12], device)
    return Segmenter(
        model=model, spec=spec, identity=identity, device=device, dtype=dtype, attention=attention
    )


@dataclass(frozen=True)
class TrainableSegmenter:
    """A segmenter's SegGPT loaded for training: float32, on the CPU, not cached or frozen."""

    model: torch.nn.Module
    spec: ModelSpec
    folder: Path
    digest: str


def load_trainable_segmenter(name: str, *, model_dir: Path | str | None = None
                             ) -> TrainableSegmenter:
    """The SegGPT weights of segmenter `name` as a fresh trainable copy (tuning starts here)."""
    spec = _spec_of_kind(name, "segmenter", model_dir)
    folder = find_weights(spec, model_dir=model_dir)
    model, _attn = _load_transformers(spec, folder)
    return TrainableSegmenter(model=model, spec=spec, folder=folder,
                              digest=weights_digest(folder))


def clear_model_cache() -> None:
    """Forget loaded models (tests; freeing GPU memory)."""
    _load_embedder.cache_clear()
    _load_segmenter.cache_clear()


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _load_timm(
    spec: ModelSpec, folder: Path, image_size: int | None
) -> tuple[torch.nn.Module, Any, int, tuple[int, int], str]:
    """A timm ViT from local weights: model, CLS feature function, dim, input size, attention."""
    try:
        import timm
    except ImportError as error:
        raise UsageError(_TIMM_MISSING.format(name=spec.name)) from error
    weights = _weight_files(folder)
    if len(weights) != 1:
        raise ModelNotFoundError(
            f"{folder}: expected one weights file for {spec.name}, got {weights}"
        )
    size = image_size or spec.image_size
    model = timm.create_model(
        spec.timm_arch,
        pretrained=True,
        # Local file only: timm would otherwise ask the hub.
        pretrained_cfg_overlay={"file": str(weights[0])},
        num_classes=0,
        img_size=size,
    )

    def features(pixels: torch.Tensor) -> torch.Tensor:
        return model.forward_features(pixels)[:, 0]  # CLS token (after the final norm)

    attn = "sdpa" if getattr(model.blocks[0].attn, "fused_attn", False) else "eager"
    return model, features, int(model.num_features), (size, size), attn


def load_trainable_backbone(
    name: str, *, model_dir: Path | str | None = None
) -> tuple[torch.nn.Module, ModelSpec, str]:
    """A fresh, trainable float32 copy of the registered transformers ViT embedder `name` (on
    the CPU, not cached), its spec and weights digest: the start of an adaptation."""
    spec = _spec_of_kind(name, "embedder", model_dir)
    if spec.family != "hf-vit":
        raise UsageError(
            f"model {name!r} is a {spec.family} model: only transformers ViT embedders "
            "(dino-vitb16, tiny-dino) can be adapted"
        )
    folder = find_weights(spec, model_dir=model_dir)
    if read_identity(folder) is not None:
        raise UsageError(
            f"model {name!r} is itself a derived model: adapt its base model instead"
        )
    model, _attn = _load_transformers(spec, folder)
    model.train()
    model.requires_grad_(True)
    return model, spec, weights_digest(folder)
