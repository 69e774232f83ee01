"""Step 2 of the method: pick each query's K prompt images among the references.

References are images with a manual mask. A query's prompts are the K references nearest by cosine
similarity of their embeddings, never the query itself and, when groups (patient ids) are given,
never an image of the query's own patient (that would leak the answer during evaluation).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

#: queries per similarity block: bounds the (block x references) matrices held at once
_QUERY_BLOCK = 1024
#: guards the division for all-zero vectors (they get similarity 0 to everything)
_NORM_EPS = 1e-12


@dataclass(frozen=True)
class PromptSet:
    """Reference ids chosen for one query, most similar first, with their cosine similarities."""

    ids: tuple[int, ...] = ()
    similarities: tuple[float, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


def _unit_rows(vectors: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, _NORM_EPS)


def _group_codes(
    query_groups: Sequence[Hashable], reference_groups: Sequence[Hashable]
) -> tuple[np.ndarray, np.ndarray]:
    """Both group lists as integer codes from one shared table."""
    table: dict[Hashable, int] = {}
    query = np.array([table.setdefault(g, len(table)) for g in query_groups], dtype=np.int64)
    reference = np.array(
        [table.setdefault(g, len(table)) for g in reference_groups], dtype=np.int64
    )
    return query, reference


def select_prompts(
    query_vectors: np.ndarray,
    reference_vectors: np.ndarray,
    *,
    query_ids: Sequence[int],
    reference_ids: Sequence[int],
    k: int = 2,
    query_groups: Sequence[Hashable] | None = None,
    reference_groups: Sequence[Hashable] | None = None,
) -> list[PromptSet]:
    """The top-`k` references for each query by cosine similarity.

    Ties are broken by the smaller reference id. A query with fewer than `k` eligible references
    gets what there is, possibly an empty PromptSet: the caller decides what that means.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    queries = _unit_rows(query_vectors, "query_vectors")
    references = _unit_rows(reference_vectors, "reference_vectors")
    if queries.shape[1] != references.shape[1]:
        raise ValueError(
            f"query vectors are {queries.shape[1]}-d but reference vectors {references.shape[1]}-d"
        )
    q_ids = np.asarray(query_ids, dtype=np.int64)
    r_ids = np.asarray(reference_ids, dtype=np.int64)
    if len(q_ids) != len(queries) or len(r_ids) != len(references):
        raise ValueError("query_ids and reference_ids must match the vectors' lengths")
    if len(np.unique(r_ids)) != len(r_ids):
        raise ValueError("reference_ids must be unique")
    if (query_groups is None) != (reference_groups is None):
        raise ValueError("pass both query_groups and reference_groups, or neither")
    q_groups = r_groups = None
    if query_groups is not None and reference_groups is not None:
        if len(query_groups) != len(queries) or len(reference_groups) != len(references):
            raise ValueError("query_groups and reference_groups must match the vectors' lengths")
        q_groups, r_groups = _group_codes(query_groups, reference_groups)

    results: list[PromptSet] = []
    for start in range(0, len(queries), _QUERY_BLOCK):
        stop = start + _QUERY_BLOCK
        similarity = queries[start:stop] @ references.T
        excluded = q_ids[start:stop, None] == r_ids[None, :]
        if q_groups is not None and r_groups is not None:
            excluded |= q_groups[start:stop, None] == r_groups[None, :]
        similarity[excluded] = -np.inf
        # Last key sorts first: by descending similarity, then ascending id.
        tie_break = np.broadcast_to(r_ids, similarity.shape)
        order = np.lexsort((tie_break, -similarity), axis=-1)[:, :k]
        chosen = np.take_along_axis(similarity, order, axis=1)
        for row_order, row_similarity in zip(order, chosen, strict=True):
            keep = np.isfinite(row_similarity)
            results.append(
                PromptSet(
                    ids=tuple(int(i) for i in r_ids[row_order[keep]]),
                    similarities=tuple(float(s) for s in row_similarity[keep]),
                )
            )
    return results
