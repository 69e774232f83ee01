"""Adapting the embedder to a study: `models adapt-embedder` (self-supervised DINO)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
from eczema_batch.errors import UsageError


@command(models_app, "adapt-embedder")
def models_adapt_embedder(
    name: Annotated[str, typer.Option(help="Name of the new model (its folder in the model "
                                      "folder; choose it with --embedder-model NAME).")],
    base: Annotated[str | None, typer.Option(
        "--from", help="The model to start from (default: ECZEMA_BATCH_EMBEDDER_MODEL).")] = None,
    study: Annotated[str | None, typer.Option(help="Only this study's images.")] = None,
    epochs: Annotated[int | None, typer.Option(
        min=1, help="Epochs (default: 30; 60 for tiny models).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=2, help="Images per step, each cut into 2 global and several local crops "
        "(default 64; 16 for tiny models).")] = None,
    lr: Annotated[float | None, typer.Option(
        help="Peak learning rate of the head (default: 5e-4 x batch size / 256, DINO's rule; "
        "5e-4 for tiny models).")] = None,
    colour: Annotated[str, typer.Option(
        help="planckian (illuminant, brightness and contrast only: redness is kept) or "
        "standard (DINO's hue/saturation jitter, grayscale, solarisation).")] = "planckian",
    views: Annotated[str | None, typer.Option(
        help="crops (the lesion crops the head sees, from each image's newest predicted mask; "
        "the whole image where it has none) or images (whole images, the default).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the head, crops and batch order.")] = 0,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Recompute activations: less GPU memory, slower.")
    ] = False,
    model_dir: Annotated[Path | None, typer.Option(
        help="Folder of model weights (ECZEMA_BATCH_MODEL_DIR).")] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Replace an existing model of that name.")] = False,
    restart: Annotated[bool, typer.Option(
        "--restart", help="Discard a checkpoint left by an earlier, different run.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Adapt the embedder to the catalogue's images with self-supervised DINO (no labels).

    A student and an EMA teacher learn from crops of each image (never two images of one
    patient as a pair), with colour kept: only the illuminant, brightness and contrast vary.
    Checkpoints every epoch: the same command after a kill resumes. The result is written to
    the model folder as NAME and used with --embedder-model NAME.

    Example: eczema-batch models adapt-embedder --name dino-study --from tiny-dino
    """
    from eczema_batch.measuring.config import RunConfig
    from eczema_batch.pipeline.adapt import AdaptSettings, defaults_for
    from eczema_batch.pipeline.augment import COLOURS
    from eczema_batch.training.adapt_embedder import adapt_study_embedder

    if colour not in COLOURS:
        raise UsageError(f"--colour {colour!r}: use one of {', '.join(COLOURS)}")
    if views not in (None, "crops", "images"):
        raise UsageError(f"--views {views!r}: use crops or images")
    settings = _settings()
    config = RunConfig.from_settings(settings, device=device,
                                     model_dir=str(model_dir) if model_dir else None)

    def settings_of(image_size: int, tiny: bool) -> AdaptSettings:
        return defaults_for(image_size=image_size, tiny=tiny, epochs=epochs,
                            batch_size=batch_size, lr=lr, colour=colour, seed=seed,
                            gradient_checkpointing=gradient_checkpointing)

    last = {"stage": ""}
    with _progress("adapting") as update:

        def on_progress(stage: str, done: int, total: int) -> None:
            # one line per epoch (and for reading the images): its loss and throughput
            if stage.split(" (")[0] != last["stage"].split(" (")[0] and last["stage"]:
                err.print(f"  {literal(last['stage'])}", highlight=False)
            last["stage"] = stage
            update(done, total)

        def notice(message: str) -> None:
            err.print(literal(message), highlight=False)

        adapted = adapt_study_embedder(
            _catalogue(settings), config=config, name=name,
            base=base or config.embedder_model, study=study, settings_of=settings_of,
            views=views,
            replace_existing=replace, restart=restart, progress=on_progress, notice=notice,
        )
    if last["stage"]:
        err.print(f"  {literal(last['stage'])}", highlight=False)
    summary: dict[str, Any] = adapted.as_dict()
    if as_json:
        _emit_json(summary)
        return
    curve = ", ".join(f"{v:.3f}" for v in adapted.identity.loss_curve)
    err.print(f"adapted {literal(adapted.identity.base)} on {adapted.images} images of "
              f"{summary['patients']} patients ({adapted.skipped} unreadable, skipped); "
              f"{adapted.images_per_second:.1f} images/s; loss per epoch: {curve}",
              highlight=False)
    err.print(f"written to {literal(adapted.folder)}: use it with --embedder-model "
              f"{literal(adapted.identity.name)}", highlight=False)
