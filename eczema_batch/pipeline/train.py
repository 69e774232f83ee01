"""Fit the severity head (step 5) on feature matrices: arrays in, a trained SeverityHead out.

The paper's settings are the defaults: 768 -> 128 (ReLU, dropout 0.3) -> classes, Adam at lr 1e-4,
50 epochs, cross-entropy. Training is deterministic for a seed: the head's initial weights, the
batch order and the dropout masks all come from that seed, on one CPU thread with torch's
deterministic algorithms, inside a forked RNG so the caller's random state is left alone.
Nothing here touches the catalogue.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from eczema_batch.errors import UsageError
from eczema_batch.pipeline.classify import DEFAULT_DROPOUT, DEFAULT_HIDDEN, SeverityHead

ClassWeights = Literal["balanced", "none"]
CLASS_WEIGHT_MODES: tuple[ClassWeights, ...] = ("balanced", "none")

#: The paper trains with Adam at this learning rate for this many epochs.
DEFAULT_LR = 1e-4
DEFAULT_EPOCHS = 50
#: The tiny test embedders' 32-d features vary ~0.2 per dimension: at the paper's schedule the head
#: barely leaves its initialisation (README, "What the tiny test models can and cannot show"), so
#: heads on them train 6x longer at 100x the rate unless told otherwise.
TINY_LR = 1e-2
TINY_EPOCHS = 300


def default_schedule(*, tiny: bool) -> tuple[int, float]:
    """(epochs, learning rate) a head is trained with by default on an embedder's features."""
    return (TINY_EPOCHS, TINY_LR) if tiny else (DEFAULT_EPOCHS, DEFAULT_LR)
#: Mini-batch size; the paper does not say, 32 is the usual choice for a head on frozen features.
DEFAULT_BATCH_SIZE = 32
#: Fewer labelled images than this in any class and the head cannot be trained or judged: with
#: five folds, a class of fewer than five images is missing from some test folds altogether.
MIN_LABELS_PER_CLASS = 5


class TooFewLabelsError(UsageError):
    """too few labelled images per severity class to train the head"""


@dataclass(frozen=True)
class TrainSettings:
    """How a head is trained; stored with the head so it can be trained again the same way."""

    epochs: int = DEFAULT_EPOCHS
    lr: float = DEFAULT_LR
    hidden: int = DEFAULT_HIDDEN
    dropout: float = DEFAULT_DROPOUT
    seed: int = 0
    class_weights: ClassWeights = "balanced"
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.class_weights not in CLASS_WEIGHT_MODES:
            raise UsageError(
                f"--class-weights {self.class_weights!r}: use one of "
                f"{', '.join(CLASS_WEIGHT_MODES)}"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.hidden < 1:
            raise UsageError("epochs, batch size and hidden width must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout {self.dropout}: use a value in [0, 1)")
        if self.lr <= 0:
            raise UsageError(f"--lr {self.lr}: the learning rate must be positive")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    head: SeverityHead
    #: mean training loss per epoch (weighted cross-entropy)
    losses: list[float] = field(default_factory=list)
    #: the per-class loss weights used (1 for every class with --class-weights none)
    class_weights: list[float] = field(default_factory=list)


@contextmanager
def deterministic(seed: int) -> Iterator[torch.Generator]:
    """Seeded, single-threaded, deterministic torch for the block; the caller's state restored.

    One thread because a parallel reduction may add in a different order from run to run; the
    head is small enough that one thread costs nothing noticeable.
    """
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield torch.Generator().manual_seed(seed)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(threads)


def class_counts(labels: Sequence[int] | np.ndarray, n_classes: int) -> list[int]:
    return [int(c) for c in np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)]


def check_class_counts(
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    *,
    minimum: int = MIN_LABELS_PER_CLASS,
) -> list[int]:
    """The count per class, or TooFewLabelsError naming every count when one is below `minimum`."""
    counts = class_counts(labels, len(class_names))
    if len(counts) > len(class_names):
        raise UsageError(
            f"labels go up to class {len(counts) - 1} but only {len(class_names)} classes are "
            f"named ({', '.join(class_names)})"
        )
    if min(counts) < minimum:
        listing = ", ".join(f"{name} {n}" for name, n in zip(class_names, counts, strict=True))
        raise TooFewLabelsError(
            f"too few labelled images per class to train the head (at least {minimum} each "
            f"needed): {listing}. Label more images (manifest severity column or review)"
        )
    return counts


def class_weight_vector(
    labels: np.ndarray, n_classes: int, mode: ClassWeights
) -> np.ndarray:
    """Loss weight per class: sklearn's 'balanced' (n / (classes * count)) or all ones.

    A class absent from `labels` (possible in a small training fold) has no samples, so its
    weight never enters the loss; it is set to 1 for the record.
    """
    weights = np.ones(n_classes, dtype=np.float64)
    if mode == "balanced":
        present = np.unique(labels)
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights


def fit_head(
    features: np.ndarray,
    labels: np.ndarray | Sequence[int],
    *,
    n_classes: int,
    settings: TrainSettings = TrainSettings(),
) -> FitResult:
    """Train a SeverityHead on (N, D) float features and integer labels in [0, n_classes)."""
    matrix = np.ascontiguousarray(features, dtype=np.float32)
    target = np.asarray(labels, dtype=np.int64)
    if matrix.ndim != 2 or len(matrix) != len(target) or len(target) == 0:
        raise ValueError(
            f"features {matrix.shape} and labels ({len(target)},) must be (N, D) and (N,), N > 0"
        )
    if target.min() < 0 or target.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes})")
    weights = class_weight_vector(target, n_classes, settings.class_weights)
    with deterministic(settings.seed) as generator:
        head = SeverityHead(matrix.shape[1], n_classes, hidden=settings.hidden,
                            dropout=settings.dropout)
        loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
        optimiser = torch.optim.Adam(head.parameters(), lr=settings.lr)
        x, y = torch.from_numpy(matrix), torch.from_numpy(target)
        losses: list[float] = []
        head.train()
        for _ in range(settings.epochs):
            order = torch.randperm(len(y), generator=generator)
            total = 0.0
            for start in range(0, len(y), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                optimiser.zero_grad()
                loss = loss_fn(head(x[batch]), y[batch])
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(batch)
            losses.append(total / len(y))
        head.eval()
    return FitResult(head=head, losses=losses, class_weights=[float(w) for w in weights])


def state_digest(head: SeverityHead) -> str:
    """sha256 over the head's tensors (name, dtype, shape, bytes), in name order.

    Not the digest of the safetensors bytes: their JSON header lists the metadata in an order
    that changes from save to save, so equal weights would get different digests.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(head.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
