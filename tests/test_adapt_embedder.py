"""`models adapt-embedder`: the DINO loss by hand, colour-keeping views, resume after a kill, the
derived model's identity, and the command end to end on a tiny catalogue."""

from __future__ import annotations

import colorsys
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Image, Patient, Study, Visit
from eczema_batch.cli import app
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.ingest.service import ingest_study
from eczema_batch.pipeline.adapt import adapt_embedder, defaults_for
from eczema_batch.pipeline.augment import MultiCrop, ViewSettings
from eczema_batch.pipeline.derived import PatientRef, read_identity
from eczema_batch.pipeline.dino_loss import DINOHead, DINOLoss, teacher_temperatures
from eczema_batch.pipeline.loading import load_embedder, load_trainable_backbone, weights_digest
from eczema_batch.synth import write_synthetic_study
from tests._model_fixtures import (
    one_torch_thread,  # noqa: F401
    tiny_model_dir,  # noqa: F401
)

# --- the loss by hand ---------------------------------------------------------------------------


def _softmax(row: list[float], temp: float) -> list[float]:
    exps = [math.exp(v / temp) for v in row]
    return [e / sum(exps) for e in exps]


#: crops x images x 3 outputs: 2 global crops and 1 local crop of 2 images
STUDENT = [[[0.2, -0.1, 0.4], [0.0, 0.3, -0.2]],
           [[0.1, 0.1, -0.3], [0.5, -0.4, 0.2]],
           [[-0.2, 0.3, 0.1], [0.2, 0.2, 0.0]]]
TEACHER = [[[0.03, -0.01, 0.02], [0.00, 0.05, -0.02]],
           [[0.01, 0.04, -0.03], [0.02, -0.01, 0.03]]]


def _by_hand(center: list[float], temp: float) -> float:
    """Mean over the 4 (teacher view, other student view) pairs of the batch-mean
    cross-entropy; pairs are always views of the same image (row b with row b)."""
    terms = []
    for iq in range(2):
        for v in range(3):
            if v == iq:
                continue
            per_image = []
            for b in range(2):
                q = _softmax([t - c for t, c in zip(TEACHER[iq][b], center, strict=True)], temp)
                p = _softmax(STUDENT[v][b], 0.1)
                per_image.append(-sum(qk * math.log(pk) for qk, pk in zip(q, p, strict=True)))
            terms.append(sum(per_image) / 2)
    return sum(terms) / len(terms)


def test_dino_loss_matches_a_hand_computed_case() -> None:
    temps = teacher_temperatures(warmup_temp=0.04, temp=0.07, warmup_epochs=2, epochs=3)
    assert temps.tolist() == pytest.approx([0.04, 0.07, 0.07])
    loss = DINOLoss(3, crops=3, teacher_temps=temps)
    student = torch.tensor(STUDENT).reshape(6, 3)  # view-major: view 0 of both images first
    teacher = torch.tensor(TEACHER).reshape(4, 3)

    first = loss(student, teacher, 0)
    assert first.item() == pytest.approx(_by_hand([0.0, 0.0, 0.0], 0.04), rel=1e-5)
    # the centre moved 10 % of the way to the teacher outputs' mean
    mean = [sum(TEACHER[i][b][k] for i in range(2) for b in range(2)) / 4 for k in range(3)]
    center = [0.1 * m for m in mean]
    assert loss.center[0].tolist() == pytest.approx(center, abs=1e-7)
    # next epoch: centred by it and sharpened less (warmup to 0.07)
    second = loss(student, teacher, 1)
    assert second.item() == pytest.approx(_by_hand(center, 0.07), rel=1e-5)
    assert second.item() != pytest.approx(first.item(), rel=1e-3)


def test_the_head_normalises_its_bottleneck_and_fixes_the_last_layers_norm() -> None:
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 64)
    weight = head.last_layer.weight
    assert torch.allclose(weight.norm(dim=1), torch.ones(64), atol=1e-5)
    # |output| <= 1: a unit vector times unit-norm rows
    assert out.abs().max() <= 1.0 + 1e-5
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad


def test_defaults_suit_the_base_model() -> None:
    tiny = defaults_for(image_size=32, tiny=True)
    assert (tiny.global_size, tiny.local_size, tiny.out_dim) == (32, 16, 256)
    real = defaults_for(image_size=224, tiny=False)
    assert (real.global_size, real.local_size, real.local_crops) == (224, 96, 6)
    assert real.lr == pytest.approx(5e-4 * 64 / 256)  # DINO's linear scaling rule
    assert defaults_for(image_size=224, tiny=False, batch_size=128).lr == pytest.approx(2.5e-4)
    assert defaults_for(image_size=224, tiny=False, lr=1e-5, epochs=None).lr == 1e-5
    assert real.teacher_temp == 0.07 and real.warmup_teacher_temp == 0.04
    assert real.colour == tiny.colour == "planckian"
    # the tiny backbone's features vary too little for DINO's plain head: batch norm keeps it
    # from collapsing to a uniform output; DINO's ViT recipe has none
    assert (tiny.head_bn, tiny.epochs, real.head_bn) == (True, 60, False)
    # batches of 16: four times the steps of 64 on a small study (README, "Adapting the embedder")
    assert (tiny.batch_size, real.batch_size) == (16, 64)


