"""The head's features for evaluation: `pipeline.measure` over every split's images.

Cross-validation asks for the same image's crop embedding under many folds. Within a fold a
test image may only be prompted by references of patients outside the test fold, never by its
own patient, so its prompt set can change from fold to fold, but mostly does not. Masks and crop
embeddings are keyed by the exact prompt set (`pipeline.records.MaskKey`, the key `run` uses too)
and stored in the catalogue: a later fold, repeat, evaluation or run reuses them, and an
interrupted evaluation keeps what it computed (each batch commits). Every model forward is
counted, for the benchmark.

One rule differs from `run`: an image that cannot be read is marked in the catalogue, and then
the command stops, because an evaluation must not silently change which images it covers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue import measurements as catalogue
from eczema_batch.errors import EczemaBatchError
from eczema_batch.measuring.config import PROMPT_MAX_SIDE, QUERY_MAX_SIDE, RunConfig
from eczema_batch.measuring.pixels import StudyPixels
from eczema_batch.measuring.runtime import Runtime, get_runtime
from eczema_batch.pipeline.evaluate import Split
from eczema_batch.pipeline.measure import choose_prompts, embed_whole, mask_key, measure
from eczema_batch.pipeline.records import (
    Counts,
    Keyed,
    Measurement,
    Method,
    Pixels,
    Query,
    References,
    StoredMask,
)
from eczema_batch.progress import Progress
from eczema_batch.training import data as training_data

if TYPE_CHECKING:
    from eczema_batch.pipeline.classify import SeverityHead

log = logging.getLogger(__name__)

#: Images per compute batch: bounds the decoded pixels and full-size masks held at once.
BATCH_IMAGES = 32
#: Decode threads (Pillow and pydicom release the GIL); the machines here have two cores.
DECODE_THREADS = 2


@dataclass(frozen=True)
class FeatureRequest:
    """One labelled image in one split, and the references that may prompt it there."""

    image_id: int
    patient_id: int
    references: References | None = None
    manual_mask: StoredMask | None = None


class FeatureStore:
    """Measures for evaluation with one configuration (segmenter mode, models)."""

    def __init__(self, factory: sessionmaker[Session], config: RunConfig,
                 targets: catalogue.Targets, *, counts: Counts | None = None,
                 runtime: Runtime | None = None) -> None:
        self.factory, self.config, self.targets = factory, config, targets
        self.counts = counts if counts is not None else Counts()
        # Loads no model until one is needed: a fully stored evaluation never loads any.
        self.runtime = runtime if runtime is not None else get_runtime(config)
        self.method = Method(mode=config.segmenter_mode, segmenter_id=targets.segmenter_id,
                             k=config.prompts, batch_size=config.batch_size,
                             exclude_own_patient=True)

    def full_vectors(self, ids: Sequence[int], *, progress: Progress | None = None
                     ) -> dict[int, np.ndarray]:
        """Step 1 for `ids` (whole-image embeddings, for retrieval), stored as they are made."""
        wanted = sorted(set(ids))
        found: dict[int, np.ndarray] = {}
        for start in range(0, len(wanted), BATCH_IMAGES):
            batch = wanted[start : start + BATCH_IMAGES]
            failed: dict[int, str] = {}
            with self.factory() as session, session.begin(), ThreadPoolExecutor(
                    max_workers=DECODE_THREADS) as pool:
                store = catalogue.CatalogueStore(session, embedder_id=self.targets.embedder_id)
                pixels = StudyPixels(session, self.config, max_side=PROMPT_MAX_SIDE, pool=pool,
                                     prompts=self.runtime.prompts)
                vectors, new = embed_whole(batch, self.runtime, store, pixels,
                                           batch_size=self.config.batch_size,
                                           counts=self.counts, failed=failed)
                catalogue.save(session, [], self.targets, new_full=new)
                catalogue.mark_unreadable(session, failed)
            _stop_on(failed)
            found.update(vectors)
            if progress is not None:
                progress(start + len(batch), len(wanted))
        return found

    def measure(self, requests: Sequence[FeatureRequest], *, progress: Progress | None = None
                ) -> list[Measurement]:
        """Steps 2 to 4 for every request, in batches that commit as they go.

        Most splits prompt an image with the same references: each (image, mask key) is
        measured once and its Measurement returned for every request that has that key.
        """
        keys = self._keys(requests)
        first: dict[Keyed, FeatureRequest] = {}
        for k, request in zip(keys, requests, strict=True):
            first.setdefault(k, request)
        unique = list(first.values())
        found: dict[Keyed, Measurement] = {}
        for start in range(0, len(unique), BATCH_IMAGES):
            batch = unique[start : start + BATCH_IMAGES]
            with self.factory() as session, session.begin(), ThreadPoolExecutor(
                    max_workers=DECODE_THREADS) as pool:
                rows = catalogue.image_rows(session, {r.image_id for r in batch},
                                            image_root=self.config.image_root)
                store = catalogue.CatalogueStore(session, embedder_id=self.targets.embedder_id)
                pixels = StudyPixels(session, self.config, max_side=QUERY_MAX_SIDE, pool=pool,
                                     prompts=self.runtime.prompts, rows=rows)
                results, new_full = measure(_queries(batch, rows), self.method, self.runtime,
                                            store, pixels, counts=self.counts)
                catalogue.save(session, results, self.targets, new_full=new_full)
            _stop_on({m.image_id: m.error for m in results if m.error})
            found.update(((m.image_id, m.key), m) for m in results)
            if progress is not None:
                progress(start + len(batch), len(unique))
        return [found[k] for k in keys]

    def remeasure(self, requests: Sequence[FeatureRequest], *, pixels: Callable[[Pixels], Pixels],
                  head: SeverityHead | None = None, counts: Counts | None = None
                  ) -> list[Measurement]:
        """Steps 3 to 5 again from the pixels `pixels` makes of the study's, reading from the
        catalogue only the whole-image embeddings (so each request gets the prompts `measure`
        gave it) and writing nothing: for images that are not the study's, such as the
        robustness check's perturbed ones. One batch: the caller bounds its size."""
        ids = {r.image_id for r in requests}
        with self.factory() as session, ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
            rows = catalogue.image_rows(session, ids, image_root=self.config.image_root)
            full = catalogue.CatalogueStore(session, embedder_id=self.targets.embedder_id
                                            ).full_vectors(list(ids))
            source = StudyPixels(session, self.config, max_side=QUERY_MAX_SIDE, pool=pool,
                                 prompts=self.runtime.prompts, rows=rows)
            results, _ = measure(_queries(requests, rows), self.method, self.runtime,
                                 _WholeImageOnly(full), pixels(source), head=head,
                                 counts=counts if counts is not None else Counts())
        _stop_on({m.image_id: m.error for m in results if m.error})
        return results

    def _keys(self, requests: Sequence[FeatureRequest]) -> list[Keyed]:
        """Each request's (image, mask key): step 2 on the stored whole-image embeddings."""
        ids = {r.image_id for r in requests}
        with self.factory() as session:
            rows = catalogue.image_rows(session, ids, image_root=self.config.image_root)
            full = catalogue.CatalogueStore(session, embedder_id=self.targets.embedder_id
                                            ).full_vectors(list(ids))
        queries = _queries(requests, rows)
        prompts = choose_prompts(queries, full, self.method)
        return [(q.image_id, mask_key(q, p, self.method))
                for q, p in zip(queries, prompts, strict=True)]

    def masks(self, keys: Sequence[Keyed]) -> dict[Keyed, np.ndarray]:
        """The stored masks of `keys` (the masks `measure` made or found), decoded."""
        with self.factory() as session:
            store = catalogue.CatalogueStore(session, embedder_id=self.targets.embedder_id)
            return {k: m.mask for k, m in store.masks(keys).items()}

    def manual_masks(self, ids: Sequence[int]) -> dict[int, StoredMask]:
        with self.factory() as session:
            return catalogue.manual_masks(session, ids)


