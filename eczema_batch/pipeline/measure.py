"""The method, steps 1 to 5, over typed per-image records: the one place that composes it.

`eczema-batch run` (a job's chunk) and `eczema-batch evaluate` (every fold's held-out images) both
call `measure`. It reads nothing and writes nothing itself: what was computed before comes from a
`Store` and pixels from a `Pixels` source, both given by the caller (the catalogue and the study
folders); what it returns says which results are new, for the caller to save. The records are in
`pipeline.records`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from eczema_batch.errors import RejectedFileError
from eczema_batch.pipeline.crop import crop_to_mask
from eczema_batch.pipeline.records import (
    FLAG_EMPTY,
    FLAG_NO_REFERENCES,
    Counts,
    Keyed,
    MaskKey,
    Measurement,
    Method,
    Models,
    NewMask,
    Pixels,
    Query,
    Store,
)
from eczema_batch.pipeline.retrieve import PromptSet, select_prompts

if TYPE_CHECKING:
    from eczema_batch.pipeline.classify import SeverityHead


def _pixels_of(ids: Sequence[int], pixels: Pixels, failed: dict[int, str]) -> dict[int, np.ndarray]:
    got = {}
    for iid in ids:
        if iid in failed:
            continue
        try:
            got[iid] = pixels.get(iid)
        except RejectedFileError as exc:
            failed[iid] = str(exc)
    return got


def embed_whole(image_ids: Sequence[int], models: Models, store: Store, pixels: Pixels, *,
                batch_size: int, counts: Counts | None = None,
                failed: dict[int, str] | None = None
                ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Step 1: whole-image DINO embeddings, for retrieval. (all found or made, the new ones)."""
    failed = {} if failed is None else failed
    found = store.full_vectors(image_ids)
    todo = [i for i in image_ids if i not in found]
    if not todo:
        return found, {}
    pixels.prefetch(todo)
    got = _pixels_of(todo, pixels, failed)
    ok = [i for i in todo if i in got]
    if not ok:
        return found, {}
    matrix = models.embedder.embed([got[i] for i in ok], batch_size=batch_size)
    if counts is not None:
        counts.embedder_images += len(ok)
    new = dict(zip(ok, matrix, strict=True))
    return {**found, **new}, new


def choose_prompts(queries: Sequence[Query], full: dict[int, np.ndarray], method: Method
                   ) -> list[PromptSet]:
    """Step 2: each query's K most similar references (cosine of whole-image embeddings)."""
    out: list[PromptSet | None] = [None] * len(queries)
    groups: dict[int, list[int]] = {}
    for index, q in enumerate(queries):
        if q.references is None or not len(q.references.ids) or q.image_id not in full:
            out[index] = PromptSet()
        else:
            # Queries sharing one References object are retrieved in one matrix product.
            groups.setdefault(id(q.references), []).append(index)
    for indexes in groups.values():
        refs = queries[indexes[0]].references
        assert refs is not None
        own = method.exclude_own_patient
        sets = select_prompts(
            np.stack([full[queries[i].image_id] for i in indexes]), refs.vectors,
            query_ids=[queries[i].image_id for i in indexes],
            reference_ids=[int(x) for x in refs.ids], k=method.k,
            query_groups=[queries[i].patient_id for i in indexes] if own else None,
            reference_groups=[int(x) for x in refs.patients] if own else None,
        )
        for index, prompt_set in zip(indexes, sets, strict=True):
            out[index] = prompt_set
    return [p if p is not None else PromptSet() for p in out]


def _retrieved(query: Query, method: Method) -> bool:
    return method.mode == "seggpt" or (method.mode == "manual" and query.manual_mask is None)


def mask_key(query: Query, prompts: PromptSet, method: Method) -> MaskKey:
    if method.mode == "none":
        return MaskKey("none")
    if method.mode == "manual" and query.manual_mask is not None:
        return MaskKey("manual")
    return MaskKey.seggpt(method.segmenter_id, prompts.ids)


@dataclass
class _Item:
    """One (image, mask key) while `measure` runs: all that is known of it, in one place."""

    query: Query
    prompts: PromptSet
    #: the crop embedding, found in the store or made now
    crop: np.ndarray | None = None
    new_crop: bool = False
    #: the mask the crop is cut with; None: the whole image (no mask, or SegGPT found nothing)
    cut_with: np.ndarray | None = None
    #: the stored mask it is cut with (manual, or SegGPT's from an earlier call)
    mask_id: int | None = None
    new_mask: NewMask | None = None
    probabilities: np.ndarray | None = None


