"""Tuning SegGPT on the study's manual masks: transformers' loss, pairs, hold-out, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.cli import app
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.ingest.service import ingest_study
from eczema_batch.measuring.config import RunConfig
from eczema_batch.pipeline.checkpoints import CHECKPOINT_FILE
from eczema_batch.pipeline.derived import read_identity
from eczema_batch.pipeline.loading import (
    clear_model_cache,
    load_segmenter,
    load_trainable_segmenter,
)
from eczema_batch.pipeline.maskscore import dice, iou
from eczema_batch.pipeline.preprocess import MASK_FOREGROUND, preprocess_images, preprocess_masks
from eczema_batch.pipeline.tune import (
    TuneData,
    TuneSettings,
    TuneStatus,
    default_settings,
    patient_codes,
    resize_rel_pos,
    resize_seggpt,
    sample_pairs,
    training_inputs,
    tune_seggpt,
)
from eczema_batch.synth import write_synthetic_study
from eczema_batch.training.tune_segmenter import (
    checkpoint_folder,
    split_patients,
    tune_study_segmenter,
)
from tests._model_fixtures import (
    one_torch_thread,  # noqa: F401
    tiny_model_dir_fixture,  # noqa: F401
)

runner = CliRunner()
CPU = torch.device("cpu")


def _images(count: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(count):
        mask = np.zeros((24, 20), dtype=bool)
        top, left = rng.integers(0, 12, size=2)
        mask[top:top + 10, left:left + 8] = True
        image = rng.integers(0, 60, size=(24, 20, 3), dtype=np.uint8)
        image[mask] = (200, 40, 40)  # a red lesion on dark skin
        images.append(image)
        masks.append(mask)
    return images, masks


def _tiny(tiny_model_dir: Path) -> tuple[torch.nn.Module, object]:
    loaded = load_trainable_segmenter("tiny-seggpt", model_dir=tiny_model_dir)
    return loaded.model, loaded.spec


def test_labels_and_masked_patches_are_what_transformers_trains_on(
    tiny_model_dir: Path,
) -> None:
    model, spec = _tiny(tiny_model_dir)
    model.eval()  # no drop path: two forwards must agree
    images, masks = _images(2)
    common = {"size": (16, 16), "mean": spec.mean, "std": spec.std, "device": CPU}  # type: ignore[attr-defined]
    px = preprocess_images(images, resample="bicubic", **common)
    painted = preprocess_masks(masks, **common)
    # The palette of inference: lesion white, background black, then normalised.
    white = (MASK_FOREGROUND / 255.0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)  # type: ignore[attr-defined]
    assert torch.allclose(painted[0, :, 5, 5], white) or torch.allclose(
        painted[0, :, 5, 5], -torch.tensor(spec.mean) / torch.tensor(spec.std))  # type: ignore[attr-defined]
    inputs = training_inputs(model, px[:1], painted[:1], px[1:], painted[1:])
    masked = inputs["bool_masked_pos"]
    assert masked.shape == (1, 32) and not masked[0, :16].any() and masked[0, 16:].all()
    with torch.no_grad():
        out = model(**inputs)
        # transformers' default masking when training with labels is the query half too
        default = model(pixel_values=px[1:], prompt_pixel_values=px[:1],
                        prompt_masks=painted[:1], labels=painted[1:])
        # its loss: smooth L1 (beta) over the query half of the prediction vs the query mask
        by_hand = F.smooth_l1_loss(out.pred_masks[:, :, 16:], painted[1:],
                                   beta=model.config.beta)  # type: ignore[union-attr]
    assert torch.allclose(out.loss, default.loss)
    assert torch.allclose(out.loss, by_hand, rtol=1e-5)


def test_loss_falls_on_one_pair(tiny_model_dir: Path) -> None:
    model, spec = _tiny(tiny_model_dir)
    images, masks = _images(2)
    settings = TuneSettings(epochs=10, batch_size=2, lr=5e-3, steps_per_epoch=1,
                            weight_decay=0.0, flip=False)
    result = tune_seggpt(model, spec, TuneData(images, masks, ["A", "B"]), settings,  # type: ignore[arg-type]
                         device=CPU)
    assert len(result.loss_curve) == 10
    assert result.loss_curve[-1] < 0.85 * result.loss_curve[0], result.loss_curve
    assert not model.training


def test_gradient_checkpointing_and_the_step_estimate(tiny_model_dir: Path) -> None:
    model, spec = _tiny(tiny_model_dir)
    images, masks = _images(4)
    heard: list[TuneStatus] = []
    settings = TuneSettings(epochs=2, batch_size=2, lr=1e-3, steps_per_epoch=2,
                            gradient_checkpointing=True, loss_beta=1.0)
    result = tune_seggpt(model, spec, TuneData(images, masks, ["A", "A", "B", "B"]),  # type: ignore[arg-type]
                         settings, device=CPU, estimate=True, progress=heard.append)
    assert heard[0].estimate_seconds is not None and heard[0].estimate_seconds > 0
    assert [(s.epoch, s.step) for s in heard[1:]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert heard[-1].pairs_per_second > 0 and len(result.loss_curve) == 2
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert model.config.beta == 0.01  # type: ignore[union-attr]  # the saved config keeps its own


def test_rel_pos_resize_is_what_transformers_does_at_run_time(tiny_model_dir: Path) -> None:
    model, spec = _tiny(tiny_model_dir)
    model.eval()
    attention = model.model.encoder.layers[0].attention  # type: ignore[union-attr, index]
    table = attention.rel_pos_h  # (2 x 8 - 1, head_dim): 32x16 stacked, patch 4
    assert resize_rel_pos(table, 31).shape == (31, table.shape[1])
    assert torch.equal(attention.get_rel_pos(16, 16, table),
                       attention.get_rel_pos(16, 16, resize_rel_pos(table, 31)))
    assert torch.equal(resize_rel_pos(table, table.shape[0]), table)

    big = resize_seggpt(model, 32)
    assert big.config.image_size == [64, 32] and big.config.pretrain_image_size == 16  # type: ignore[union-attr]
    assert model.config.image_size == [32, 16]  # type: ignore[union-attr]  # the base is untouched
    state, base = big.state_dict(), model.state_dict()
    assert state.keys() == base.keys()
    for key, value in state.items():
        if key.endswith(("rel_pos_h", "rel_pos_w")):
            grid = 16 if key.endswith("h") else 8
            assert value.shape == (2 * grid - 1, base[key].shape[1]), key
        else:
            assert torch.equal(value, base[key]), key
    assert resize_seggpt(model, 16) is model
    with pytest.raises(Exception, match="multiple of the model's patch size"):
        resize_seggpt(model, 30)

    # Untrained, the resized model is the base run at 32 px (the base's own run-time
    # interpolation of positions), so its masks of an upsampled input are the base's, enlarged.
    images, masks = _images(3)
    px = preprocess_images(images, size=(32, 32), resample="bicubic", mean=spec.mean,  # type: ignore[attr-defined]
                           std=spec.std, device=CPU)  # type: ignore[attr-defined]
    painted = preprocess_masks(masks, size=(32, 32), mean=spec.mean, std=spec.std, device=CPU)  # type: ignore[attr-defined]
    masked = torch.zeros(1, 128, dtype=torch.bool)
    masked[:, 64:] = True  # the query half, as at inference
    inputs = {"pixel_values": px[:1], "prompt_pixel_values": px[1:2],
              "prompt_masks": painted[1:2], "bool_masked_pos": masked}
    with torch.no_grad():
        resized = big(**inputs).pred_masks
        model.model.embeddings.patch_embeddings.image_size = (64, 32)  # type: ignore[union-attr]
        try:
            stretched = model(**inputs).pred_masks
        finally:
            model.model.embeddings.patch_embeddings.image_size = (32, 16)  # type: ignore[union-attr]
    assert resized.shape == (1, 3, 64, 32)
    assert torch.allclose(resized, stretched, atol=1e-5)


def test_resized_model_round_trips_and_segments_at_its_size(tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    from eczema_batch.pipeline.loading import ModelIdentity
    from eczema_batch.pipeline.segment import Segmenter, seggpt_input_size

    model, spec = _tiny(tiny_model_dir)
    assert default_settings(spec, model.config).image_size == 32  # type: ignore[arg-type, attr-defined]
    big = resize_seggpt(model, 32)
    big.save_pretrained(tmp_path / "big")  # type: ignore[operator]
    from transformers import SegGptForImageSegmentation

    again = SegGptForImageSegmentation.from_pretrained(tmp_path / "big")
    assert seggpt_input_size(again.config) == (32, 32)
    for key, value in big.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    images, masks = _images(3)
    segmenter = Segmenter(model=again.eval(), spec=spec, identity=ModelIdentity("big", "x"),  # type: ignore[arg-type]
                          device=CPU, dtype=torch.float32)
    small = Segmenter(model=model.eval(), spec=spec, identity=ModelIdentity("small", "x"),  # type: ignore[arg-type]
                      device=CPU, dtype=torch.float32)
    prompts = [(images[1], masks[1]), (images[2], masks[2])]
    mask = segmenter.segment([images[0]], [prompts])[0].mask
    base = small.segment([images[0]], [prompts])[0].mask
    assert mask.shape == base.shape == (24, 20)
    settings = TuneSettings(epochs=1, batch_size=2, lr=1e-3, steps_per_epoch=1, image_size=24)
    with pytest.raises(Exception, match="resize_seggpt it first"):
        tune_seggpt(big, spec, TuneData(images, masks, ["A", "B", "B"]), settings, device=CPU)  # type: ignore[arg-type]


def test_prompts_never_come_from_the_query_patient() -> None:
    rng = np.random.default_rng(0)
    patients = patient_codes([f"P{i % 5}" for i in range(40)])
    pairs = sample_pairs(patients, rng.permutation(40), rng)
    assert (patients[pairs[:, 0]] != patients[pairs[:, 1]]).all()
    assert len(set(pairs[:, 1].tolist())) > 10  # prompts vary


def test_holdout_is_by_patient_seeded_and_leaves_two_to_train() -> None:
    from eczema_batch.pipeline.derived import PatientRef

    patients = [PatientRef("s", f"P{i}") for i in range(10)] * 3
    held = split_patients(patients, 0.2, 3)
    assert len(held) == 2 and held == split_patients(patients, 0.2, 3)
    assert split_patients(patients, 0.0, 3) == set()
    assert len(split_patients(patients[:3], 0.9, 0)) == 1


def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    images, masks = _images(6)
    data = TuneData(images, masks, ["A", "A", "B", "B", "C", "C"])
    settings = TuneSettings(epochs=4, batch_size=3, lr=1e-3, steps_per_epoch=2)
    whole_model, spec = _tiny(tiny_model_dir)
    whole = tune_seggpt(whole_model, spec, data, settings, device=CPU)  # type: ignore[arg-type]

    def kill_in_epoch_3(status: TuneStatus) -> None:
        if status.epoch == 3 and status.step == 1:
            raise KeyboardInterrupt

    folder = tmp_path / ".mine.checkpoint"
    model, _ = _tiny(tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        tune_seggpt(model, spec, data, settings, device=CPU, checkpoint_dir=folder,  # type: ignore[arg-type]
                    fingerprint={"images": [1]}, progress=kill_in_epoch_3)
    assert (folder / CHECKPOINT_FILE).is_file()
    assert not (folder / f".{CHECKPOINT_FILE}.partial").exists()
    model, _ = _tiny(tiny_model_dir)
    resumed = tune_seggpt(model, spec, data, settings, device=CPU, checkpoint_dir=folder,  # type: ignore[arg-type]
                          fingerprint={"images": [1]})
    assert resumed.resumed_at == 2
    assert resumed.loss_curve == pytest.approx(whole.loss_curve)
    for (key, a), b in zip(model.state_dict().items(), whole_model.state_dict().values(),
                           strict=True):
        assert torch.allclose(a, b, atol=1e-6), key
    # another run's checkpoint is not silently reused
    model, _ = _tiny(tiny_model_dir)
    with pytest.raises(Exception, match="other settings or data"):
        tune_seggpt(model, spec, data, settings, device=CPU, checkpoint_dir=folder,  # type: ignore[arg-type]
                    fingerprint={"images": [2]})


def test_dice_and_iou() -> None:
    a = np.zeros((4, 4), dtype=bool)
    b = a.copy()
    assert dice(a, b) == iou(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5) and iou(a, b) == pytest.approx(1 / 3)


@pytest.fixture
def study(tmp_path: Path, factory: sessionmaker[Session]) -> Path:
    root = tmp_path / "study"
    write_synthetic_study(root, patients=5, visits=2, seed=0, size=(64, 48),
                          reference_fraction=0.6, dicom_fraction=0.0)
    assert ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).exit_code == 0
    return root


def test_tuned_model_records_its_patients_and_segments_by_name(
    study: Path, factory: sessionmaker[Session], tiny_model_dir: Path, tmp_path: Path,
) -> None:
    import shutil

    model_dir = tmp_path / "models"
    shutil.copytree(tiny_model_dir, model_dir)
    config = RunConfig(segmenter_model="tiny-seggpt", embedder_model="tiny-dino",
                       device="cpu", model_dir=str(model_dir))
    seen: list[tuple[int, int]] = []
    tuned = tune_study_segmenter(
        factory, config=config, name="seggpt-mine", holdout=0.4, seed=1,
        overrides={"epochs": 2, "steps_per_epoch": 1, "batch_size": 4},
        on_plan=lambda _s, train, held: seen.append((train, held)),
    )
    identity = read_identity(tuned.folder)
    assert identity == tuned.identity and identity is not None
    assert (identity.kind, identity.method, identity.base) == (
        "segmenter", "seggpt-tuning", "tiny-seggpt")
    assert len(identity.holdout) == 2 and len(identity.loss_curve) == 2
    assert not set(identity.holdout) & set(identity.supervised)
    assert len(identity.supervised) == 3 and all(p.study == "study" for p in identity.supervised)
    held_images = set(identity.extra["held_out"]["images"])
    assert held_images and not held_images & set(identity.images)
    assert seen == [(len(identity.images), len(held_images))]
    for key in ("base", "tuned"):
        assert 0.0 <= identity.extra["held_out"][key]["dice"] <= 1.0
    # tuned (and published) at the tiny model's default size, twice its own
    assert identity.settings["image_size"] == 32
    assert identity.extra["held_out"]["base_image_size"] == 16
    assert not checkpoint_folder(model_dir, "seggpt-mine").exists()

    clear_model_cache()
    segmenter = load_segmenter("seggpt-mine", model_dir=model_dir, device="cpu")
    assert segmenter.identity.config["derived_from"]["method"] == "seggpt-tuning"
    images, masks = _images(3)
    assert segmenter.identity.config["input_size"] == [32, 32]
    assert segmenter.spec.image_size == 32
    results = segmenter.segment([images[0]], [[(images[1], masks[1]), (images[2], masks[2])]])
    assert results[0].mask.shape == (24, 20)


def test_cli_tunes_and_refuses_to_overwrite(
    study: Path, factory: sessionmaker[Session], tiny_model_dir: Path, tmp_path: Path,
) -> None:
    import shutil

    model_dir = tmp_path / "models"
    shutil.copytree(tiny_model_dir, model_dir)
    args = ["models", "tune-segmenter", "--name", "seggpt-cli", "--from", "tiny-seggpt",
            "--model-dir", str(model_dir), "--epochs", "1", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["identity"]["method"] == "seggpt-tuning"
    assert len(payload["identity"]["loss_curve"]) == 1
    assert (model_dir / "seggpt-cli" / "config.json").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in " ".join(again.stderr.split())
    replaced = runner.invoke(app, [*args, "--replace"])
    assert replaced.exit_code == 0, replaced.stderr
    assert "held-out Dice" in " ".join(replaced.stderr.split())
