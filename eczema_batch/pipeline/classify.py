"""Step 5: the severity head, a small MLP on the DINO features of the lesion crop.

768 -> 128 (ReLU, dropout 0.3) -> classes, as in the paper. Weights travel as safetensors bytes so
the catalogue can hold them and any worker can load them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

DEFAULT_HIDDEN = 128
DEFAULT_DROPOUT = 0.3


class SeverityHead(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, *, hidden: int = DEFAULT_HIDDEN,
                 dropout: float = DEFAULT_DROPOUT) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.hidden, self.dropout = in_dim, n_classes, hidden, dropout
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


@dataclass(frozen=True)
class HeadWeights:
    """A trained head as bytes plus the shape needed to rebuild it."""

    data: bytes
    in_dim: int
    n_classes: int
    hidden: int
    dropout: float

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def head_to_bytes(head: SeverityHead) -> HeadWeights:
    # No safetensors metadata: its order in the header varies between saves, and the digest of
    # the bytes must be the same for the same weights. Shapes say everything but the dropout,
    # which only matters in training.
    state = {k: v.detach().cpu().contiguous() for k, v in sorted(head.state_dict().items())}
    return HeadWeights(save_safetensors(state), head.in_dim, head.n_classes, head.hidden,
                       head.dropout)


def head_from_bytes(data: bytes) -> SeverityHead:
    state = load_safetensors(data)
    in_dim = state["net.0.weight"].shape[1]
    hidden = state["net.0.weight"].shape[0]
    n_classes = state["net.3.weight"].shape[0]
    head = SeverityHead(in_dim, n_classes, hidden=hidden)
    head.load_state_dict(state)
    head.eval()
    return head


@torch.inference_mode()
def predict_proba(head: SeverityHead, features: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Class probabilities (N, classes) for feature rows (N, dim); float32."""
    matrix = np.asarray(features, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != head.in_dim:
        raise ValueError(
            f"the head expects {head.in_dim}-d features, got shape {matrix.shape}: it was trained "
            "on another embedder's features"
        )
    head.eval()
    logits = head(torch.from_numpy(matrix))
    return torch.softmax(logits.float(), dim=1).numpy()
