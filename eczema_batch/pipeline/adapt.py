"""Continued self-supervised DINO training of a ViT embedder on a study's images (no labels).

A student (backbone + fresh DINO head) learns to match an EMA teacher (the same backbone and
head, updated as a moving average of the student) across the multi-crop views of each image.

Positives are only crops of the same image: every view row i is image i, and the loss pairs
views row by row. Two images (two visits, two body sites) of one patient are never a positive
pair, which would teach invariance to the change the study measures.

The run checkpoints every epoch (written to a temporary file, then renamed) and a run started
again with the same settings on the same images continues after the last complete epoch. Every
random draw (batch order, crops, colours) comes from (seed, epoch, step), so a resumed run gives
the weights an uninterrupted one would.

The result is the teacher's backbone (DINO evaluates the teacher: it is the better of the two).
This module never touches the database; `training.adapt_embedder` feeds it the catalogue's
images and publishes the result.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eczema_batch.errors import UsageError
from eczema_batch.pipeline.augment import Colour, MultiCrop, ViewSettings
from eczema_batch.pipeline.checkpoints import load_checkpoint, save_checkpoint
from eczema_batch.pipeline.device import autocast
from eczema_batch.pipeline.dino_loss import (
    DINOHead,
    DINOLoss,
    cosine_schedule,
    teacher_temperatures,
)
from eczema_batch.progress import StageProgress

logger = logging.getLogger(__name__)

#: gradient norm clip (DINO's --clip_grad)
CLIP_GRAD = 3.0


@dataclass(frozen=True)
class AdaptSettings:
    """How the adaptation runs; `defaults_for` picks values that suit the base model."""

    epochs: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_epochs: int
    #: the backbone learns at lr * this (the head starts fresh, the backbone does not)
    backbone_lr_scale: float
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    warmup_teacher_temp: float
    teacher_temp: float
    warmup_teacher_temp_epochs: int
    out_dim: int
    head_hidden: int
    head_bottleneck: int
    #: epochs during which the head's last layer does not learn (DINO: stabilises the start)
    freeze_last_layer: int
    #: side the images are resized to before cropping (square, as the method resizes)
    source_size: int
    global_size: int
    local_size: int
    local_crops: int
    colour: Colour = "planckian"
    #: crops (lesion crops of the predicted masks, whole images where none) | images
    views: str = "images"
    seed: int = 0
    gradient_checkpointing: bool = False
    #: batch normalisation in the head's hidden layers (DINO's `use_bn`)
    head_bn: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def defaults_for(*, image_size: int, tiny: bool, **overrides: Any) -> AdaptSettings:
    """Settings for a base model of input `image_size`; `overrides` that are None are ignored.

    Real models: DINO's recipe for continued training (lr 5e-4 x batch/256, cosine, teacher
    temperature 0.04 -> 0.07, momentum 0.996 -> 1, 224 px global and 96 px local crops). Tiny
    test models (32 px, 2 layers): 60 epochs of 32 and 16 px crops in batches of 16 at lr 5e-4
    with batch norm in the head's hidden layers (DINO's `use_bn`). Without the batch norm the tiny
    backbone's features vary too little: the head's outputs collapsed to uniform (the loss climbed
    to ln(out_dim)) and the severity head gained nothing; higher rates collapsed faster and made
    it worse. Batches of 16 give four times the steps of 64 (720 rather than 180 on 200 images):
    on three synthetic studies (`bench.adapt_sweep`) only they put the adapted embedder ahead of
    the frozen one with the paired interval above 0; a higher rate or twice the epochs at 64 did
    not.
    """
    if tiny:
        values: dict[str, Any] = {
            "epochs": 60, "batch_size": 16, "lr": 5e-4, "min_lr": 1e-5, "warmup_epochs": 1,
            "backbone_lr_scale": 1.0, "weight_decay": 0.04, "weight_decay_end": 0.1,
            "momentum_teacher": 0.99, "warmup_teacher_temp": 0.04, "teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 0, "out_dim": 256, "head_hidden": 128,
            "head_bottleneck": 64, "freeze_last_layer": 0, "source_size": 2 * image_size,
            "global_size": image_size, "local_size": max(8, image_size // 2), "local_crops": 4,
            "head_bn": True,
        }
    else:
        values = {
            "epochs": 30, "batch_size": 64, "lr": None, "min_lr": 1e-6, "warmup_epochs": 3,
            "backbone_lr_scale": 0.1, "weight_decay": 0.04, "weight_decay_end": 0.4,
            "momentum_teacher": 0.996, "warmup_teacher_temp": 0.04, "teacher_temp": 0.07,
            "warmup_teacher_temp_epochs": 10, "out_dim": 16384, "head_hidden": 2048,
            "head_bottleneck": 256, "freeze_last_layer": 1,
            "source_size": int(image_size * 8 / 7), "global_size": image_size,
            "local_size": image_size * 3 // 7, "local_crops": 6,
        }
    values.update({k: v for k, v in overrides.items() if v is not None})
    if not tiny and overrides.get("lr") is None:  # DINO's linear scaling rule
        values["lr"] = 5e-4 * values["batch_size"] / 256
    settings = AdaptSettings(**values)
    if settings.epochs < 1 or settings.batch_size < 2:
        raise UsageError("--epochs must be at least 1 and --batch-size at least 2")
    return settings


@dataclass
class AdaptResult:
    teacher: nn.Module
    loss_curve: list[float]
    steps: int
    images_per_second: float
    resumed_from_epoch: int
    extra: dict[str, Any] = field(default_factory=dict)


class _Student(nn.Module):
    """Backbone + head; views of one resolution go through the backbone together
    (DINO's MultiCropWrapper)."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        outputs, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
                end += 1
            pixels = torch.cat(list(views[start:end]))
            hidden = self.backbone(pixel_values=pixels, interpolate_pos_encoding=True)
            outputs.append(hidden.last_hidden_state[:, 0])
            start = end
        return self.head(torch.cat(outputs))


def square_image(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (3, size, size), a plain antialiased resize (the method's)."""
    with warnings.catch_warnings():  # read only: every step below makes a new tensor
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    if tensor.shape[-2:] == (size, size):
        return tensor[0]
    tensor = tensor.float()
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)[0]


def _fingerprint(settings: AdaptSettings, base_digest: str, image_keys: Sequence[str]) -> str:
    doc = json.dumps({"settings": settings.as_dict(), "base": base_digest,
                      "images": list(image_keys)}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def _param_groups(student: _Student, settings: AdaptSettings) -> list[dict[str, Any]]:
    """DINO's groups (biases and norms not decayed), with the backbone at a lower lr."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (name.endswith(".bias") or param.ndim == 1)
        groups.setdefault((name.startswith("backbone."), decay), []).append(param)
    return [{"params": params, "backbone": backbone, "decay": decay,
             "weight_decay": 0.0}
            for (backbone, decay), params in sorted(groups.items())]


def _load_checkpoint(folder: Path | None, fingerprint: str) -> dict[str, Any] | None:
    return load_checkpoint(
        folder, fingerprint,
        foreign="holds the checkpoint of an adaptation with other settings, base weights or "
        "images: run the same command as before to resume it, or pass --restart to discard it")


def adapt_embedder(
    backbone: nn.Module,
    images: Sequence[np.ndarray],
    *,
    settings: AdaptSettings,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    base_digest: str = "",
    image_keys: Sequence[str] | None = None,
    checkpoint_dir: Path | None = None,
    progress: StageProgress | None = None,
    notice: Callable[[str], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    estimate: bool = False,
) -> AdaptResult:
    """Train `backbone` (a transformers ViTModel, modified in place: it becomes the student)
    with DINO on `images` (uint8 (H, W, 3), any sizes; a lazy sequence is read once per epoch).

    `image_keys` identify the images for the checkpoint (default: their positions); `estimate`
    measures the first step and reports through `notice` how long the whole run would take.
    """
    if len(images) < 2:
        raise UsageError(f"adapting needs at least 2 images, got {len(images)}")
    keys = list(image_keys) if image_keys is not None else [str(i) for i in range(len(images))]
    fingerprint = _fingerprint(settings, base_digest, keys)
    batch = min(settings.batch_size, len(images))
    steps_per_epoch = len(images) // batch  # DINO's loader drops the last, partial batch
    total_steps = settings.epochs * steps_per_epoch

    backbone.train()
    backbone.requires_grad_(True)
    if settings.gradient_checkpointing and hasattr(backbone, "gradient_checkpointing_enable"):
        enable: Any = backbone.gradient_checkpointing_enable
        enable()
    config: Any = backbone.config
    dim = int(config.hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        head = DINOHead(dim, settings.out_dim, hidden_dim=settings.head_hidden,
                        bottleneck_dim=settings.head_bottleneck, use_bn=settings.head_bn)
    student = _Student(backbone, head).to(device)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    views = MultiCrop(ViewSettings(settings.global_size, settings.local_size,
                                   settings.local_crops, settings.colour),
                      mean=mean, std=std).to(device)
    loss_fn = DINOLoss(settings.out_dim, crops=views.crops, teacher_temps=teacher_temperatures(
        warmup_temp=settings.warmup_teacher_temp, temp=settings.teacher_temp,
        warmup_epochs=settings.warmup_teacher_temp_epochs, epochs=settings.epochs,
    )).to(device)
    groups = _param_groups(student, settings)
    optimizer = torch.optim.AdamW(groups)
    lr_schedule = cosine_schedule(settings.lr, settings.min_lr, total_steps,
                                  warmup_steps=settings.warmup_epochs * steps_per_epoch)
    wd_schedule = cosine_schedule(settings.weight_decay, settings.weight_decay_end, total_steps)
    momentum_schedule = cosine_schedule(settings.momentum_teacher, 1.0, total_steps)

    # fp16 (GPUs without bf16) needs loss scaling; for bf16 and fp32 the scaler does nothing
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_curve: list[float] = []
    start_epoch = 0
    state = _load_checkpoint(checkpoint_dir, fingerprint)
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        loss_fn.center.copy_(state["center"].to(device))
        loss_curve = list(state["loss_curve"])
        start_epoch = int(state["epoch"])
        if notice is not None:
            notice(f"resuming from the checkpoint after epoch {start_epoch} of {settings.epochs}")

    images_seen, compute_seconds = 0, 0.0
    for epoch in range(start_epoch, settings.epochs):
        order = np.random.default_rng([settings.seed, epoch]).permutation(len(images))
        losses = []
        for step in range(steps_per_epoch):
            it = epoch * steps_per_epoch + step
            started = time.perf_counter()
            chosen = order[step * batch:(step + 1) * batch]
            pixels = torch.stack([square_image(images[int(i)], settings.source_size)
                                  for i in chosen]).to(device).float().div_(255.0)
            # (uint8 over the bus: a quarter of the bytes of floats)
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule[it] * (settings.backbone_lr_scale
                                                 if group["backbone"] else 1.0)
                group["weight_decay"] = wd_schedule[it] if group["decay"] else 0.0
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(settings.seed * 1_000_003 + it)
                crops = views(pixels)
            with autocast(device, dtype):
                with torch.no_grad():
                    teacher_out = teacher(crops[:2])  # only the global views
                student_out = student(crops)
            loss = loss_fn(student_out, teacher_out, epoch)
            if not math.isfinite(loss.item()):
                raise UsageError(f"the DINO loss became {loss.item()} at epoch {epoch + 1}: "
                                 "try a lower learning rate")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP_GRAD)
            if epoch < settings.freeze_last_layer:
                for param in student.head.last_layer.parameters():
                    param.grad = None
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                m = float(momentum_schedule[it])
                for p_s, p_t in zip(student.parameters(), teacher.parameters(), strict=True):
                    p_t.mul_(m).add_(p_s.detach(), alpha=1 - m)
            losses.append(float(loss.item()))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            compute_seconds += seconds
            images_seen += len(chosen)
            if estimate and epoch == start_epoch and step == 0 and notice is not None:
                left = seconds * (total_steps - it)
                notice(f"one step of {len(chosen)} images took {seconds:.1f} s on {device}: "
                       f"{total_steps - it} steps would take about {_duration(left)}")
            if progress is not None:
                rate = images_seen / compute_seconds if compute_seconds else 0.0
                progress(f"epoch {epoch + 1}/{settings.epochs} (loss {np.mean(losses):.3f}, "
                         f"{rate:.0f} images/s)", it + 1, total_steps)
        loss_curve.append(float(np.mean(losses)))
        logger.info("adaptation epoch %d/%d: loss %.4f", epoch + 1, settings.epochs,
                    loss_curve[-1])
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, {
                "fingerprint": fingerprint, "epoch": epoch + 1,
                "student": student.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "center": loss_fn.center.cpu(),
                "loss_curve": loss_curve,
            })
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    result_backbone = teacher.backbone
    result_backbone.eval()
    return AdaptResult(
        teacher=result_backbone, loss_curve=loss_curve, steps=total_steps,
        images_per_second=images_seen / compute_seconds if compute_seconds else 0.0,
        resumed_from_epoch=start_epoch,
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
