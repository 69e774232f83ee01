"""`eczema-batch skin-tone`: estimate every image's skin tone (ITA) for the subgroup analyses."""

from __future__ import annotations

from rich.table import Table

from eczema_batch.cli.common import (
    JsonOption,
    _catalogue,
    _emit_json,
    _settings,
    app,
    command,
    err,
    literal,
)
from eczema_batch.cli.reports import StudyOption, _print_wide


@command(app, "skin-tone")
def skin_tone(study: StudyOption = None, as_json: JsonOption = False) -> None:
    """Estimate every image's skin tone and count the images of each skin-tone group.

    The Individual Typology Angle (CIELAB) of the skin outside the image's lesion mask (its manual
    mask, else its newest predicted mask, else the whole image), stored with the image. An image's
    group is the manifest's Fitzpatrick type where given, else its ITA category, shown as
    estimated: in `evaluate`'s subgroups and the image export. `evaluate` estimates the images it
    scores by itself; this command does every readable image, labelled or not. An estimate is
    made again only when the image's mask changed.

    Example: eczema-batch skin-tone --study trial
    """
    from eczema_batch.measuring.skintone import estimate_catalogue_tones
    from eczema_batch.training.data import study_id

    settings = _settings()
    factory = _catalogue(settings)
    with factory() as session, session.begin():
        done, groups = estimate_catalogue_tones(
            session, study_id=study_id(session, study),
            image_root=str(settings.image_root) if settings.image_root else None,
            max_pixels=settings.max_image_pixels, threads=settings.decode_threads)
    if as_json:
        _emit_json({"estimated": done.estimated, "unchanged": done.reused,
                    "failed": {str(k): v for k, v in done.failed.items()},
                    "groups": [{"group": g, "source": s, "images": n}
                               for (g, s), n in groups.items()]})
        return
    table = Table(title="images per skin-tone group")
    for column in ("group", "source", "images"):
        table.add_column(column)
    for (group, source), n in groups.items():
        table.add_row(literal(group), source, str(n))
    _print_wide(table)
    err.print(f"estimated {done.estimated}, unchanged {done.reused}, "
              f"not estimated {len(done.failed)}", highlight=False)
    for image_id, reason in list(done.failed.items())[:10]:
        err.print(f"  image {image_id}: {literal(reason)}", highlight=False)