def measure(queries: Sequence[Query], method: Method, models: Models, store: Store,
            pixels: Pixels, *, head: SeverityHead | None = None, counts: Counts | None = None,
            on_new_mask: Callable[[Keyed, NewMask], None] | None = None,
            ) -> tuple[list[Measurement], dict[int, np.ndarray]]:
    """The method for each query, reusing whatever the store has for the same key.

    Returns one Measurement per query (in order; queries that share an image and a key share
    the work) and the whole-image embeddings this call made. An image that cannot be read fails
    alone: its Measurement carries the reason, the others complete. `on_new_mask` sees each
    mask as soon as it is made (a caller encodes its PNG in a thread while the models go on).
    """
    counts = counts if counts is not None else Counts()
    #: image id -> why it cannot be read
    failed: dict[int, str] = {}
    # 1. Whole-image embeddings, of the images that retrieval will prompt.
    ids = list(dict.fromkeys(q.image_id for q in queries if _retrieved(q, method)))
    full, new_full = embed_whole(ids, models, store, pixels, batch_size=method.batch_size,
                                 counts=counts, failed=failed)
    # 2. Prompts: each query's K nearest references, hence its mask key.
    prompt_sets = choose_prompts(queries, full, method)
    keys = [mask_key(q, p, method) for q, p in zip(queries, prompt_sets, strict=True)]
    items: dict[Keyed, _Item] = {}
    for q, p, key in zip(queries, prompt_sets, keys, strict=True):
        items.setdefault((q.image_id, key), _Item(q, p))
    for k, crop in store.crop_vectors(list(items)).items():
        items[k].crop = crop
    todo = {k: it for k, it in items.items() if it.crop is None and k[0] not in failed}
    pixels.prefetch(k[0] for k in todo)
    # 3. Masks: the manual one, SegGPT's from an earlier call, or SegGPT's now.
    stored = store.masks([k for k in todo if k[1].source == "seggpt"])
    to_segment = []
    for k, it in todo.items():
        if k[1].source == "manual":
            assert it.query.manual_mask is not None
            it.cut_with, it.mask_id = it.query.manual_mask.mask, it.query.manual_mask.id
        elif k[1].source != "seggpt":
            continue
        elif k in stored:
            found = stored[k].mask
            it.cut_with, it.mask_id = (found if found.any() else None), stored[k].id
        elif not it.prompts.ids:
            it.new_mask = NewMask(np.ones(it.query.size, dtype=bool), 1.0, FLAG_NO_REFERENCES)
        else:
            to_segment.append(k)
    got = _pixels_of(list(dict.fromkeys(k[0] for k in todo)), pixels, failed)
    _segment({k: todo[k] for k in to_segment if k[0] in got}, got, models, pixels, method,
             counts, on_new_mask)
    # 4. The lesion crop (the whole image where there is no mask), embedded.
    to_crop = [k for k in todo if k[0] in got]
    if to_crop:
        matrix = models.embedder.embed([_lesion(got[k[0]], todo[k].cut_with) for k in to_crop],
                                       batch_size=method.batch_size)
        counts.embedder_images += len(to_crop)
        for k, vector in zip(to_crop, matrix, strict=True):
            todo[k].crop, todo[k].new_crop = vector, True
    # 5. Severity: the head's class probabilities.
    ready = [(it, it.crop) for it in items.values() if it.crop is not None]
    if head is not None and ready:
        from eczema_batch.pipeline.classify import predict_proba  # torch: only with a head

        probabilities = predict_proba(head, np.stack([crop for _, crop in ready]))
        for (it, _), p in zip(ready, probabilities, strict=True):
            it.probabilities = p
    out, seen = [], set()
    for q, key in zip(queries, keys, strict=True):
        # Queries that share (image, key) share one result; the first carries what is new, so
        # the caller stores it once.
        out.append(_measurement(q, key, items[(q.image_id, key)], failed,
                                new=(q.image_id, key) not in seen))
        seen.add((q.image_id, key))
    return out, new_full


def _segment(items: dict[Keyed, _Item], got: dict[int, np.ndarray], models: Models,
             pixels: Pixels, method: Method, counts: Counts,
             on_new_mask: Callable[[Keyed, NewMask], None] | None) -> None:
    """Step 3 proper: SegGPT for `items`, each with the prompts of its key that can be read."""
    if not items:
        return
    segmenter = models.segmenter
    pairs = pixels.pairs(sorted({p for it in items.values() for p in it.prompts.ids}),
                         segmenter.input_size)
    usable = {k: [p for p in it.prompts.ids if p in pairs] for k, it in items.items()}
    for k in [k for k in items if not usable[k]]:
        # Every prompt image became unreadable since it was chosen.
        lost = items.pop(k)
        lost.new_mask = NewMask(np.ones(lost.query.size, dtype=bool), 1.0, FLAG_NO_REFERENCES)
    results = segmenter.segment(
        [got[k[0]] for k in items], [[pairs[p] for p in usable[k]] for k in items],
        out_sizes=[it.query.size for it in items.values()],
        batch_size=max(method.batch_size, 1)) if items else []
    counts.segmenter_queries += len(items)
    counts.segmenter_prompt_pairs += sum(len(usable[k]) for k in items)
    for (k, it), result in zip(items.items(), results, strict=True):
        empty = not result.mask.any()
        it.new_mask = NewMask(result.mask, result.area_fraction, FLAG_EMPTY if empty else None)
        it.cut_with = None if empty else result.mask
        if on_new_mask is not None:
            on_new_mask(k, it.new_mask)


def _lesion(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return image if mask is None else crop_to_mask(image, mask).pixels


def _measurement(query: Query, key: MaskKey, item: _Item, failed: dict[int, str], *,
                 new: bool) -> Measurement:
    if query.image_id in failed:
        return Measurement(query.image_id, key, item.prompts, error=failed[query.image_id])
    return Measurement(query.image_id, key, item.prompts, mask_id=item.mask_id,
                       new_mask=item.new_mask if new else None, crop=item.crop,
                       new_crop=item.new_crop and new, probabilities=item.probabilities)
