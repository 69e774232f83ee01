"""Reference images ready to prompt SegGPT, decoded once per process and kept for later chunks.

Every chunk prompts SegGPT with K references per image, and a study's references recur in every
chunk: re-reading them meant decoding up to chunk_size x K photos and full-size mask PNGs per
chunk (a 12 MP mask PNG alone takes ~30 ms), more than the GPU spends on the chunk. A pair is kept
as the segmenter uses it: the photo decoded at PROMPT_MAX_SIDE and the mask already sampled to
the model's input size, which the segmenter's own nearest-exact resize then leaves unchanged
(so results are identical to decoding afresh), at most ~0.8 MB a pair.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from eczema_batch.catalogue.measurements import ImageRow
from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging import decode_mask_png
from eczema_batch.measuring.config import PROMPT_MAX_SIDE
from eczema_batch.measuring.files import load_pixels
from eczema_batch.pipeline.preprocess import nearest_exact

log = logging.getLogger(__name__)

#: Bytes of decoded pairs a process keeps (about 650 references at 448 px; LRU beyond), unless
#: ECZEMA_BATCH_PROMPT_CACHE_MB says otherwise: each worker process has its own.
DEFAULT_BUDGET = 512 * 2**20

PromptPair = tuple[np.ndarray, np.ndarray]
#: (reference image id, digest of its manual mask PNG, the model's input size)
_Key = tuple[int, bytes, tuple[int, int]]


class PromptCache:
    """A bounded LRU of prompt pairs keyed on the reference and the exact bytes of its mask."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET) -> None:
        self.budget = budget_bytes
        self._pairs: OrderedDict[_Key, PromptPair] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._pairs)

    def pairs(
        self,
        refs: Iterable[ImageRow],
        mask_pngs: dict[int, bytes],
        *,
        input_size: tuple[int, int],
        max_pixels: int,
        pool: ThreadPoolExecutor,
    ) -> dict[int, PromptPair]:
        """image id -> prompt pair; a reference that cannot be read is left out, with a warning."""
        found: dict[int, PromptPair] = {}
        todo: dict[int, tuple[_Key, ImageRow]] = {}
        for row in refs:
            # A re-ingested mask has new bytes, hence a new key: never a stale pair.
            key = (row.id, hashlib.blake2b(mask_pngs[row.id], digest_size=16).digest(),
                   input_size)
            pair = self._pairs.get(key)
            if pair is None:
                todo[row.id] = (key, row)
            else:
                self._pairs.move_to_end(key)
                found[row.id] = pair
        self.hits += len(found)
        self.misses += len(todo)
        futures = {
            rid: pool.submit(_decode_pair, row, mask_pngs[rid], input_size, max_pixels)
            for rid, (_key, row) in todo.items()
        }
        for rid, future in futures.items():
            try:
                pair = future.result()
            except RejectedFileError as exc:
                log.warning("reference image %d cannot be read: %s", rid, exc)
                continue
            found[rid] = pair
            self._put(todo[rid][0], pair)
        return found

    def _put(self, key: _Key, pair: PromptPair) -> None:
        size = pair[0].nbytes + pair[1].nbytes
        if size > self.budget:
            return
        self._pairs[key] = pair
        self._bytes += size
        while self._bytes > self.budget:
            _old, (pixels, mask) = self._pairs.popitem(last=False)
            self._bytes -= pixels.nbytes + mask.nbytes


def _decode_pair(row: ImageRow, mask_png: bytes, input_size: tuple[int, int],
                 max_pixels: int) -> PromptPair:
    # In a decode thread: Pillow releases the GIL while it decodes the photo and the PNG.
    pixels = load_pixels(row, max_pixels=max_pixels, max_side=PROMPT_MAX_SIDE).pixels
    mask = nearest_exact(decode_mask_png(mask_png), input_size)
    return pixels, mask
