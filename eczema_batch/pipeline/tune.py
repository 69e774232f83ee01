"""Tune SegGPT in context on a study's reference masks (full fine-tuning), with checkpoints.

A training example is what inference sees: a prompt (one reference image and its manual mask)
above a query (another reference, of a *different* patient) whose mask is to be painted. The
loss is transformers' own (`SegGptForImageSegmentation(..., labels=..., bool_masked_pos=...)`):

- `prompt_masks` is the prompt's mask and `labels` the query's, both painted and normalised
  exactly as `preprocess_masks` paints prompts for inference (lesion white, background black,
  ImageNet-normalised); transformers stacks them (prompt above query) as the masked input.
- `bool_masked_pos` (batch, patches of the stacked image) masks the query half's patches, which
  is what inference masks; the smooth-L1 loss is taken over the masked patches only.

Pairs never join two images of one patient (a patient's other photographs are near-copies of the
answer). Every epoch draws its own order and prompts from (seed, epoch), so a run resumed from a
checkpoint continues exactly where an uninterrupted one would have been. No database here: the
caller gives arrays and patient groups.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eczema_batch.errors import UsageError
from eczema_batch.pipeline.checkpoints import load_checkpoint, save_checkpoint
from eczema_batch.pipeline.device import autocast
from eczema_batch.pipeline.maskscore import OverlapSummary, summarise
from eczema_batch.pipeline.preprocess import preprocess_images, preprocess_masks
from eczema_batch.pipeline.registry import ModelSpec
from eczema_batch.pipeline.segment import PromptPair, Segmenter, seggpt_input_size

#: the checkpoint file inside the checkpoint folder


@dataclass(frozen=True)
class TuneSettings:
    """How a tuning run trains; recorded in the tuned model's identity."""

    epochs: int
    batch_size: int
    lr: float
    #: optimiser steps per epoch; 0 means one pass over the training references
    steps_per_epoch: int = 0
    weight_decay: float = 0.05
    seed: int = 0
    #: recompute activations in the backward pass (SegGPT-L on a GPU of < 40 GB)
    gradient_checkpointing: bool = False
    #: random horizontal flips of each pair (the same flip for an image and its mask)
    flip: bool = True
    #: share of the *prompt* half's patches also masked (and so reconstructed and scored), drawn
    #: anew for every pair: more supervised pixels per pair; 0 masks only the query half
    prompt_mask_ratio: float = 0.0
    #: smooth-L1 beta of transformers' SegGptLoss (`config.beta`) while training; None keeps the
    #: model's (0.01: L1, which pulls an unsure pixel to the median colour, i.e. background when
    #: lesions cover ~10 % of a picture). The saved config keeps the model's own value.
    loss_beta: float | None = None
    #: per-image side the model is tuned (and published) at; the model sees prompt and query
    #: stacked, 2N x N. None keeps the base model's own size. Another size than the base's
    #: rebuilds the model (`resize_seggpt`): interpolated position embeddings, as is standard
    #: for fine-tuning a ViT at a higher resolution than it was pre-trained at.
    image_size: int | None = None
    #: "full": every weight trains (in-context tuning of a learned prompt is not offered: the
    #: project's Segmenter prompts with retrieved references, which a learned prompt replaces)
    mode: str = "full"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: per-image side the tiny SegGPT (made at 16 px) is tuned and published at by default
TINY_TUNE_SIZE = 32


def default_settings(spec: ModelSpec, config: Any, *, seed: int = 0,
                     image_size: int | None = None) -> TuneSettings:
    """Settings that suit the base model.

    The tiny test SegGPT (16 px, random weights) learns from scratch: a high rate, many cheap
    steps and smooth-L1 beta 1, without which it sat at all-background for hundreds of steps
    (see `TuneSettings.loss_beta`). It is tuned at TINY_TUNE_SIZE px per image: at its own 16 px
    a lesion of a clear image is smaller than a model pixel and the held-out Dice stalls at ~0.5
    (README, "Tuning the segmenter"). A real SegGPT keeps its own size (448) and is adjusted
    gently, with its own loss, 4 pairs a step and activation checkpointing.
    """
    height, _width = seggpt_input_size(config)
    if spec.tiny or height <= 64:
        # 150 epochs at 32 px: held-out Dice through `run` 0.73 (60 epochs: 0.53; 150 at 16
        # px: 0.49); a pair at 32 px costs ~4x one at 16 (README, "Tuning the segmenter")
        return TuneSettings(epochs=150, batch_size=16, lr=3e-3, steps_per_epoch=8,
                            weight_decay=0.0, seed=seed, loss_beta=1.0,
                            image_size=image_size or max(TINY_TUNE_SIZE, height))
    # SegGPT-L: ~1.2 TFLOP per pair forward; 4 pairs a step fit 24 GB with checkpointing.
    return TuneSettings(epochs=10, batch_size=4, lr=1e-5, seed=seed,
                        gradient_checkpointing=True, image_size=image_size or height)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """A relative-position table (L, head_dim) resampled to `length` rows, exactly as
    transformers' `SegGptAttention.get_rel_pos` resamples it at run time (linear, corners not
    aligned): a model given the resized table runs as the original would at the new size."""
    if rel_pos.shape[0] == length:
        return rel_pos.detach().clone()
    resized = torch.nn.functional.interpolate(
        rel_pos.detach().reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
        size=length, mode="linear")
    return resized.reshape(-1, length).permute(1, 0).contiguous()


