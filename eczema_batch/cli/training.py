"""The severity head: train, evaluate, heads list/use."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from eczema_batch.cli.common import (
    JsonOption,
    SegmenterOption,
    VerbatimOption,
    _catalogue,
    _emit_json,
    _progress,
    _settings,
    app,
    command,
    err,
    heads_app,
    literal,
)
from eczema_batch.errors import UsageError

if TYPE_CHECKING:  # the training package imports torch: only when a command needs it
    from eczema_batch.training.heads import HeadSummary

ClassWeightsOption = Annotated[
    str, typer.Option("--class-weights", help="balanced (weigh each class's loss by the inverse "
                      "of its frequency) or none.")
]
SegmenterModelOption = Annotated[
    str | None, typer.Option(help="Segmenter model name (ECZEMA_BATCH_SEGMENTER_MODEL).")
]
EmbedderModelOption = Annotated[
    str | None, typer.Option(help="Embedder model name (ECZEMA_BATCH_EMBEDDER_MODEL).")
]
SegmenterModelsOption = Annotated[
    list[str] | None, typer.Option(
        "--segmenter-model", help="Segmenter model name (ECZEMA_BATCH_SEGMENTER_MODEL); give it "
        "twice or more to compare segmenters on the same folds and patients.")
]
EmbedderModelsOption = Annotated[
    list[str] | None, typer.Option(
        "--embedder-model", help="Embedder model name (ECZEMA_BATCH_EMBEDDER_MODEL); give it "
        "twice or more to compare embedders on the same folds and patients.")
]
ModelDirOption = Annotated[
    Path | None, typer.Option(help="Folder of model weights (ECZEMA_BATCH_MODEL_DIR).")
]
ReferenceLabelOption = Annotated[
    str | None, typer.Option(help="Which label is an image's truth: newest, majority or "
                             "adjudicator:NAME (ECZEMA_BATCH_REFERENCE_LABEL).")
]


EpochsOption = Annotated[int | None, typer.Option(
    min=1, help="Training epochs (default: the paper's 50; 300 for the tiny test embedders).")]
LrOption = Annotated[float | None, typer.Option(
    help="Adam learning rate (default: the paper's 1e-4; 1e-2 for the tiny test embedders).")]


def _train_settings(config: Any, epochs: int | None, lr: float | None, hidden: int,
                    dropout: float, seed: int, class_weights: str, batch_size: int) -> Any:
    """The head's training settings; the schedule not given suits the embedder of `config`."""
    from eczema_batch.pipeline.registry import get_spec
    from eczema_batch.pipeline.train import TrainSettings, default_schedule

    tiny = get_spec(config.embedder_model, model_dir=config.model_dir).tiny
    default_epochs, default_lr = default_schedule(tiny=tiny)
    epochs = default_epochs if epochs is None else epochs
    lr = default_lr if lr is None else lr
    return TrainSettings(epochs=epochs, lr=lr, hidden=hidden, dropout=dropout, seed=seed,
                         class_weights=class_weights, batch_size=batch_size)  # type: ignore[arg-type]


def _head_row(table: Table, head: HeadSummary) -> None:
    f1 = head.in_sample_weighted_f1
    features = f"{head.embedder} + {head.segmenter or 'no segmenter'} ({head.segmenter_mode})"
    table.add_row(str(head.id), "*" if head.active else "", literal(head.name),
                  literal(features), str(head.images), "-" if f1 is None else f"{f1:.3f}",
                  (head.created_at or "")[:10])


def _heads_table(heads: list[HeadSummary], title: str) -> Table:
    table = Table(title=title)
    for column in ("id", "active", "name", "features", "images", "in-sample wF1", "created"):
        table.add_column(column)
    for head in heads:
        _head_row(table, head)
    return table