def test_the_head_can_batch_normalise_its_hidden_layers() -> None:
    torch.manual_seed(0)
    plain = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4)
    normed = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4, use_bn=True)
    kinds = [type(m).__name__ for m in normed.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.mlp)
    # nearly identical inputs (a tiny random backbone's features) still give distinct outputs
    x = 1.0 + 1e-3 * torch.randn(6, 8)
    spread = normed(x).std(dim=0).mean() / plain(x).std(dim=0).mean()
    assert spread > 10


# --- colour ------------------------------------------------------------------------------------

#: a lesion's red, as a float RGB in [0, 1]
RED = (0.75, 0.25, 0.22)


def _red_views(colour: str, draws: int = 64) -> np.ndarray:
    """The mean colour of every view of a red patch, (views * draws, 3)."""
    views = MultiCrop(ViewSettings(32, 16, 4, colour), mean=(0.5,) * 3,  # type: ignore[arg-type]
                      std=(0.5,) * 3)
    images = torch.tensor(RED).view(1, 3, 1, 1).expand(draws, 3, 48, 48).contiguous()
    torch.manual_seed(0)
    return torch.cat([v.mean(dim=(2, 3)) for v in views.raw(images)]).numpy()


def _hue_degrees(rgb: np.ndarray) -> np.ndarray:
    hue = np.array([colorsys.rgb_to_hsv(*map(float, c))[0] for c in rgb]) * 360.0
    return (hue + 180.0) % 360.0 - 180.0  # red around 0


def test_a_red_patch_stays_red_under_the_default_views() -> None:
    means = _red_views("planckian")
    assert len(means) == 6 * 64
    assert (means[:, 0] > means[:, 1:].max(axis=1) + 0.05).all()  # red dominant, every view
    assert np.abs(_hue_degrees(means)).max() < 30.0  # still a red hue


def test_the_standard_dino_colours_do_not_keep_it_red() -> None:
    means = _red_views("standard")
    not_red = (means[:, 0] <= means[:, 1:].max(axis=1) + 0.05) | (
        np.abs(_hue_degrees(means)) >= 30.0)
    assert not_red.mean() > 0.1  # grayscale (p 0.2) and hue jitter take the redness away


def test_views_keep_each_image_in_its_row() -> None:
    # Positives are crops of one image: row i of every view comes from image i only.
    images = torch.zeros(4, 3, 48, 48)
    for i in range(4):
        images[i, i % 3] = 0.2 + 0.2 * i
    views = MultiCrop(ViewSettings(32, 16, 2, "planckian"), mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.manual_seed(1)
    for view in views.raw(images):
        dominant = view.mean(dim=(2, 3)).argmax(dim=1).tolist()
        assert dominant == [0, 1, 2, 0]


# --- training: resume after a kill --------------------------------------------------------------


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8) for i in range(count)]


class Killed(Exception):
    pass


