"""DINO's projection head and loss (self-distillation with no labels), for adapting an embedder.

Written after facebookresearch/dino `main_dino.py` (`DINOLoss`) and `vision_transformer.py`
(`DINOHead`), single process (no all-reduce of the centre):

- the head: MLP (GELU) -> bottleneck, L2-normalised -> weight-normalised linear layer without
  bias, whose norm `g` is fixed at 1 (`norm_last_layer=True`, DINO's default);
- the loss: for every teacher view q (the 2 global crops, centred then sharpened by the teacher
  temperature) and every student view v != q (all crops, divided by the student temperature),
  the cross-entropy -sum(softmax_t(q) * log_softmax_s(v)), averaged over the batch and then over
  the pairs; afterwards the centre moves towards the teacher outputs' batch mean (momentum 0.9).

The views of one image are its crops only: row i of every view is the same image, so the pairs
are (view a of image i, view b of image i), never two images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: DINO's student temperature
STUDENT_TEMP = 0.1
#: DINO's centre momentum
CENTER_MOMENTUM = 0.9
#: the number of global crops: only these pass through the teacher
GLOBAL_CROPS = 2


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised last layer (its norm fixed at 1)."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, layers: int = 3, use_bn: bool = False) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(layers, 1) - 1) + [bottleneck_dim]
        modules: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            modules.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                if use_bn:  # DINO's `use_bn` option: batch-standardised hidden layers
                    modules.append(nn.BatchNorm1d(b))
                modules.append(nn.GELU())
        self.mlp = nn.Sequential(*modules)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        parametrization = self.last_layer.parametrizations.weight
        with torch.no_grad():
            parametrization.original0.fill_(1.0)  # g: the norm of every output row
        parametrization.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def teacher_temperatures(*, warmup_temp: float, temp: float, warmup_epochs: int,
                         epochs: int) -> np.ndarray:
    """DINO's schedule: linear from `warmup_temp` to `temp` over the warmup epochs, then flat."""
    warmup_epochs = min(warmup_epochs, epochs)
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs),
                           np.full(epochs - warmup_epochs, temp)))


class DINOLoss(nn.Module):
    """Cross-entropy of the student's views against the centred, sharpened teacher's views."""

    center: torch.Tensor

    def __init__(self, out_dim: int, *, crops: int, teacher_temps: np.ndarray,
                 student_temp: float = STUDENT_TEMP,
                 center_momentum: float = CENTER_MOMENTUM) -> None:
        super().__init__()
        if crops <= GLOBAL_CROPS:
            raise ValueError(f"crops must be more than {GLOBAL_CROPS}, got {crops}")
        self.crops = crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.teacher_temps = np.asarray(teacher_temps, dtype=np.float64)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                epoch: int) -> torch.Tensor:
        """`student_output`: (crops * B, K), view-major (all images' view 0, then view 1...);
        `teacher_output`: (2 * B, K), the two global views in the same order."""
        student = (student_output.float() / self.student_temp).chunk(self.crops)
        temp = float(self.teacher_temps[epoch])
        teacher = F.softmax((teacher_output.float() - self.center) / temp, dim=-1)
        teacher_views = teacher.detach().chunk(GLOBAL_CROPS)
        total = student_output.new_zeros((), dtype=torch.float32)
        terms = 0
        for iq, q in enumerate(teacher_views):
            for v, view in enumerate(student):
                if v == iq:  # the student never predicts the teacher's own view
                    continue
                total = total + torch.sum(-q * F.log_softmax(view, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_output)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = teacher_output.float().mean(dim=0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


def cosine_schedule(start: float, end: float, steps: int, *, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """DINO's `cosine_scheduler`: linear warmup, then half a cosine from `start` to `end`."""
    warmup_steps = min(warmup_steps, steps)
    warmup = np.linspace(warmup_start, start, warmup_steps)
    rest = np.arange(steps - warmup_steps)
    span = max(len(rest), 1)
    cosine = end + 0.5 * (start - end) * (1 + np.cos(np.pi * rest / span))
    return np.concatenate((warmup, cosine))
