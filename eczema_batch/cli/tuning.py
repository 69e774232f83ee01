"""`models tune-segmenter`: tune SegGPT on the study's manual masks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from eczema_batch.cli.common import (
    JsonOption,
    _catalogue,
    _emit_json,
    _progress,
    _settings,
    command,
    err,
    literal,
    models_app,
)

if TYPE_CHECKING:
    from eczema_batch.pipeline.tune import TuneSettings, TuneStatus


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@command(models_app, "tune-segmenter")
def models_tune_segmenter(
    name: Annotated[str, typer.Option(help="Name of the tuned model (a folder in the model "
                                      "folder).")],
    base: Annotated[str | None, typer.Option(
        "--from", help="Segmenter to start from (ECZEMA_BATCH_SEGMENTER_MODEL).")] = None,
    study: Annotated[str | None, typer.Option(help="Only this study's references.")] = None,
    holdout: Annotated[float, typer.Option(
        help="Share of patients held out (their masks never train; scored at the end).")] = 0.2,
    epochs: Annotated[int | None, typer.Option(
        min=1, help="Epochs (default: suited to the base model).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Prompt-query pairs per step (default: suited to the base model).")] = None,
    lr: Annotated[float | None, typer.Option(
        help="AdamW learning rate (default: suited to the base model).")] = None,
    loss_beta: Annotated[float | None, typer.Option(
        help="Smooth-L1 beta of SegGPT's loss while training (default: the model's 0.01 for "
             "a real SegGPT, 1 for the tiny one).")] = None,
    image_size: Annotated[int | None, typer.Option(
        min=1, help="Per-image side (px) to tune and publish the model at; it sees prompt and "
                    "query stacked, 2N x N (default: the base's own, 448 for SegGPT-L; 32 for "
                    "the 16 px tiny model). A multiple of the patch size.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the hold-out, the pairs and the order.")] = 0,
    device: Annotated[str | None, typer.Option(
        help="auto, cpu, cuda or cuda:N (ECZEMA_BATCH_DEVICE).")] = None,
    model_dir: Annotated[Path | None, typer.Option(
        help="Model folder: the base is read and the tuned model written here "
             "(ECZEMA_BATCH_MODEL_DIR).")] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Replace an existing model of that name.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Tune SegGPT in context on the study's manual masks and save it as a model.

    Each training pair is one reference (image + manual mask) prompting another reference of a
    different patient, whose mask is the target. A share of patients is held out and both the
    base and the tuned model are scored on them (Dice). Checkpoints every epoch: the same
    command resumes a killed run. Use the result with --segmenter-model NAME.

    Example: eczema-batch models tune-segmenter --name seggpt-mystudy --from seggpt-vit-large
    --study mystudy --holdout 0.2 --seed 0
    """
    from eczema_batch.measuring.config import RunConfig
    from eczema_batch.training.tune_segmenter import tune_study_segmenter

    settings = _settings()
    config = RunConfig.from_settings(
        settings, device=device, model_dir=str(model_dir) if model_dir else None)

    def on_plan(tune: TuneSettings, training: int, held: int) -> None:
        err.print(f"tuning on {training} reference(s), {held} held out: {tune.epochs} epochs, "
                  f"batch {tune.batch_size}, lr {tune.lr:g}, {tune.image_size} px", highlight=False)

    with _progress("tuning the segmenter") as update:

        def on_progress(status: TuneStatus) -> None:
            if status.estimate_seconds is not None:
                err.print(f"one step on this device: the whole run takes about "
                          f"{_duration(status.estimate_seconds)} (Ctrl-C stops; the same "
                          "command resumes from the last epoch)", highlight=False)
                return
            update((status.epoch - 1) * status.steps + status.step,
                   status.epochs * status.steps)

        tuned = tune_study_segmenter(
            _catalogue(settings), config=config, name=name, base=base, study=study,
            holdout=holdout, seed=seed,
            overrides={"epochs": epochs, "batch_size": batch_size, "lr": lr,
                       "loss_beta": loss_beta, "image_size": image_size},
            replace_existing=replace, progress=on_progress, on_plan=on_plan,
        )
    identity = tuned.identity
    if as_json:
        _emit_json({"name": identity.name, "folder": str(tuned.folder),
                    "identity": identity.as_json()})
        return
    if tuned.resumed_at:
        err.print(f"resumed after epoch {tuned.resumed_at}", highlight=False)
    if tuned.unreadable:
        err.print(f"{tuned.unreadable} reference(s) could not be read and were left out",
                  highlight=False)
    err.print(f"{literal(identity.name)}: {literal(tuned.folder)} ({len(identity.images)} "
              f"training images, {len(identity.supervised)} patients; "
              f"{tuned.pairs_per_second:.1f} pairs/s)", highlight=False)
    if identity.loss_curve:
        err.print(f"loss {identity.loss_curve[0]:.4f} -> {identity.loss_curve[-1]:.4f}",
                  highlight=False)
    base_dice, tuned_dice = tuned.base_held_out.dice, tuned.tuned_held_out.dice
    if math.isnan(tuned_dice):
        err.print("no patients held out: no held-out score", highlight=False)
    else:
        err.print(f"held-out Dice ({tuned.tuned_held_out.images} images of "
                  f"{len(identity.holdout)} patients): base {base_dice:.3f}, tuned "
                  f"{tuned_dice:.3f}", highlight=False)
    folder = f" --model-dir {literal(tuned.folder.parent)}" if model_dir else ""
    err.print(f"use it: eczema-batch run --segmenter-model {literal(identity.name)}{folder}",
              highlight=False)