def test_a_killed_run_resumes_at_the_next_epoch_with_the_same_result(
    tiny_model_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    settings = defaults_for(image_size=32, tiny=True, epochs=3, batch_size=8, local_crops=2)
    images = _images(16)

    def run(checkpoints: Path | None, hook: object = None) -> object:
        backbone, spec, digest = load_trainable_backbone("tiny-dino", model_dir=tiny_model_dir)
        return adapt_embedder(backbone, images, settings=settings, mean=spec.mean,
                              std=spec.std, device=torch.device("cpu"), base_digest=digest,
                              checkpoint_dir=checkpoints, on_epoch_end=hook)  # type: ignore[arg-type]

    whole = run(None)

    def kill_after_first(epoch: int) -> None:
        if epoch == 1:
            raise Killed

    checkpoints = tmp_path / ".dino-x.checkpoint"
    with pytest.raises(Killed):
        run(checkpoints, kill_after_first)
    assert (checkpoints / "checkpoint.pt").is_file()
    epochs: list[int] = []
    resumed = run(checkpoints, epochs.append)
    assert resumed.resumed_from_epoch == 1  # type: ignore[attr-defined]
    assert epochs == [2, 3]
    assert resumed.loss_curve == whole.loss_curve  # type: ignore[attr-defined]
    assert len(whole.loss_curve) == 3  # type: ignore[attr-defined]
    theirs = whole.teacher.state_dict()  # type: ignore[attr-defined]
    for key, value in resumed.teacher.state_dict().items():  # type: ignore[attr-defined]
        assert torch.equal(value, theirs[key]), key
    base, _, _ = load_trainable_backbone("tiny-dino", model_dir=tiny_model_dir)
    assert not torch.equal(base.state_dict()["embeddings.cls_token"],
                           theirs["embeddings.cls_token"])  # it learnt something


# --- the command on a tiny catalogue ------------------------------------------------------------


def test_adapt_embedder_command_publishes_a_model_that_loads_by_name(
    factory: sessionmaker[Session], tiny_model_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    root = tmp_path / "study"
    write_synthetic_study(root, patients=3, visits=2, seed=0, size=(64, 48))
    assert ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).exit_code == 0
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir / "tiny-dino", models / "tiny-dino")

    args = ["models", "adapt-embedder", "--name", "dino-mine", "--from", "tiny-dino",
            "--epochs", "1", "--batch-size", "4", "--seed", "5", "--device", "cpu",
            "--model-dir", str(models)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)

    with factory() as session:
        rows = session.execute(
            select(Image.id, Study.name, Patient.subject_code)
            .join(Visit, Image.visit_id == Visit.id).join(Patient, Visit.patient_id == Patient.id)
            .join(Study, Image.study_id == Study.id).where(Image.decode_status == "ok")
        ).all()
    identity = read_identity(models / "dino-mine")
    assert identity is not None
    assert (identity.base, identity.method, identity.kind) == (
        "tiny-dino", "dino-adaptation", "embedder")
    assert identity.base_digest == weights_digest(models / "tiny-dino")
    assert identity.images == tuple(sorted(r[0] for r in rows))
    assert identity.unlabelled == tuple(sorted({PatientRef(r[1], r[2]) for r in rows}))
    assert identity.supervised == ()  # no label or mask trained it
    assert identity.seed == 5 and identity.settings["epochs"] == 1
    assert identity.settings["colour"] == "planckian" and identity.settings["batch_size"] == 4
    assert len(identity.loss_curve) == 1 and identity.created_at
    assert summary["images"] == len(rows) and summary["patients"] == 3
    assert not (models / ".dino-mine.checkpoint").exists()  # removed once published

    embedder = load_embedder("dino-mine", model_dir=models, device="cpu")
    base = load_embedder("tiny-dino", model_dir=models, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert embedder.identity.config["derived_from"]["base"] == "tiny-dino"
    assert not np.allclose(embedder.embed([image]), base.embed([image]))

    again = CliRunner().invoke(app, args)  # an existing name is kept unless --replace
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_adapting_sees_the_lesion_crops_of_the_predicted_masks(
    factory: sessionmaker[Session], tiny_model_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    from eczema_batch.catalogue.models import Mask
    from eczema_batch.imaging import encode_mask_png
    from eczema_batch.measuring.config import RunConfig
    from eczema_batch.training.adapt_embedder import _read_images, predicted_masks

    root = tmp_path / "study"
    write_synthetic_study(root, patients=2, visits=2, seed=0, size=(64, 48))
    assert ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).exit_code == 0
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir / "tiny-dino", models / "tiny-dino")
    args = ["models", "adapt-embedder", "--from", "tiny-dino", "--epochs", "1",
            "--batch-size", "4", "--device", "cpu", "--model-dir", str(models)]

    no_masks = CliRunner().invoke(app, [*args, "--name", "none", "--views", "crops"])
    assert no_masks.exit_code == 2 and "no image has a predicted mask" in no_masks.stderr
    assert CliRunner().invoke(app, [*args, "--name", "whole"]).exit_code == 0
    whole = read_identity(models / "whole")
    assert whole is not None and whole.settings["views"] == "images"

    with factory() as session:
        ids = sorted(session.scalars(select(Image.id)).all())
        width, height = session.execute(
            select(Image.width, Image.height).where(Image.id == ids[0])).one()
        lesion = np.zeros((height, width), dtype=bool)
        lesion[10:20, 30:50] = True
        for variant in ("old", "new"):  # the newest predicted mask is the one used
            session.add(Mask(image_id=ids[0], kind="predicted", variant=variant, width=width,
                             height=height, area_fraction=float(lesion.mean()),
                             png=encode_mask_png(lesion if variant == "new" else ~lesion)))
            session.commit()
        stored = predicted_masks(session, ids)
        assert list(stored) == [ids[0]] and stored[ids[0]] == encode_mask_png(lesion)

    masks = {ids[0]: encode_mask_png(lesion)}
    config = RunConfig(segmenter_model="tiny-seggpt", embedder_model="tiny-dino",
                       max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    kept, pixels, skipped = _read_images(factory, ids[:2], config=config, size=32,
                                         progress=None, masks=masks)
    assert kept == ids[:2] and skipped == 0
    crop, full = pixels
    assert crop.shape == full.shape == (32, 32, 3)
    assert not np.array_equal(crop, full)  # the lesion's box, resized, not the whole image

    assert CliRunner().invoke(app, [*args, "--name", "still-whole"]).exit_code == 0
    still = read_identity(models / "still-whole")  # whole images stay the default
    assert still is not None and still.settings["views"] == "images"
    assert CliRunner().invoke(app, [*args, "--name", "crops", "--views", "crops"]).exit_code == 0
    crops = read_identity(models / "crops")
    assert crops is not None and crops.settings["views"] == "crops"
    assert crops.extra["crops"] == 1  # the other images, without a mask, are seen whole
    assert crops.images == tuple(ids)