class _WholeImageOnly:
    """A `pipeline.records.Store` that has the whole-image embeddings and nothing else, so
    `measure` segments and embeds every query anew."""

    def __init__(self, full: dict[int, np.ndarray]) -> None:
        self.full = full

    def full_vectors(self, image_ids: Sequence[int]) -> dict[int, np.ndarray]:
        return {i: self.full[i] for i in image_ids if i in self.full}

    def crop_vectors(self, keys: Sequence[Keyed]) -> dict[Keyed, np.ndarray]:
        return {}

    def masks(self, keys: Sequence[Keyed]) -> dict[Keyed, StoredMask]:
        return {}


def _queries(requests: Sequence[FeatureRequest], rows: dict[int, catalogue.ImageRow]
             ) -> list[Query]:
    return [Query(r.image_id, r.patient_id, (rows[r.image_id].height, rows[r.image_id].width),
                  r.references, r.manual_mask) for r in requests]


def _stop_on(failed: dict[int, str]) -> None:
    if not failed:
        return
    first = next(iter(failed.items()))
    raise EczemaBatchError(
        f"{len(failed)} image(s) cannot be read (image {first[0]}: {first[1]}); they are "
        "now marked and left out: run the command again"
    )


def fold_references(split: Split, data: training_data.LabelledImages,
                    refs: training_data.References, full: dict[int, np.ndarray]
                    ) -> dict[int, References]:
    """Who may prompt the images of one split, per study: the references of patients outside
    its test fold (training patients and patients with no labelled image at all); `measure`
    leaves out the query's own patient."""
    pool = ~np.isin(refs.patient_ids, data.patient_ids[split.test])
    return study_references(refs.image_ids[pool], refs.patient_ids[pool],
                            refs.study_ids[pool], full)


def study_references(ids: np.ndarray, patients: np.ndarray, studies: np.ndarray,
                     full: dict[int, np.ndarray]) -> dict[int, References]:
    """The references of each study, with their whole-image embeddings."""
    out = {}
    for study in np.unique(studies):
        mine = studies == study
        out[int(study)] = References(
            ids=ids[mine].astype(np.int64),
            vectors=np.stack([full[int(i)] for i in ids[mine]]),
            patients=patients[mine].astype(np.int64),
        )
    return out
