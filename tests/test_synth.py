"""The synthetic study: layout and manifest, determinism, learnable severity, masks, DICOM."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, VLPhotographicImageStorage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from eczema_batch.cli import app
from eczema_batch.errors import UsageError
from eczema_batch.synth import (
    BODY_SITES,
    MANIFEST_FIELDS,
    TRUTH_FIELDS,
    Format,
    SynthSummary,
    Trend,
    camera_conditions,
    plan_study,
    render_image,
    write_synthetic_study,
)
from eczema_batch.synth.render import skin_colour
from eczema_batch.synth.truth import truth_mask_path

SEED = 3
PLAN_DEFAULTS: dict[str, Any] = {
    "images_per_visit": 2,
    "reference_fraction": 0.3,
    "dicom_fraction": 0.15,
    "png_fraction": 0.1,
    "start_date": date(2024, 1, 15),
    "visit_interval_days": 28,
}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary]:
    """40 patients x 4 visits x 2 images = 320 pictures, written once for the module, with its
    truth beside it in ../truth."""
    root = tmp_path_factory.mktemp("synth") / "study"
    summary = write_synthetic_study(
        root, patients=40, visits=4, seed=SEED, truth=root.parent / "truth"
    )
    return root, summary


def _truth(truth: Path) -> list[dict[str, str]]:
    with (truth / "truth.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.asarray(img)


def _manifest(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _load(path: Path) -> np.ndarray:
    if path.suffix == ".dcm":
        return np.asarray(pydicom.dcmread(path).pixel_array)
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _features(rgb: np.ndarray) -> list[float]:
    """Hand features: lesion area, mean redness of the lesion, its roughness, overall redness.

    Redness is the chromaticity (R - G) / (R + G + B) above the picture's median (the skin),
    which the lighting gradient and the skin tone barely move."""
    f = rgb.astype(np.float32)
    red = (f[..., 0] - f[..., 1]) / (f.sum(axis=2) + 1.0)
    excess = red - np.median(red)
    lesion = excess > 0.02
    grey = f.mean(axis=2)
    return [
        float(lesion.mean()),
        float(excess[lesion].mean()) if lesion.any() else 0.0,
        float(grey[lesion].std()) if lesion.sum() > 20 else 0.0,
        float(excess.mean()),
    ]


def test_layout_and_manifest(study: tuple[Path, SynthSummary]) -> None:
    root, summary = study
    rows = _manifest(root)
    assert (root / "manifest.csv").read_text(encoding="utf-8").splitlines()[0] == ",".join(
        MANIFEST_FIELDS
    )
    assert summary.root == root
    assert (summary.patients, summary.visits, summary.images) == (40, 4, 320)
    assert len(rows) == summary.images
    assert summary.references == sum(bool(r["mask"]) for r in rows) == round(320 * 0.3)
    assert summary.dicom == sum(r["path"].endswith(".dcm") for r in rows) == round(320 * 0.15)
    assert sum(r["path"].endswith(".png") for r in rows) == round(320 * 0.1)
    assert summary.labels == dict(Counter(int(r["severity"]) for r in rows)) | {
        c: 0 for c in range(4) if c not in {int(r["severity"]) for r in rows}
    }

    listed = set()
    visits_of: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        patient, visit, name = r["path"].split("/")
        assert re.fullmatch(r"S\d{3}", patient) and patient == r["patient"]
        assert visit == r["visit_date"] == date.fromisoformat(visit).isoformat()
        assert r["body_site"] in BODY_SITES
        assert int(r["severity"]) in range(4)
        stem = name.rsplit(".", 1)[0]
        assert stem.removeprefix("img-") == r["body_site"]
        assert name.endswith(".dcm") == name.startswith("img-")
        visits_of[patient].add(visit)
        assert (root / r["path"]).is_file()
        listed.add(r["path"])
        if r["mask"]:
            assert r["mask"] == f"{patient}/{visit}/{stem}.mask.png"
            listed.add(r["mask"])
    assert all(len(v) == 4 for v in visits_of.values()) and len(visits_of) == 40
    assert min(v for vs in visits_of.values() for v in vs) == "2024-01-15"
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert on_disk == listed | {"manifest.csv"}


def test_masks_are_the_painted_lesion(study: tuple[Path, SynthSummary]) -> None:
    root, _ = study
    area: dict[int, list[float]] = defaultdict(list)
    for r in _manifest(root):
        if not r["mask"]:
            continue
        rgb = _load(root / r["path"])
        with Image.open(root / r["mask"]) as img:
            assert img.mode == "L"
            mask = np.asarray(img)
        assert mask.shape == rgb.shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        inside = mask == 255
        assert inside.any(), r["path"]
        f = rgb.astype(np.float32)
        red = (f[..., 0] - f[..., 1]) / (f.sum(axis=2) + 1.0)
        assert red[inside].mean() > red[~inside].mean(), r["path"]
        area[int(r["severity"])].append(float(inside.mean()))
    assert sorted(area) == [0, 1, 2, 3]  # every class has references
    means = [np.mean(area[c]) for c in range(4)]
    assert means == sorted(means) and means[0] < 0.02 < means[1]


def test_severity_is_learnable_from_pixels(study: tuple[Path, SynthSummary]) -> None:
    root, _ = study
    rows = _manifest(root)
    x = np.array([_features(_load(root / r["path"])) for r in rows])
    y = np.array([int(r["severity"]) for r in rows])
    redness = [x[y == c, 3].mean() for c in range(4)]
    assert all(a < b for a, b in zip(redness, redness[1:], strict=False)), redness
    lesion_redness = [x[y == c, 1].mean() for c in range(4)]
    assert all(a < b for a, b in zip(lesion_redness, lesion_redness[1:], strict=False))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    for clf in (
        make_pipeline(StandardScaler(), NearestCentroid()),
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
    ):
        accuracy = cross_val_score(clf, x, y, cv=folds).mean()
        assert accuracy >= 0.8, (clf, accuracy)
    # Area and redness alone, the two things a clinician looks at first.
    accuracy = cross_val_score(
        make_pipeline(StandardScaler(), NearestCentroid()), x[:, :2], y, cv=folds
    ).mean()
    assert accuracy >= 0.8, accuracy


def test_dicom_files(study: tuple[Path, SynthSummary]) -> None:
    root, _ = study
    specs = {s.path: s for s in plan_study(patients=40, visits=4, seed=SEED, **PLAN_DEFAULTS)}
    studies: dict[tuple[str, str], set[str]] = defaultdict(set)
    instances = set()
    syntaxes: Counter[str] = Counter()
    for r in _manifest(root):
        if not r["path"].endswith(".dcm"):
            continue
        ds = pydicom.dcmread(root / r["path"])
        syntax = ds.file_meta.TransferSyntaxUID
        syntaxes[syntax] += 1
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == VLPhotographicImageStorage
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.PatientID == ds.ClinicalTrialSubjectID == r["patient"]
        assert str(ds.PatientName) == "" and not ds.get("PatientBirthDate")
        assert ds.StudyDate == r["visit_date"].replace("-", "")
        assert ds.Modality == "XC"
        assert ds.BodyPartExamined == ds.BodyPartExamined.upper() != ""
        assert (ds.SamplesPerPixel, ds.BitsAllocated, ds.PlanarConfiguration) == (3, 8, 0)
        studies[(r["patient"], r["visit_date"])].add(ds.StudyInstanceUID)
        instances.add(ds.SOPInstanceUID)

        decoded = ds.pixel_array
        expected, _ = render_image(specs[r["path"]], seed=SEED, size=(320, 240))
        assert decoded.shape == expected.shape == (240, 320, 3)
        if syntax == ExplicitVRLittleEndian:
            assert ds.PhotometricInterpretation == "RGB"
            assert np.array_equal(decoded, expected)
        else:
            assert syntax == JPEGBaseline8Bit
            assert ds.PhotometricInterpretation == "YBR_FULL_422"
            assert ds["PixelData"].is_undefined_length
            diff = decoded.astype(np.int16) - expected.astype(np.int16)
            # the right colours: mean colour within a grey level or two, pixels close
            assert np.abs(diff.reshape(-1, 3).mean(axis=0)).max() < 2.0
            assert np.abs(diff).mean() < 4.0
    assert syntaxes[ExplicitVRLittleEndian] == syntaxes[JPEGBaseline8Bit] == 24
    assert len(instances) == 48
    assert all(len(uids) == 1 for uids in studies.values())
    assert len({uid for uids in studies.values() for uid in uids}) == len(studies)


def test_same_arguments_same_bytes(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {
        "patients": 5,
        "visits": 3,
        "seed": 11,
        "dicom_fraction": 0.3,
        "png_fraction": 0.2,
    }
    first = write_synthetic_study(tmp_path / "a", **kwargs)
    second = write_synthetic_study(tmp_path / "b", **kwargs)
    assert first.labels == second.labels
    hashes = _hashes(tmp_path / "a")
    assert hashes == _hashes(tmp_path / "b")
    assert any(p.endswith(".dcm") for p in hashes) and any(p.endswith(".png") for p in hashes)
    write_synthetic_study(tmp_path / "c", **(kwargs | {"seed": 12}))
    other = _hashes(tmp_path / "c")
    assert not set(other.values()) & {h for p, h in hashes.items() if not p.endswith(".csv")}


def test_processes_write_the_same_bytes(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"patients": 4, "visits": 2, "seed": 5, "dicom_fraction": 0.5}
    write_synthetic_study(tmp_path / "one", **kwargs)
    write_synthetic_study(tmp_path / "two", workers=2, **kwargs)
    assert _hashes(tmp_path / "one") == _hashes(tmp_path / "two")


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="is not empty: choose a new folder"):
        write_synthetic_study(tmp_path, patients=1, visits=1)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = write_synthetic_study(empty, patients=1, visits=1, manifest=False)
    assert summary.images == 2 and not (empty / "manifest.csv").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patients": 0},
        {"visits": 0},
        {"seed": -1},
        {"reference_fraction": 1.5},
        {"dicom_fraction": -0.1},
        {"size": (8, 8)},
        {"images_per_visit": 0},
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"patients": 2, "visits": 2} | kwargs
    with pytest.raises(UsageError):
        write_synthetic_study(tmp_path / "s", **args)
    assert not (tmp_path / "s").exists()


def test_trajectories_show_trends() -> None:
    specs = plan_study(patients=60, visits=6, seed=1, **PLAN_DEFAULTS)
    by_patient: dict[str, list[int]] = defaultdict(list)
    trend = {}
    for s in specs:
        by_patient[s.patient.code].append(s.severity)
        trend[s.patient.code] = s.patient.trend
    counts = Counter(trend.values())
    assert counts == {Trend.IMPROVING: 20, Trend.STABLE: 20, Trend.WORSENING: 20}
    change: dict[Trend, list[float]] = {t: [] for t in Trend}
    for code, levels in by_patient.items():
        first, last = np.mean(levels[:2]), np.mean(levels[-2:])  # 2 images per visit
        change[trend[code]].append(float(last - first))
    assert np.mean(change[Trend.IMPROVING]) < -1.5
    assert np.mean(change[Trend.WORSENING]) > 1.5
    assert abs(np.mean(change[Trend.STABLE])) < 0.5
    # the images of one visit share its severity, give or take one class
    for i in range(0, len(specs), 2):
        assert abs(specs[i].severity - specs[i + 1].severity) <= 2
        assert specs[i].visit_date == specs[i + 1].visit_date
    assert {s.body_site for s in specs} == set(BODY_SITES)


def test_references_cover_every_class() -> None:
    specs = plan_study(
        patients=3, visits=4, seed=0, **(PLAN_DEFAULTS | {"reference_fraction": 0.2})
    )
    present = {s.severity for s in specs}
    referenced = {s.severity for s in specs if s.reference}
    assert sum(s.reference for s in specs) == round(len(specs) * 0.2)
    assert referenced == present


def test_many_sites_per_visit_get_distinct_files(tmp_path: Path) -> None:
    summary = write_synthetic_study(tmp_path / "s", patients=1, visits=1, images_per_visit=9)
    rows = _manifest(tmp_path / "s")
    assert summary.images == 9 == len({r["path"] for r in rows})
    assert {r["body_site"] for r in rows} == set(BODY_SITES)


def test_large_pictures_keep_their_lesion() -> None:
    spec = next(
        s for s in plan_study(patients=4, visits=2, seed=0, **PLAN_DEFAULTS) if s.severity >= 2
    )
    small_rgb, small_mask = render_image(spec, seed=0, size=(320, 240))
    rgb, mask = render_image(spec, seed=0, size=(4000, 3000))
    assert rgb.shape == (3000, 4000, 3) and rgb.dtype == np.uint8 and mask.shape == (3000, 4000)
    assert abs(mask.mean() - small_mask.mean()) < 0.02
    assert abs(float(rgb.mean()) - float(small_rgb.mean())) < 4.0
    assert Format.DICOM.is_dicom and not Format.PNG.is_dicom


def test_truth_masks_cover_every_image(study: tuple[Path, SynthSummary]) -> None:
    root, summary = study
    truth = root.parent / "truth"
    assert summary.truth == truth
    rows = _manifest(root)
    expected = {f"{r['path'].rsplit('.', 1)[0]}.mask.png" for r in rows} | {"truth.csv"}
    assert {p.relative_to(truth).as_posix() for p in truth.rglob("*") if p.is_file()} == expected
    for r in rows:
        mask = _mask(truth / f"{r['path'].rsplit('.', 1)[0]}.mask.png")
        assert mask.shape == (240, 320) and set(np.unique(mask)) <= {0, 255}
        if r["mask"]:  # the study's manual mask is the truth
            assert np.array_equal(mask, _mask(root / r["mask"])), r["path"]


def test_truth_table(study: tuple[Path, SynthSummary]) -> None:
    root, _ = study
    truth = root.parent / "truth"
    assert (truth / "truth.csv").read_text(encoding="utf-8").splitlines()[0] == ",".join(
        TRUTH_FIELDS
    )
    rows = _truth(truth)
    manifest = _manifest(root)
    assert [r["path"] for r in rows] == [m["path"] for m in manifest]
    for r, m in zip(rows, manifest, strict=True):
        assert [r[k] for k in ("patient", "visit_date", "body_site")] == [
            m[k] for k in ("patient", "visit_date", "body_site")
        ]
        assert int(r["severity"]) in range(4)
        if m["severity"]:
            assert r["severity"] == m["severity"]
    by_patient: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_patient[r["patient"]].append(r)
    change: dict[str, list[float]] = defaultdict(list)
    for images in by_patient.values():
        assert len({(r["trend"], r["tone"]) for r in images}) == 1  # one course, one skin
        levels = [int(r["severity"]) for r in images]
        change[images[0]["trend"]].append(float(np.mean(levels[-2:]) - np.mean(levels[:2])))
    assert set(change) == {t.value for t in Trend}
    assert np.mean(change["improving"]) < -1.0 and max(change["improving"]) <= 0
    assert np.mean(change["worsening"]) > 1.0 and min(change["worsening"]) >= 0
    assert abs(np.mean(change["stable"])) < 0.5


def test_all_six_skin_types_occur() -> None:
    specs = plan_study(patients=12, visits=1, seed=SEED, **PLAN_DEFAULTS)
    types = Counter(s.patient.fitzpatrick for s in specs if s.site_index == 0)
    assert types == dict.fromkeys(("I", "II", "III", "IV", "V", "VI"), 2)
    # the painted skin darkens with the type
    lightness = {s.patient.fitzpatrick: float(skin_colour(s.patient.tone).sum()) for s in specs}
    order = sorted(lightness, key=lightness.__getitem__, reverse=True)
    assert order == ["I", "II", "III", "IV", "V", "VI"]


@pytest.mark.parametrize("inside", [".", "truth", "S001/truth"])
def test_truth_inside_the_study_is_refused(tmp_path: Path, inside: str) -> None:
    root = tmp_path / "study"
    with pytest.raises(UsageError, match="--truth must be outside the study folder"):
        write_synthetic_study(root, patients=2, visits=1, truth=root / inside)
    assert not root.exists()


def test_truth_folder_must_be_new_or_empty(tmp_path: Path) -> None:
    (tmp_path / "truth").mkdir()
    (tmp_path / "truth" / "old.csv").write_text("keep me")
    with pytest.raises(UsageError, match="is not empty: choose a new folder"):
        write_synthetic_study(tmp_path / "s", patients=1, visits=1, truth=tmp_path / "truth")
    assert not (tmp_path / "s").exists()
    with pytest.raises(UsageError, match="must not be inside --truth"):
        write_synthetic_study(tmp_path / "t" / "s", patients=1, visits=1, truth=tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_truth_is_seeded_and_written_by_processes_too(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"patients": 4, "visits": 2, "seed": 5, "dicom_fraction": 0.5}
    write_synthetic_study(tmp_path / "one", truth=tmp_path / "one-truth", **kwargs)
    write_synthetic_study(tmp_path / "two", truth=tmp_path / "two-truth", workers=2, **kwargs)
    write_synthetic_study(tmp_path / "plain", **kwargs)
    assert _hashes(tmp_path / "one-truth") == _hashes(tmp_path / "two-truth")
    assert len(_hashes(tmp_path / "one-truth")) == 4 * 2 * 2 + 1
    # writing the truth changes nothing in the study
    assert _hashes(tmp_path / "one") == _hashes(tmp_path / "two") == _hashes(tmp_path / "plain")


def test_cli_writes_the_truth(tmp_path: Path) -> None:
    runner = CliRunner()
    study, truth = tmp_path / "s", tmp_path / "s-truth"
    args = [
        "synth",
        str(study),
        "--patients",
        "2",
        "--visits",
        "2",
        "--width",
        "64",
        "--height",
        "48",
    ]
    result = runner.invoke(app, [*args, "--truth", str(truth / "x"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["truth"] == str(truth / "x")
    assert len(_truth(truth / "x")) == 8 == len(list((truth / "x").rglob("*.mask.png")))
    refused = runner.invoke(
        app, ["synth", str(tmp_path / "new"), "--truth", str(tmp_path / "new" / "t")]
    )
    assert refused.exit_code == 2
    assert "--truth must be outside the study folder" in refused.stderr
    assert not (tmp_path / "new").exists()


def test_each_visit_has_its_own_camera(study: tuple[Path, SynthSummary]) -> None:
    """Light, exposure and JPEG quality change between visits; a visit's pictures share them."""
    specs = plan_study(patients=40, visits=4, seed=SEED, **PLAN_DEFAULTS)
    by_visit = {(s.patient.index, s.visit_index): camera_conditions(s, SEED) for s in specs}
    assert all(
        camera_conditions(s, SEED) == by_visit[(s.patient.index, s.visit_index)] for s in specs
    )
    gains = np.array([c.gains for c in by_visit.values()])
    assert gains[:, 1].min() < 0.92 and gains[:, 1].max() > 1.06  # exposure varies
    warmth = gains[:, 0] / gains[:, 2]
    assert warmth.min() < 0.95 and warmth.max() > 1.05  # cool and warm light both occur
    assert len({c.jpeg_quality for c in by_visit.values()}) > 5
    assert any(c.blur >= 0.1 for c in by_visit.values())
    # the truth under the camera: the painting is what the camera saw, not the photograph
    spec = specs[0]
    _, mask = render_image(spec, seed=SEED, size=(320, 240))
    root, _ = study
    assert np.array_equal(mask, _mask(root.parent / "truth" / truth_mask_path(spec)) == 255)


