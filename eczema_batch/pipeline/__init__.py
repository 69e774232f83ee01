"""Pure compute: arrays in, results out. The paper's steps, one module each.

registry (model specs by name) -> loading (weights from disk, digest, load once) ->
embed (DINO CLS) -> retrieve (K nearest references) -> segment (SegGPT) -> crop (lesion box) ->
embed again. `device` and `preprocess` serve them; `tiny` builds test models; `reference` is the
plain transformers path the batched one is tested against.

Nothing here touches the catalogue, prints, or imports the CLI or Celery. Names are imported
lazily so that `import eczema_batch.pipeline.retrieve` does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ModelSpec": "registry",
    "get_spec": "registry",
    "list_specs": "registry",
    "register_spec": "registry",
    "ModelIdentity": "loading",
    "find_weights": "loading",
    "load_embedder": "loading",
    "load_segmenter": "loading",
    "weights_digest": "loading",
    "resolve_device": "device",
    "autocast_dtype": "device",
    "Embedder": "embed",
    "Segmenter": "segment",
    "SegmentResult": "segment",
    "PromptSet": "retrieve",
    "select_prompts": "retrieve",
    "CropResult": "crop",
    "crop_to_mask": "crop",
    "make_tiny_models": "tiny",
}

__all__ = [
    "CropResult",
    "Embedder",
    "ModelIdentity",
    "ModelSpec",
    "PromptSet",
    "SegmentResult",
    "Segmenter",
    "autocast_dtype",
    "crop_to_mask",
    "find_weights",
    "get_spec",
    "list_specs",
    "load_embedder",
    "load_segmenter",
    "make_tiny_models",
    "register_spec",
    "resolve_device",
    "select_prompts",
    "weights_digest",
]

if TYPE_CHECKING:
    from eczema_batch.pipeline.crop import CropResult, crop_to_mask
    from eczema_batch.pipeline.device import autocast_dtype, resolve_device
    from eczema_batch.pipeline.embed import Embedder
    from eczema_batch.pipeline.loading import (
        ModelIdentity,
        find_weights,
        load_embedder,
        load_segmenter,
        weights_digest,
    )
    from eczema_batch.pipeline.registry import ModelSpec, get_spec, list_specs, register_spec
    from eczema_batch.pipeline.retrieve import PromptSet, select_prompts
    from eczema_batch.pipeline.segment import Segmenter, SegmentResult
    from eczema_batch.pipeline.tiny import make_tiny_models


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