@command(app)
def train(
    study: Annotated[str | None, typer.Option(help="Only this study's labelled images.")] = None,
    epochs: EpochsOption = None,
    lr: LrOption = None,
    hidden: Annotated[int, typer.Option(min=1, help="Hidden width (paper: 128).")] = 128,
    dropout: Annotated[float, typer.Option(help="Dropout (paper: 0.3).")] = 0.3,
    seed: Annotated[int, typer.Option(help="Seed: the same seed trains the same head.")] = 0,
    class_weights: ClassWeightsOption = "balanced",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per training step.")] = 32,
    segmenter: SegmenterOption = "seggpt",
    segmenter_model: SegmenterModelOption = None,
    embedder_model: EmbedderModelOption = None,
    model_dir: ModelDirOption = None,
    name: Annotated[str | None, typer.Option(help="A name for the head.")] = None,
    reference_label: ReferenceLabelOption = None,
    no_activate: Annotated[
        bool, typer.Option("--no-activate", help="Keep the current active head.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Train the severity head on the labelled images' lesion-crop embeddings.

    Uses the newest label of each image and the embeddings `eczema-batch run` stored for the
    same models and --segmenter; the head is saved in the catalogue and becomes the one
    `eczema-batch run` predicts with (unless --no-activate). Figures printed are in-sample:
    `eczema-batch evaluate` estimates accuracy.

    Example: eczema-batch train --segmenter seggpt --epochs 50 --lr 1e-4 --seed 0
    """
    from eczema_batch.measuring.config import RunConfig
    from eczema_batch.training.train import train_head

    settings = _settings()
    config = RunConfig.from_settings(
        settings, segmenter_mode=segmenter, segmenter_model=segmenter_model,
        embedder_model=embedder_model, model_dir=str(model_dir) if model_dir else None,
    )
    train_settings = _train_settings(config, epochs, lr, hidden, dropout, seed, class_weights,
                                     batch_size)
    trained = train_head(_catalogue(settings), config=config, settings=train_settings,
                         study=study, activate=not no_activate, name=name,
                         reference_label=reference_label or settings.reference_label)
    if as_json:
        _emit_json(trained.as_dict())
        return
    head = trained.head
    err.print(_heads_table([head], f"trained head {head.id}"))
    counts = ", ".join(f"{literal(c)} {n}" for c, n in zip(head.classes, trained.class_counts,
                                                            strict=True))
    err.print(f"labelled images per class: {counts}; final training loss "
              f"{trained.final_loss:.4f}")
    if head.active:
        err.print(f"head {head.id} is active: `eczema-batch run` predicts with it")
    else:
        err.print(f"head {head.id} is not active: eczema-batch heads use {head.id}")


@command(app)
def evaluate(
    study: Annotated[str | None, typer.Option(help="Only this study's labelled images.")] = None,
    folds: Annotated[int, typer.Option(min=2, help="Folds, grouped by patient.")] = 5,
    repeats: Annotated[int, typer.Option(min=1, help="Repeats with different seeds.")] = 3,
    segmenter: SegmenterOption = "seggpt",
    fractions: Annotated[
        str, typer.Option(help="Data-scaling curve: fractions of training patients.")
    ] = "0.2,0.4,0.6,0.8,1.0",
    seed: Annotated[int, typer.Option(help="Seed of splits, heads and bootstrap.")] = 0,
    epochs: EpochsOption = None,
    lr: LrOption = None,
    hidden: Annotated[int, typer.Option(min=1, help="Hidden width (paper: 128).")] = 128,
    dropout: Annotated[float, typer.Option(help="Dropout (paper: 0.3).")] = 0.3,
    class_weights: ClassWeightsOption = "balanced",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per training step.")] = 32,
    bootstrap: Annotated[int, typer.Option(min=1, help="Patient bootstrap replicates.")] = 1000,
    no_ablation: Annotated[
        bool, typer.Option("--no-ablation", help="Skip the with/without segmentation ablation.")
    ] = False,
    segmenter_model: SegmenterModelsOption = None,
    embedder_model: EmbedderModelsOption = None,
    model_dir: ModelDirOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the whole report as JSON to FILE.")
    ] = None,
    as_json: JsonOption = False,
    predictions: Annotated[
        Path | None, typer.Option(help="Write the head's out-of-fold predictions as CSV.")
    ] = None,
    verbatim: VerbatimOption = False,
    reference_label: ReferenceLabelOption = None,
    no_subgroups: Annotated[bool, typer.Option(
        "--no-subgroups", help="Skip the subgroup section (per skin tone, body site, device; "
        "estimates the skin tone of images the manifest gives none).")] = False,
    robustness: Annotated[bool, typer.Option(
        "--robustness", help="Also re-measure held-out images under blur, brightness, noise, "
        "JPEG and white-balance perturbations (first repeat's folds; nothing stored).")] = False,
    robustness_images: Annotated[int | None, typer.Option(
        min=1, help="--robustness: at most this many held-out images, spread over patients "
        "(default 200).")] = None,
) -> None:
    """Cross-validate the method by patient and report it with error bars.

    Folds are grouped by patient and stratified by severity; prompts come only from the
    training fold's references, never the image's own patient. Reports the head beside a
    majority-class baseline and a logistic-regression probe, the segmentation ablation, the
    data-scaling curve and SegGPT's Dice/IoU against manual masks. Masks and embeddings are
    cached in the catalogue: repeating the command reuses them and gives the same numbers.

    Patients whose labels or masks trained a derived model in use are never scored (they still
    train the heads). Give --embedder-model (or --segmenter-model) more than once to compare
    models side by side: the same folds and patients, the difference with a paired interval.

    Example: eczema-batch evaluate --folds 5 --repeats 3 -o report.json --predictions oof.csv

    Example: eczema-batch evaluate --embedder-model dino-vitb16 --embedder-model dino-study
    """
    from eczema_batch.measuring.config import RunConfig
    from eczema_batch.output import output_file
    from eczema_batch.training.evaluate import (
        ROBUSTNESS_IMAGES,
        EvaluationSettings,
        run_evaluation,
    )
    from eczema_batch.training.report import (
        report_json,
        summary_tables,
        write_predictions_csv,
    )

    if robustness_images is not None and not robustness:
        raise UsageError("--robustness-images caps the --robustness pass: give --robustness too")
    try:
        fraction_values = tuple(float(f) for f in fractions.split(",") if f.strip())
    except ValueError:
        raise UsageError(f"--fractions {fractions!r}: give numbers such as 0.2,0.5,1.0") from None
    # None: the configured model (settings, environment)
    none: list[str | None] = [None]
    embedders: list[str | None] = [*embedder_model] if embedder_model else none
    segmenters: list[str | None] = [*segmenter_model] if segmenter_model else none
    if len(embedders) > 1 and len(segmenters) > 1:
        raise UsageError("compare embedders or segmenters, one kind at a time: give "
                         "--embedder-model or --segmenter-model once")
    settings = _settings()
    configs = [
        RunConfig.from_settings(
            settings, segmenter_mode=segmenter, segmenter_model=seg, embedder_model=emb,
            model_dir=str(model_dir) if model_dir else None,
        )
        for emb in embedders for seg in segmenters
    ]
    eval_settings = EvaluationSettings(
        folds=folds, repeats=repeats, segmenter=segmenter,  # type: ignore[arg-type]
        fractions=fraction_values, seed=seed, bootstrap=bootstrap, ablation=not no_ablation,
        train=_train_settings(configs[0], epochs, lr, hidden, dropout, seed, class_weights,
                              batch_size),
        reference_label=reference_label or settings.reference_label,
        subgroups=not no_subgroups,
        robustness_images=(robustness_images or ROBUSTNESS_IMAGES) if robustness else None,
    )
    stage = {"name": ""}
    with _progress("evaluating") as update:

        def on_progress(name: str, done: int, total: int) -> None:
            if name != stage["name"]:
                stage["name"] = name
                err.print(f"  {name}", highlight=False)
            update(done, total)

        result = run_evaluation(_catalogue(settings), config=configs[0], settings=eval_settings,
                                study=study, progress=on_progress, compare=configs[1:])
    if predictions is not None:
        with output_file(predictions) as out:
            write_predictions_csv(result.predictions, out, verbatim=verbatim)
    if output is not None or as_json:
        text = report_json(result.report)
        if output is not None:
            with output_file(output) as out:
                out.write(text)
        if as_json:
            sys.stdout.write(text)
    for title, columns, rows in summary_tables(result.report):
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*map(literal, row))
        err.print(table)
    run = result.report.run
    err.print(f"model forwards: {run.forwards.as_dict()} (per-fold recomputation would need "
              f"{run.naive_forwards.as_dict()}); {run.total_seconds:.1f} s")


@command(heads_app, "list")
def heads_list(as_json: JsonOption = False) -> None:
    """List the trained severity heads; the active one is marked.

    Example: eczema-batch heads list --json
    """
    from eczema_batch.training.heads import list_heads

    factory = _catalogue(_settings())
    with factory() as session:
        heads = list_heads(session)
    if as_json:
        _emit_json([head.as_dict() for head in heads])
    elif not heads:
        err.print("no heads trained yet: eczema-batch train")
    else:
        err.print(_heads_table(heads, "severity heads"))


@command(heads_app, "use")
def heads_use(
    head_id: Annotated[int, typer.Argument(help="The head's id (eczema-batch heads list).")],
    as_json: JsonOption = False,
) -> None:
    """Make a head the active one for its features; `eczema-batch run` predicts with it.

    Example: eczema-batch heads use 3
    """
    from eczema_batch.training.heads import use_head

    factory = _catalogue(_settings())
    with factory() as session, session.begin():
        used = use_head(session, head_id)
    if as_json:
        _emit_json(used.as_dict())
    else:
        head = used.head
        replaced = ", ".join(map(str, used.replaced)) or "none"
        err.print(f"head {head.id} ({literal(head.name)}) is active for "
                  f"{literal(head.embedder)} with --segmenter {head.segmenter_mode}; "
                  f"replaced: {replaced}", highlight=False)


