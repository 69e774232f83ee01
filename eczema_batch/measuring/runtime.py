"""The models a process computes with: resolved to catalogue identities, loaded once, lazily.

Planning needs only identities (name + digest of the weight files), not the models: a CPU-only
`run --queue gpu` never loads a model, and a worker loads each model on its first chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from eczema_batch.catalogue.identities import model_row_id, same_weights
from eczema_batch.catalogue.measurements import Targets
from eczema_batch.catalogue.models import Head
from eczema_batch.errors import NoHeadError, UsageError
from eczema_batch.measuring.config import RunConfig
from eczema_batch.measuring.prompts import PromptCache
from eczema_batch.pipeline.classify import SeverityHead, head_from_bytes
from eczema_batch.pipeline.derived import read_identity
from eczema_batch.pipeline.device import autocast_dtype, precision_name, resolve_device
from eczema_batch.pipeline.embed import Embedder
from eczema_batch.pipeline.loading import (
    find_weights,
    load_embedder,
    load_segmenter,
    weights_digest,
)
from eczema_batch.pipeline.registry import get_spec
from eczema_batch.pipeline.segment import Segmenter


@dataclass(frozen=True)
class WeightsIdentity:
    name: str
    kind: str
    digest: str
    folder: str
    #: the registered model a derived one was trained from, and how (None for a registered one)
    derived_from: str | None = None
    method: str | None = None

    def row_config(self) -> dict[str, str]:
        """What the catalogue's model row records beside the identity."""
        config = {"folder": self.folder}
        if self.derived_from is not None:
            config.update(derived_from=self.derived_from, method=self.method or "")
        return config


def identify(name: str, *, kind: str, model_dir: str | None) -> WeightsIdentity:
    spec = get_spec(name, model_dir=model_dir)
    if spec.kind != kind:
        raise UsageError(f"model {name!r} is a {spec.kind}, not a {kind}")
    folder = find_weights(spec, model_dir=model_dir)
    derived = read_identity(folder)
    return WeightsIdentity(name, kind, weights_digest(folder), str(folder),
                           derived.base if derived else None, derived.method if derived else None)


def run_precision(config: RunConfig, *, queue: str | None = None) -> str:
    """The precision the models of a run compute in: `auto` made concrete where it is planned.

    In this process (`queue` None or "local") it is what this machine's device gives (bf16 on
    CUDA, fp32 on the CPU). The planner of a queue run cannot see its workers' devices: on the
    queue named `gpu` it is bf16 (a GPU before Ampere needs ECZEMA_BATCH_PRECISION=fp16), on any
    other queue fp32. Recorded with the run, so every worker computes in the same precision and
    its results share one model identity.
    """
    if config.precision != "auto":  # checked: an unknown one is a usage error
        return precision_name(autocast_dtype(torch.device("cpu"), config.precision))
    if queue in (None, "local"):
        return precision_name(autocast_dtype(resolve_device(config.device), "auto"))
    return "bf16" if queue == "gpu" else "fp32"


def resolve_targets(
    session: Session, config: RunConfig, *, head_id: int | None = None, use_head: bool = True
) -> Targets:
    """Catalogue ids of the embedder, segmenter and head this configuration computes with."""
    precision = run_precision(config)
    embedder = identify(config.embedder_model, kind="embedder", model_dir=config.model_dir)
    embedder_id = model_row_id(
        session, kind="embedder", name=embedder.name, digest=embedder.digest,
        precision=precision, config=embedder.row_config(),
    )
    segmenter_id = None
    if config.segmenter_mode != "none":
        segmenter = identify(config.segmenter_model, kind="segmenter", model_dir=config.model_dir)
        segmenter_id = model_row_id(
            session, kind="segmenter", name=segmenter.name, digest=segmenter.digest,
            precision=precision, config=segmenter.row_config(),
        )
    if head_id is None and use_head:
        head_id = session.scalar(
            select(Head.id).where(
                Head.active.is_(True),
                # a head eats the features of these weights, in whatever precision
                Head.embedder_model_id.in_(same_weights(embedder_id)),
                Head.segmenter_mode == config.segmenter_mode,
                # a head eats the crops of one segmenter: never use it on another's
                Head.segmenter_model_id.is_(None) if segmenter_id is None
                else Head.segmenter_model_id.in_(same_weights(segmenter_id)),
            )
            .order_by(Head.id.desc())
            .limit(1)
        )
    return Targets(embedder_id=embedder_id, segmenter_id=segmenter_id, head_id=head_id)


class Runtime:
    """Loaded models for one configuration; one per process and configuration."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self._heads: dict[int, SeverityHead] = {}
        #: references decoded for SegGPT, kept across this process's chunks
        self.prompts = PromptCache(budget_bytes=config.prompt_cache_mb * 2**20)

    # Resolved once per Runtime: the loaders' own caches still find the weights folder each call.
    @cached_property
    def embedder(self) -> Embedder:
        c = self.config
        return load_embedder(c.embedder_model, model_dir=c.model_dir, device=c.device,
                             precision=c.precision)

    @cached_property
    def segmenter(self) -> Segmenter:
        c = self.config
        return load_segmenter(c.segmenter_model, model_dir=c.model_dir, device=c.device,
                              precision=c.precision)

    def head(self, session: Session, head_id: int) -> SeverityHead:
        if head_id not in self._heads:
            weights = session.scalar(select(Head.weights).where(Head.id == head_id))
            if weights is None:
                raise NoHeadError(
                    f"head {head_id} is not in the catalogue: `eczema-batch heads list`"
                )
            self._heads[head_id] = head_from_bytes(weights)
        return self._heads[head_id]


@lru_cache(maxsize=4)
def get_runtime(config: RunConfig) -> Runtime:
    return Runtime(config)