def test_background_at_an_edge_hides_the_lesion_under_it_in_the_truth_too() -> None:
    from eczema_batch.synth.camera import BACKGROUNDS, Conditions, frame

    rgb = np.full((40, 50, 3), 200, np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[:, :20] = True  # a lesion reaching the left edge
    plain = Conditions(gains=(1.0, 1.0, 1.0), blur=0.0, noise=0.0, jpeg_quality=90)
    assert frame(rgb, mask, plain)[0] is rgb
    framed = Conditions(gains=(1.0, 1.0, 1.0), blur=0.0, noise=0.0, jpeg_quality=90,
                        background=("left", 0.1, BACKGROUNDS[1]))
    out, cleared = frame(rgb, mask, framed)
    assert (out[:, :5] == np.round(BACKGROUNDS[1]).astype(np.uint8)).all()
    assert (out[:, 5:] == 200).all() and not cleared[:, :5].any() and cleared[:, 5:20].all()
    assert mask[:, :5].all()  # the painting itself is left as it was
    # most visits of a study are framed with background, on all four edges between them
    specs = plan_study(patients=12, visits=4, seed=SEED, **PLAN_DEFAULTS)
    drawn = [camera_conditions(s, SEED).background for s in specs if s.site_index == 0]
    assert 0.4 < sum(b is not None for b in drawn) / len(drawn) < 0.8
    assert {b[0] for b in drawn if b is not None} == {"top", "bottom", "left", "right"}


def test_dicom_jpeg_quality_follows_the_visit(tmp_path: Path) -> None:
    import io

    from pydicom.encaps import generate_frames

    from eczema_batch.synth.dicom import encode_jpeg

    def tables(jpeg: bytes) -> Any:
        return Image.open(io.BytesIO(jpeg)).quantization

    root = tmp_path / "s"
    plan = {**PLAN_DEFAULTS, "dicom_fraction": 1.0, "png_fraction": 0.0}
    summary = write_synthetic_study(root, patients=4, visits=3, seed=SEED, size=(64, 48), **plan)
    specs = plan_study(patients=4, visits=3, seed=SEED, **plan)
    qualities = set()
    for spec in specs:
        if not spec.format.is_dicom:
            continue
        ds = pydicom.dcmread(root / spec.path)
        if ds.file_meta.TransferSyntaxUID != JPEGBaseline8Bit:
            continue  # stored uncompressed
        jpeg = next(generate_frames(ds.PixelData, number_of_frames=1))
        quality = camera_conditions(spec, SEED).jpeg_quality
        blank = np.zeros((8, 8, 3), np.uint8)
        assert tables(jpeg) == tables(encode_jpeg(blank, quality=quality, subsampling=1))
        qualities.add(quality)
    assert summary.images and len(qualities) > 1