def resize_seggpt(model: torch.nn.Module, image_size: int) -> torch.nn.Module:
    """`model` (SegGptForImageSegmentation) rebuilt for `image_size` px per image (2N x N
    stacked), weights carried over; the model itself when it already has that size.

    The config is the base's with `image_size=[2N, N]`; `pretrain_image_size` is kept, so the
    absolute position embeddings keep their stored size and transformers interpolates them at
    run time (bicubic), as it already does. Every attention layer's `rel_pos_h` / `rel_pos_w`
    ((2 x grid - 1, head_dim), grid = side // patch size) is resampled by `resize_rel_pos`.
    """
    from transformers import SegGptForImageSegmentation

    config: Any = model.config
    patch = int(config.patch_size)
    if image_size < patch or image_size % patch:
        raise UsageError(f"--image-size {image_size}: give a multiple of the model's patch size "
                         f"({patch} px)")
    if seggpt_input_size(config) == (image_size, image_size):
        return model
    new_config = copy.deepcopy(config)
    new_config.image_size = [2 * image_size, image_size]
    new_model: Any = SegGptForImageSegmentation(new_config)
    target = new_model.state_dict()
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(("rel_pos_h", "rel_pos_w")):
            value = resize_rel_pos(value, int(target[key].shape[0]))
        state[key] = value
    new_model.load_state_dict(state, strict=True)
    new_model.to(dtype=next(model.parameters()).dtype)
    new_model.train(model.training)
    return new_model


@dataclass(frozen=True)
class TuneData:
    """Reference images (uint8 RGB), their manual masks (bool, any size) and their patients."""

    images: Sequence[np.ndarray]
    masks: Sequence[np.ndarray]
    patients: Sequence[Hashable]

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.masks) == len(self.patients):
            raise ValueError("images, masks and patients differ in length")


