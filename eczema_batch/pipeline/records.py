"""The records the method passes between its steps and to its callers (numpy only, no torch).

A mask, and the crop embedding made with it, are keyed by a `MaskKey`: where the mask came from
and, for SegGPT, the segmenter's identity and the exact set of prompt images. The same image
prompted by the same references with the same model therefore has one mask whoever asked for it
(`run` or `evaluate`), and an image whose nearest references change gets a new one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from eczema_batch.pipeline.retrieve import PromptSet

if TYPE_CHECKING:
    from eczema_batch.pipeline.embed import Embedder
    from eczema_batch.pipeline.segment import PromptPair, Segmenter

MaskSource = Literal["seggpt", "manual", "none"]

FLAG_EMPTY = "SegGPT found no lesion: the whole image was used"
FLAG_NO_REFERENCES = "no reference images (manual masks) to prompt SegGPT: the whole image was used"


@dataclass(frozen=True)
class MaskKey:
    """What a mask (and a crop embedding made with it) was made from."""

    source: MaskSource
    segmenter_id: int | None = None
    #: the prompt images, sorted: for one query their order is fixed by similarity, so the set
    #: alone identifies what SegGPT saw
    prompt_ids: tuple[int, ...] = ()

    @classmethod
    def seggpt(cls, segmenter_id: int | None, prompt_ids: Iterable[int]) -> MaskKey:
        return cls("seggpt", segmenter_id, tuple(sorted(int(i) for i in prompt_ids)))

    @property
    def variant(self) -> str:
        """The key as the catalogue stores it (Mask.variant, Embedding.variant)."""
        if self.source != "seggpt":
            return self.source
        if not self.prompt_ids:
            return f"seggpt:{self.segmenter_id}:pnone"
        joined = ",".join(str(i) for i in self.prompt_ids)
        return f"seggpt:{self.segmenter_id}:p{hashlib.sha1(joined.encode()).hexdigest()[:12]}"


#: (image id, key): one mask or crop embedding
Keyed = tuple[int, MaskKey]


@dataclass(frozen=True)
class References:
    """Images that may prompt a query (they have manual masks), with whole-image embeddings."""

    ids: np.ndarray
    vectors: np.ndarray
    patients: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.vectors) == len(self.patients):
            raise ValueError("references: ids, vectors and patients differ in length")

    def where(self, keep: np.ndarray) -> References:
        return References(self.ids[keep], self.vectors[keep], self.patients[keep])


@dataclass(frozen=True)
class StoredMask:
    """A mask already in the catalogue: a manual one, or SegGPT's from an earlier call.

    Decoded on first use: most stored masks are only needed when their crop is not stored too.
    """

    id: int
    png: bytes

    @cached_property
    def mask(self) -> np.ndarray:
        from eczema_batch.imaging import decode_mask_png  # Pillow: only when a mask is used

        return decode_mask_png(self.png)


@dataclass(frozen=True)
class Query:
    """One image to measure and what it may be measured with."""

    image_id: int
    patient_id: int
    #: catalogued (height, width): masks are made at this size, whatever size pixels decode at
    size: tuple[int, int]
    #: who may prompt it; None or empty: its study has no reference image yet
    references: References | None = None
    #: its manual mask, used instead of SegGPT's when the method says "manual"
    manual_mask: StoredMask | None = None


@dataclass(frozen=True)
class Method:
    """How the images are measured; the models come separately (`Models`)."""

    #: seggpt: SegGPT's mask; manual: the manual mask where there is one, else SegGPT's;
    #: none: the whole image
    mode: MaskSource
    segmenter_id: int | None
    k: int = 2
    batch_size: int = 8
    #: never prompt a query with its own patient's images (evaluation: that would leak labels)
    exclude_own_patient: bool = False


class Models(Protocol):
    """Loaded on first use: a measurement found whole in the store loads no model."""

    @property
    def embedder(self) -> Embedder: ...

    @property
    def segmenter(self) -> Segmenter: ...


class Store(Protocol):
    """What was computed before, by any caller (the catalogue implements it)."""

    def full_vectors(self, image_ids: Sequence[int]) -> dict[int, np.ndarray]: ...

    def crop_vectors(self, keys: Sequence[Keyed]) -> dict[Keyed, np.ndarray]: ...

    def masks(self, keys: Sequence[Keyed]) -> dict[Keyed, StoredMask]: ...


class Pixels(Protocol):
    """Decoded images (the study folders implement it, decoding in threads)."""

    def prefetch(self, image_ids: Iterable[int]) -> None:
        """Start decoding these: they will be asked for soon."""

    def get(self, image_id: int) -> np.ndarray:
        """The image's uint8 RGB pixels; RejectedFileError when it cannot be read."""
        ...

    def pairs(self, reference_ids: Sequence[int], input_size: tuple[int, int]
              ) -> dict[int, PromptPair]:
        """Prompt pairs (pixels, mask at the segmenter's input size); unreadable ones left out."""
        ...


@dataclass
class NewMask:
    """A mask made in this call, to be stored under its key."""

    mask: np.ndarray
    area_fraction: float
    flag: str | None


@dataclass
class Measurement:
    """One query's result. `new_*` fields hold what this call computed (the caller stores them);
    the others are what the result is, new or found."""

    image_id: int
    key: MaskKey
    prompts: PromptSet = PromptSet()
    #: the stored mask the crop was cut with (manual, or SegGPT's from an earlier call)
    mask_id: int | None = None
    new_mask: NewMask | None = None
    crop: np.ndarray | None = None
    new_crop: bool = False
    #: class probabilities, when a head was given
    probabilities: np.ndarray | None = None
    #: why the image could not be measured (it cannot be read); nothing else is set then
    error: str | None = None


@dataclass
class Counts:
    """Images through each model in this process: what the store saved is counted here."""

    embedder_images: int = 0
    segmenter_queries: int = 0
    segmenter_prompt_pairs: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
