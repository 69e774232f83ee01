"""The method, steps 1 to 5, over typed per-image records: the one place that composes it.

`eczema-batch run` (a job's chunk) and `eczema-batch evaluate` (every fold's held-out images) both
call `measure`. It reads nothing and writes nothing itself: what was computed before comes from a
`Store` and pixels from a `Pixels` source, both given by the caller (the catalogue and the study
folders); what it returns says which results are new, for the caller to save. The records are in
`pipeline.records`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    from eczema_batch.pipeline.classify import predict_proba  # torch: only when a head is used

    #: image id -> why it cannot be read
    failed: dict[int, str] = {}
    # 1. Whole-image embeddings, of the images that retrieval will prompt.
    ids = list(dict.fromkeys(q.image_id for q in queries if _retrieved(q, method)))
    full, new_full = embed_whole(ids, models, store, pixels, batch_size=method.batch_size,
                                 counts=counts, failed=failed)
    # 2. Prompts: each query's K nearest references, hence its mask key.
    prompt_sets = choose_prompts(queries, full, method)
    keys = [mask_key(q, p, method) for q, p in zip(queries, prompt_sets, strict=True)]
    unique: dict[Keyed, tuple[Query, PromptSet]] = {}
    for q, p, key in zip(queries, prompt_sets, keys, strict=True):
        unique.setdefault((q.image_id, key), (q, p))
    crops = store.crop_vectors(list(unique))
    todo = [k for k in unique if k not in crops and k[0] not in failed]
    pixels.prefetch(k[0] for k in todo)
    # 3. Masks: the manual one, SegGPT's from an earlier call, or SegGPT now.
    stored = store.masks([k for k in todo if k[1].source == "seggpt"])
    masks: dict[Keyed, np.ndarray | None] = {}
    mask_ids: dict[Keyed, int | None] = {}
    new_masks: dict[Keyed, NewMask] = {}
    to_segment: list[Keyed] = []
    for k in todo:
        query, prompt_set = unique[k]
        if k[1].source == "none":
            masks[k], mask_ids[k] = None, None
        elif k[1].source == "manual":
            assert query.manual_mask is not None
            masks[k], mask_ids[k] = query.manual_mask.mask, query.manual_mask.id
        elif k in stored:
            found = stored[k].mask
            masks[k], mask_ids[k] = (found if found.any() else None), stored[k].id
        elif not prompt_set.ids:
            whole = np.ones(query.size, dtype=bool)
            new_masks[k] = NewMask(whole, 1.0, FLAG_NO_REFERENCES)
            masks[k], mask_ids[k] = None, None
        else:
            to_segment.append(k)
    got = _pixels_of(list(dict.fromkeys(k[0] for k in todo)), pixels, failed)
    to_segment = [k for k in to_segment if k[0] in got]
    if to_segment:
        segmenter = models.segmenter
        pairs = pixels.pairs(sorted({p for k in to_segment for p in unique[k][1].ids}),
                             segmenter.input_size)
        usable = {k: [p for p in unique[k][1].ids if p in pairs] for k in to_segment}
        for k in [k for k in to_segment if not usable[k]]:
            # Every prompt image became unreadable since it was chosen.
            new_masks[k] = NewMask(np.ones(unique[k][0].size, dtype=bool), 1.0,
                                   FLAG_NO_REFERENCES)
            masks[k], mask_ids[k] = None, None
        to_segment = [k for k in to_segment if usable[k]]
        results = segmenter.segment(
            [got[k[0]] for k in to_segment], [[pairs[p] for p in usable[k]] for k in to_segment],
            out_sizes=[unique[k][0].size for k in to_segment],
            batch_size=max(method.batch_size, 1)) if to_segment else []
        if counts is not None:
            counts.segmenter_queries += len(to_segment)
            counts.segmenter_prompt_pairs += sum(len(usable[k]) for k in to_segment)
        for k, result in zip(to_segment, results, strict=True):
            empty = not result.mask.any()
            new_masks[k] = NewMask(result.mask, result.area_fraction,
                                   FLAG_EMPTY if empty else None)
            if on_new_mask is not None:
                on_new_mask(k, new_masks[k])
            masks[k], mask_ids[k] = (None if empty else result.mask), None
    # 4. The lesion crop (the whole image where there is no mask), embedded.
    to_crop = [k for k in todo if k[0] in got]
    if to_crop:
        images = [_lesion(got[k[0]], masks[k]) for k in to_crop]
        matrix = models.embedder.embed(images, batch_size=method.batch_size)
        if counts is not None:
            counts.embedder_images += len(to_crop)
        new_crops = dict(zip(to_crop, matrix, strict=True))
    else:
        new_crops = {}
    # 5. Severity: the head's class probabilities.
    ready = {**crops, **new_crops}
    probabilities: dict[Keyed, np.ndarray] = {}
    if head is not None and ready:
        order = list(ready)
        probabilities = dict(zip(order, predict_proba(head, np.stack([ready[k] for k in order])),
                                 strict=True))
    out = []
    for q, p, key in zip(queries, prompt_sets, keys, strict=True):
        k = (q.image_id, key)
        if q.image_id in failed:
            out.append(Measurement(q.image_id, key, p, error=failed[q.image_id]))
            continue
        out.append(Measurement(
            q.image_id, key, p, mask_id=mask_ids.get(k), new_mask=new_masks.get(k),
            crop=ready[k], new_crop=k in new_crops, probabilities=probabilities.get(k)))
    return _first_owns_new(out), new_full


def _lesion(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return image if mask is None else crop_to_mask(image, mask).pixels


def _first_owns_new(measurements: list[Measurement]) -> list[Measurement]:
    """Queries that share (image, key) share one result; only the first carries what is new,
    so the caller stores it once."""
    seen: set[Keyed] = set()
    for m in measurements:
        k = (m.image_id, m.key)
        if k in seen:
            m.new_mask, m.new_crop = None, False
        seen.add(k)
    return measurements