@dataclass(frozen=True)
class TuneStatus:
    """What a progress callback hears: after each step, and once with the CPU estimate."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    pairs_per_second: float
    #: set once, before training, when a step was timed to estimate the whole run
    estimate_seconds: float | None = None


TuneProgress = Callable[[TuneStatus], None]


@dataclass
class TuneResult:
    model: torch.nn.Module
    loss_curve: list[float]
    #: the epoch a resumed run started at (0: a fresh run)
    resumed_at: int
    seconds: float
    pairs_per_second: float
    extra: dict[str, Any] = field(default_factory=dict)


def patient_codes(patients: Sequence[Hashable]) -> np.ndarray:
    """Patients as small integers (equal patients, equal codes)."""
    index: dict[Hashable, int] = {}
    return np.array([index.setdefault(p, len(index)) for p in patients], dtype=np.int64)


def sample_pairs(patients: np.ndarray, queries: np.ndarray, rng: np.random.Generator
                 ) -> np.ndarray:
    """For each query index a prompt index of another patient: (n, 2) rows (query, prompt)."""
    prompts = np.empty(len(queries), dtype=np.int64)
    everyone = np.arange(len(patients))
    for row, query in enumerate(queries):
        others = everyone[patients != patients[query]]
        if len(others) == 0:
            raise UsageError("tuning needs references of at least two patients")
        prompts[row] = others[rng.integers(len(others))]
    return np.stack([queries, prompts], axis=1)


def training_inputs(model: Any, prompt_px: torch.Tensor, prompt_masks: torch.Tensor,
                    query_px: torch.Tensor, query_masks: torch.Tensor,
                    prompt_masked: np.ndarray | None = None) -> dict[str, Any]:
    """Keyword arguments of `SegGptForImageSegmentation.forward` for a training step.

    Images and masks are (B, 3, h, w) as `preprocess_images` / `preprocess_masks` make them;
    the query half of the stacked mask input (`labels`) is masked, as at inference, and with
    `prompt_masked` ((B, patches of one half) bool) those prompt patches too.
    """
    num_patches = model.model.embeddings.patch_embeddings.num_patches
    masked = torch.zeros(query_px.shape[0], num_patches, dtype=torch.bool,
                         device=query_px.device)
    masked[:, num_patches // 2:] = True
    if prompt_masked is not None:
        masked[:, : num_patches // 2] = torch.from_numpy(prompt_masked).to(query_px.device)
    return {"pixel_values": query_px, "prompt_pixel_values": prompt_px,
            "prompt_masks": prompt_masks, "labels": query_masks, "bool_masked_pos": masked}


class _Tensors:
    """The training references preprocessed once, on the device."""

    def __init__(self, model: Any, spec: ModelSpec, data: TuneData, device: torch.device
                 ) -> None:
        common: dict[str, Any] = {"size": seggpt_input_size(model.config), "mean": spec.mean,
                                  "std": spec.std, "device": device}
        self.images = preprocess_images(list(data.images), resample=spec.resample, **common)
        self.masks = preprocess_masks(list(data.masks), **common)

    def batch(self, pairs: np.ndarray, flips: np.ndarray | None, model: Any,
              device: torch.device, prompt_masked: np.ndarray | None = None
              ) -> dict[str, Any]:
        query = torch.from_numpy(pairs[:, 0]).to(device)
        prompt = torch.from_numpy(pairs[:, 1]).to(device)
        tensors = [self.images[prompt], self.masks[prompt], self.images[query],
                   self.masks[query]]
        if flips is not None and flips.any():
            flip = torch.from_numpy(flips).to(device).view(-1, 1, 1, 1)
            tensors = [torch.where(flip, t.flip(-1), t) for t in tensors]
        prompt_px, prompt_mask, query_px, query_mask = tensors
        return training_inputs(model, prompt_px, prompt_mask, query_px, query_mask,
                               prompt_masked=prompt_masked)


def _load_checkpoint(folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    return load_checkpoint(
        folder, fingerprint,
        foreign="holds a checkpoint of a tuning run with other settings or data: rerun that "
        "command to finish it, or delete the folder to start afresh")


def _checkpointing(model: Any, action: str) -> None:
    # transformers 5 calls it activation checkpointing; gradient_checkpointing_* warns there
    method = getattr(model, f"activation_checkpointing_{action}", None)
    if method is None:
        method = getattr(model, f"gradient_checkpointing_{action}")
    method()


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def tune_seggpt(
    model: torch.nn.Module,
    spec: ModelSpec,
    data: TuneData,
    settings: TuneSettings,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    checkpoint_dir: Path | None = None,
    fingerprint: dict[str, Any] | None = None,
    estimate: bool = False,
    progress: TuneProgress | None = None,
) -> TuneResult:
    """Fine-tune `model` (SegGptForImageSegmentation, float32) in place on pairs of `data`.

    With `checkpoint_dir`, the model and optimiser are saved after every epoch and a run with
    the same `fingerprint` resumes after the last saved epoch. With `estimate`, one step is
    timed first (forward and backward, weights unchanged) and reported as `estimate_seconds`.
    """
    if settings.mode != "full":
        raise UsageError(f"tuning mode {settings.mode!r} is not offered: use full")
    codes = patient_codes(data.patients)
    if len(set(codes.tolist())) < 2:
        raise UsageError("tuning needs manual masks of at least two patients (prompt and query "
                         "always come from different patients)")
    if settings.image_size is not None and (
            seggpt_input_size(model.config) != (settings.image_size, settings.image_size)):
        raise UsageError(f"the model runs at {seggpt_input_size(model.config)} px per image, "
                         f"the settings say {settings.image_size}: resize_seggpt it first")
    fingerprint = dict(fingerprint or {}, settings=settings.as_dict())
    model.to(device)
    model.train()
    model.requires_grad_(True)
    if settings.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UsageError(f"{type(model).__name__} does not support gradient checkpointing")
        # transformers 5 renamed it activation checkpointing (the old name warns)
        _checkpointing(model, "enable")
    tensors = _Tensors(model, spec, data, device)
    config: Any = model.config
    saved_beta = config.beta
    if settings.loss_beta is not None:
        config.beta = settings.loss_beta
    try:
        return _train(model, data, settings, codes, tensors, device=device, dtype=dtype,
                      checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
                      estimate=estimate, progress=progress)
    finally:
        config.beta = saved_beta


def _train(model: torch.nn.Module, data: TuneData, settings: TuneSettings, codes: np.ndarray,
           tensors: _Tensors, *, device: torch.device, dtype: torch.dtype,
           checkpoint_dir: Path | None, fingerprint: dict[str, Any], estimate: bool,
           progress: TuneProgress | None) -> TuneResult:
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    count = len(codes)
    steps = settings.steps_per_epoch or max(1, math.ceil(count / settings.batch_size))
    total_steps = steps * settings.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps)
                                                       / total_steps)))
    loss_curve: list[float] = []
    start = 0
    if checkpoint_dir is not None:
        state = _load_checkpoint(checkpoint_dir, fingerprint)
        if state is not None:
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            loss_curve = [float(v) for v in state["loss_curve"]]
            start = int(state["epoch"])
    if estimate and start < settings.epochs:
        pairs = sample_pairs(codes, np.arange(min(settings.batch_size, count)),
                             np.random.default_rng([settings.seed, 2**31]))
        began = time.perf_counter()
        with autocast(device, dtype):
            loss = model(**tensors.batch(pairs, None, model, device)).loss
        loss.backward()
        optimiser.zero_grad(set_to_none=True)
        step_seconds = time.perf_counter() - began
        if progress is not None:
            progress(TuneStatus(start, settings.epochs, 0, steps, float("nan"), 0.0,
                                estimate_seconds=step_seconds
                                * (settings.epochs - start) * steps))
    began = time.perf_counter()
    pairs_done = 0
    for epoch in range(start, settings.epochs):
        rng = _epoch_rng(settings.seed, epoch)
        torch.manual_seed(settings.seed * 100_003 + epoch)  # drop path
        need = steps * settings.batch_size
        order = np.concatenate([rng.permutation(count) for _ in range(-(-need // count))])
        pairs = sample_pairs(codes, order[:need], rng)
        flips = rng.random(need) < 0.5 if settings.flip else None
        half = int(model.model.embeddings.patch_embeddings.num_patches) // 2  # type: ignore[union-attr, arg-type]
        hidden = (rng.random((need, half)) < settings.prompt_mask_ratio
                  if settings.prompt_mask_ratio > 0 else None)
        losses = []
        for step in range(steps):
            chunk = slice(step * settings.batch_size, (step + 1) * settings.batch_size)
            inputs = tensors.batch(pairs[chunk], None if flips is None else flips[chunk],
                                   model, device, None if hidden is None else hidden[chunk])
            with autocast(device, dtype):
                loss = model(**inputs).loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
            pairs_done += len(pairs[chunk])
            if progress is not None:
                elapsed = time.perf_counter() - began
                progress(TuneStatus(epoch + 1, settings.epochs, step + 1, steps, losses[-1],
                                    pairs_done / elapsed if elapsed > 0 else 0.0))
        loss_curve.append(float(np.mean(losses)))
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, {
                "fingerprint": fingerprint, "epoch": epoch + 1, "loss_curve": loss_curve,
                "model": model.state_dict(), "optimizer": optimiser.state_dict(),
                "schedule": schedule.state_dict()})
    seconds = time.perf_counter() - began
    if settings.gradient_checkpointing:
        _checkpointing(model, "disable")
    model.eval()
    model.requires_grad_(False)
    return TuneResult(model=model, loss_curve=loss_curve, resumed_at=start, seconds=seconds,
                      pairs_per_second=pairs_done / seconds if seconds > 0 else 0.0)


def score_held_out(
    segmenter: Segmenter,
    prompts: Sequence[PromptPair],
    queries: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    *,
    k: int = 2,
    seed: int = 0,
) -> OverlapSummary:
    """Dice and IoU of each query's mask (K prompts drawn by `seed` from `prompts`, as the
    project's Segmenter runs them) against its true mask, at the true mask's size."""
    if not queries:
        return summarise([])
    rng = np.random.default_rng(seed)
    k = min(k, len(prompts))
    chosen = [[prompts[int(i)] for i in rng.choice(len(prompts), size=k, replace=False)]
              for _ in queries]
    results = segmenter.segment(list(queries), chosen,
                                out_sizes=[truth.shape[:2] for truth in truths])
    return summarise((r.mask, t) for r, t in zip(results, truths, strict=True))
