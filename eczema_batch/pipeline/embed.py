"""Step 1 and 4 of the method: embed images (or lesion crops) with a frozen ViT, CLS token.

An `Embedder` is built by `loading.load_embedder`; it owns the model and knows its input size,
normalisation and real embedding width (768 for DINO ViT-B/16, 32 for the tiny test model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from eczema_batch.pipeline.device import autocast, halved_batch
from eczema_batch.pipeline.preprocess import preprocess_images
from eczema_batch.pipeline.registry import ModelSpec

if TYPE_CHECKING:
    from eczema_batch.pipeline.loading import ModelIdentity

logger = logging.getLogger(__name__)

#: images per forward pass; DINO ViT-B/16 at 224 px needs ~0.1 GB of activations per 32 in bf16
DEFAULT_EMBED_BATCH = 32

#: pixel batch (N, 3, H, W) -> CLS features (N, D)
Features = Callable[[torch.Tensor], torch.Tensor]


class Embedder:
    """A frozen ViT that turns uint8 RGB images into CLS embeddings."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        features: Features,
        dim: int,
        input_size: tuple[int, int],
        spec: ModelSpec,
        identity: ModelIdentity,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self._features = features
        self._dim = dim
        self.input_size = input_size
        self.spec = spec
        self.identity = identity
        self.device = device
        self.dtype = dtype

    @property
    def dim(self) -> int:
        """Width of one embedding (the model's hidden size)."""
        return self._dim

    def embed(
        self, images: Sequence[np.ndarray], *, batch_size: int = DEFAULT_EMBED_BATCH
    ) -> np.ndarray:
        """uint8 (H, W, 3) images of any sizes -> float32 (N, dim) CLS embeddings."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        out = np.empty((len(images), self.dim), dtype=np.float32)
        start = 0
        while start < len(images):
            chunk = images[start : start + batch_size]
            try:
                out[start : start + len(chunk)] = self._embed_batch(chunk)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                batch_size = halved_batch(exc, self.device, len(chunk), "embedding")
                continue
            start += len(chunk)
        return out

    @torch.inference_mode()
    def _embed_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        pixels = preprocess_images(
            images,
            size=self.input_size,
            mean=self.spec.mean,
            std=self.spec.std,
            resample=self.spec.resample,
            device=self.device,
        )
        with autocast(self.device, self.dtype):
            cls = self._features(pixels)
        # One device -> host transfer per batch.
        return cls.to(torch.float32).cpu().numpy()
