"""Image decoding: every DICOM file pydicom ships, broken and hostile inputs, photos, masks.

No network: pydicom's test files are looked up with download=False (a missing one would otherwise
retry the network for ~20 s), the corpus is listed from the wheel's own folder, and pydicom's
downloader is disabled for every test here.
"""

from __future__ import annotations

import datetime
import struct
import threading
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin
from pydicom import dcmread
from pydicom import uid as dicom_uid
from pydicom.data import data_manager, get_testdata_file, get_testdata_files
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, get_decoder

from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging import (
    SNIFF_BYTES,
    DecodedImage,
    DicomTags,
    decode_bytes,
    decode_mask_png,
    decode_path,
    encode_mask_png,
    read_mask,
    sniff_format,
)

LIMIT = 200_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NOT_AN_IMAGE = "not an image: content is neither JPEG, PNG nor DICOM"
#: With Pillow alone 81 of pydicom's 95 pixel-data files decode; pyjpegls or pylibjpeg add more.
MIN_DECODED = 80


# --- helpers ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """get_testdata_files(pattern) also *downloads* every pydicom-data file whose name matches
    (e.g. "*.dcm": a hundred network retries); the default "**/*" happens not to match any."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to download pydicom data")

    monkeypatch.setattr(data_manager, "data_path_with_download", refuse)


def pydicom_corpus() -> list[Path]:
    """Every file in pydicom's wheel, listed from its folder (the same as get_testdata_files())."""
    return sorted(path for path in Path(DATA_ROOT, "test_files").rglob("*") if path.is_file())


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"{name} is not in pydicom's wheel"
    return Path(path)


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 8-bit RGB, with a token IDAT: tiny on disk."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def make_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    preamble: bool = True,
    **tags: Any,
) -> bytes:
    """A native (uncompressed) DICOM object around `pixels`, with extra tags by keyword."""
    ds = Dataset()
    ds.SOPClassUID = dicom_uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = dicom_uid.generate_uid()
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
    if ds.SamplesPerPixel > 1:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    buffer = BytesIO()
    if preamble:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
        ds.save_as(buffer, enforce_file_format=True)
    else:
        ds.save_as(buffer, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def assert_valid(image: DecodedImage) -> None:
    pixels = image.pixels
    assert pixels.dtype == np.uint8
    assert pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[0] > 0 and pixels.shape[1] > 0
    assert pixels.flags.c_contiguous
    assert image.width > 0 and image.height > 0


def reason(call: Callable[[], object]) -> str:
    with pytest.raises(RejectedFileError) as caught:
        call()
    message = str(caught.value)
    assert message and "\n" not in message and len(message) <= 200
    return message


# --- every DICOM file in pydicom's wheel --------------------------------------------------------


def test_every_pydicom_test_file_decodes_or_is_rejected_with_a_reason() -> None:
    paths = pydicom_corpus()
    assert {str(path) for path in paths} == {
        name for name in get_testdata_files() if Path(name).is_file()
    }
    assert len(paths) > 150
    decoded, reasons = 0, Counter[str]()
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # decoding never warns: it decodes or rejects
                image = decode_path(path, max_pixels=LIMIT)
        except RejectedFileError as exc:
            assert str(exc).strip(), path
            reasons[str(exc)] += 1
            continue
        assert_valid(image)
        assert image.pixels.shape[:2] == (image.height, image.width)
        assert image.format == "dicom" and image.dicom is not None and image.dicom.frames >= 1
        decoded += 1
    summary = "\n".join(f"{count:3d}  {text}" for text, count in reasons.most_common())
    print(f"\npydicom test files: {decoded} decoded, {sum(reasons.values())} rejected\n{summary}")
    assert decoded >= MIN_DECODED, summary
    assert reasons["DICOM has no pixel data"] > 50


# --- format sniffing ----------------------------------------------------------------------------


def test_sniff_format_goes_by_content() -> None:
    assert sniff_format(encode(Image.new("RGB", (4, 4)), "JPEG")[:SNIFF_BYTES]) == "jpeg"
    assert sniff_format(encode(Image.new("RGB", (4, 4)), "PNG")[:SNIFF_BYTES]) == "png"
    assert sniff_format(pydicom_file("CT_small.dcm").read_bytes()[:SNIFF_BYTES]) == "dicom"
    # no preamble, no 'DICM': a dataset starting with a group 0008 element (implicit VR)
    no_preamble = make_dicom(np.zeros((2, 2), np.uint8), preamble=False)
    assert sniff_format(no_preamble[:SNIFF_BYTES]) == "dicom"
    assert (
        sniff_format(pydicom_file("ExplVR_BigEndNoMeta.dcm").read_bytes()[:SNIFF_BYTES]) == "dicom"
    )
    assert sniff_format(b"Test Files used for testing pydicom\n" * 4) is None
    assert sniff_format(b"") is None
    assert sniff_format(b"\x08\x00" + b"\xff" * 200) is None  # group 0008, but no VR and no length


def test_a_png_named_jpg_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(Image.fromarray(noise(32, 16)), "PNG"))
    image = decode_path(path, max_pixels=LIMIT)
    assert image.format == "png" and (image.width, image.height) == (32, 16)


def test_preamble_less_dicom_decodes() -> None:
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    image = decode_bytes(make_dicom(pixels, preamble=False), max_pixels=LIMIT)
    assert image.format == "dicom" and (image.width, image.height) == (4, 3)
    assert np.array_equal(image.pixels[:, :, 1], pixels)


# --- broken and hostile input -------------------------------------------------------------------


def test_empty_file() -> None:
    assert reason(lambda: decode_bytes(b"", max_pixels=LIMIT)) == "empty file"


def test_truncated_jpeg_and_png() -> None:
    jpeg = encode(Image.fromarray(noise(320, 240)), "JPEG", quality=90)
    png = encode(Image.fromarray(noise(320, 240)), "PNG")
    assert reason(lambda: decode_bytes(jpeg[: len(jpeg) // 2], max_pixels=LIMIT)) == (
        "truncated JPEG"
    )
    assert reason(lambda: decode_bytes(jpeg[:10], max_pixels=LIMIT)) == "truncated JPEG"
    assert reason(lambda: decode_bytes(png[: len(png) // 2], max_pixels=LIMIT)) == "truncated PNG"
    assert reason(lambda: decode_bytes(png[:40], max_pixels=LIMIT)) == "truncated PNG"
    # draft mode still reads the whole stream, so it finds truncation too
    cut = jpeg[: len(jpeg) // 2]
    assert reason(lambda: decode_bytes(cut, max_pixels=LIMIT, max_side=64)) == "truncated JPEG"


def test_text_named_dcm_and_random_bytes_are_not_images(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("Patient seen on Tuesday; photos to follow.\n" * 20)
    assert reason(lambda: decode_path(text, max_pixels=LIMIT)) == NOT_AN_IMAGE
    random_bytes = np.random.default_rng(1).bytes(4096)
    assert reason(lambda: decode_bytes(random_bytes, max_pixels=LIMIT)) == NOT_AN_IMAGE
    (tmp_path / "random.jpg").write_bytes(random_bytes)
    assert reason(lambda: decode_path(tmp_path / "random.jpg", max_pixels=LIMIT)) == NOT_AN_IMAGE


def test_unreadable_path_is_rejected(tmp_path: Path) -> None:
    assert reason(lambda: decode_path(tmp_path / "missing.jpg", max_pixels=LIMIT)).startswith(
        "file cannot be read: "
    )
    assert reason(lambda: decode_path(tmp_path, max_pixels=LIMIT)).startswith(
        "file cannot be read: "
    )


def test_png_bomb_is_rejected_from_its_header() -> None:
    bomb = png_header_only(40_000, 40_000)
    assert len(bomb) < 200
    assert reason(lambda: decode_bytes(bomb, max_pixels=LIMIT)) == (
        "image of 1.6 gigapixels (40000x40000) exceeds the limit of 0.2 gigapixels "
        "(ECZEMA_BATCH_MAX_IMAGE_PIXELS)"
    )


def test_jpeg_bomb_is_rejected_from_its_header() -> None:
    data = bytearray(encode(Image.fromarray(noise(32, 32)), "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 65_000)
    assert reason(lambda: decode_bytes(bytes(data), max_pixels=LIMIT)) == (
        "image of 3.9 gigapixels (65000x60000) exceeds the limit of 0.2 gigapixels "
        "(ECZEMA_BATCH_MAX_IMAGE_PIXELS)"
    )


def test_pixel_limit_applies_to_every_format() -> None:
    jpeg = encode(Image.fromarray(noise(320, 240)), "JPEG")
    assert reason(lambda: decode_bytes(jpeg, max_pixels=1000)) == (
        "image of 76800 pixels (320x240) exceeds the limit of 1000 pixels "
        "(ECZEMA_BATCH_MAX_IMAGE_PIXELS)"
    )
    dicom = pydicom_file("CT_small.dcm").read_bytes()
    assert "(128x128) exceeds the limit" in reason(lambda: decode_bytes(dicom, max_pixels=1000))


def test_pillows_own_bomb_limit_is_never_what_the_user_sees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for data in (
            encode(Image.fromarray(noise(320, 240)), "JPEG"),
            encode(Image.fromarray(noise(320, 240)), "PNG"),
            pydicom_file("SC_rgb_jpeg.dcm").read_bytes(),  # decoded by pydicom's Pillow plugin
            pydicom_file("MR_small_jp2klossless.dcm").read_bytes(),
        ):
            assert_valid(decode_bytes(data, max_pixels=LIMIT))
            assert_valid(decode_bytes(data, max_pixels=LIMIT, max_side=32))


def test_dicom_without_pixel_data() -> None:
    for name in ("rtplan.dcm", "test-SR.dcm", "DICOMDIR"):
        data = pydicom_file(name).read_bytes()
        assert reason(partial(decode_bytes, data, max_pixels=LIMIT)) == ("DICOM has no pixel data")


def test_truncated_dicom() -> None:
    data = pydicom_file("MR_truncated.dcm").read_bytes()
    assert reason(lambda: decode_bytes(data, max_pixels=LIMIT)) == (
        "truncated DICOM: pixel data has 8130 bytes, its header needs 8192"
    )


def test_jp2_box_of_length_zero_is_refused_not_a_hang() -> None:
    """pydicom 3.0.2 loops forever on it (get_j2k_parameters); fuzzing found it."""
    data = bytearray(pydicom_file("GDCMJ2K_TextGBR.dcm").read_bytes())  # JP2-wrapped frame
    box = data.index(b"\x00\x00\x00\x0cjP  \r\n\x87\n") + 12  # the box after the signature
    data[box : box + 4] = bytes(4)
    outcome: list[str] = []

    def run() -> None:
        try:
            decode_bytes(bytes(data), max_pixels=LIMIT)
        except RejectedFileError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=run, daemon=True)  # a daemon: a regression must not hang
    worker.start()
    worker.join(timeout=20)
    assert outcome == ["DICOM pixel data cannot be decoded: a JPEG 2000 box has length 0"]


@pytest.mark.parametrize(
    ("name", "frame_marker"),
    [("SC_rgb_jpeg.dcm", b"\xff\xc0"), ("MR_small_jpeg_ls_lossless.dcm", b"\xff\xf7")],
)
def test_frame_header_larger_than_rows_columns_is_refused(name: str, frame_marker: bytes) -> None:
    """CharLS and OpenJPEG allocate what the frame header says: a bomb inside a small DICOM."""
    data = bytearray(pydicom_file(name).read_bytes())
    original = decode_bytes(bytes(data), max_pixels=LIMIT)
    start = data.index(frame_marker, data.index(b"\xff\xd8\xff", 132))  # first frame's header
    data[start + 5 : start + 9] = struct.pack(">HH", 60_000, 60_000)
    assert reason(lambda: decode_bytes(bytes(data), max_pixels=LIMIT)) == (
        "DICOM pixel data cannot be decoded: its frame is 60000x60000 but Rows x Columns say "
        f"{original.width}x{original.height}"
    )


def _without_decoders(monkeypatch: pytest.MonkeyPatch, syntax: dicom_uid.UID) -> None:
    """Make pydicom see no installed plugin for `syntax`: get_decoder(...)._available is the
    registry pydicom consults (Decoder.is_available is `bool(self._available)`)."""
    monkeypatch.setattr(get_decoder(syntax), "_available", {})


def test_jpeg_2000_without_a_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MR_small_jp2klossless.dcm", "JPEG2000.dcm"):
        path = pydicom_file(name)
        syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert syntax in dicom_uid.JPEG2000TransferSyntaxes
        assert_valid(decode_path(path, max_pixels=LIMIT))
        _without_decoders(monkeypatch, syntax)
        assert reason(partial(decode_path, path, max_pixels=LIMIT)) == (
            "JPEG 2000 needs the optional decoder: pip install 'eczema-batch[dicom]'"
        )


def test_jpeg_ls_and_lossless_jpeg_without_a_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_decoders(monkeypatch, dicom_uid.JPEGLSLossless)
    ls = reason(
        lambda: decode_path(pydicom_file("MR_small_jpeg_ls_lossless.dcm"), max_pixels=LIMIT)
    )
    assert ls.startswith("JPEG-LS needs a decoder that is not installed: pip install ")
    assert "GPL-3" in ls
    _without_decoders(monkeypatch, dicom_uid.JPEGLosslessSV1)
    lossless = reason(lambda: decode_path(pydicom_file("SC_rgb_jpeg_gdcm.dcm"), max_pixels=LIMIT))
    assert lossless.startswith("lossless JPEG needs a decoder that is not installed")
    assert "pylibjpeg-libjpeg (GPL-3)" in lossless


def test_broken_files_raise_only_rejected_file_error() -> None:
    """Cut and corrupt real files at many places: a reason or a valid image, nothing else."""
    rng = np.random.default_rng(7)
    samples = [
        encode(Image.fromarray(noise(64, 48)), "JPEG"),
        encode(Image.fromarray(noise(64, 48)), "PNG"),
        pydicom_file("CT_small.dcm").read_bytes(),
        pydicom_file("SC_rgb_jpeg.dcm").read_bytes(),
        pydicom_file("MR_small_jp2klossless.dcm").read_bytes(),
        pydicom_file("SC_rgb_rle.dcm").read_bytes(),
        pydicom_file("examples_palette.dcm").read_bytes(),
    ]
    for data in samples:
        variants = [data[: int(cut)] for cut in rng.integers(1, len(data), 12)]
        for _ in range(12):
            corrupt = bytearray(data)
            for position in rng.integers(0, len(data), 8):
                corrupt[position] = int(rng.integers(0, 256))
            variants.append(bytes(corrupt))
        for variant in variants:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    image = decode_bytes(variant, max_pixels=LIMIT, max_side=32)
            except RejectedFileError as exc:
                assert str(exc).strip()
            else:
                assert_valid(image)


# --- photos -------------------------------------------------------------------------------------


def test_exif_rotated_jpeg_reports_the_upright_size(tmp_path: Path) -> None:
    pixels = noise(320, 240)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    image = decode_bytes(data, max_pixels=LIMIT)
    assert (image.width, image.height) == (240, 320)
    assert image.pixels.shape == (320, 240, 3)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(BytesIO(data))).convert("RGB"))
    assert np.array_equal(image.pixels, expected)
    small = decode_bytes(data, max_pixels=LIMIT, max_side=100)
    assert (small.width, small.height) == (240, 320)
    assert small.pixels.shape == (100, 75, 3)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gradient = Image.linear_gradient("L").resize((4000, 3000))
    image = Image.merge(
        "RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient)
    )
    path = tmp_path_factory.mktemp("photos") / "12mp.jpg"
    image.save(path, "JPEG", quality=85)
    return path


def test_draft_mode_decodes_a_12_mp_jpeg_small(
    big_jpeg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drafts: list[tuple[Any, ...]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: Any) -> Any:
        result = original(self, mode, size)
        drafts.append((mode, size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    for image in (
        decode_path(big_jpeg, max_pixels=LIMIT, max_side=448),
        decode_bytes(big_jpeg.read_bytes(), max_pixels=LIMIT, max_side=448),
    ):
        assert (image.width, image.height) == (4000, 3000)
        assert image.pixels.shape == (336, 448, 3)
        assert_valid(image)
    # DCT scaling picked 1/4: 1000x750 is the smallest scale still >= 448 on both sides
    assert drafts == [("RGB", (448, 448), (1000, 750))] * 2


def test_png_and_dicom_are_shrunk_after_a_full_decode() -> None:
    png = decode_bytes(
        encode(Image.fromarray(noise(300, 100)), "PNG"), max_pixels=LIMIT, max_side=60
    )
    assert (png.width, png.height) == (300, 100) and png.pixels.shape == (20, 60, 3)
    dicom = decode_path(pydicom_file("SC_rgb_jpeg.dcm"), max_pixels=LIMIT, max_side=100)
    assert (dicom.width, dicom.height) == (256, 256) and dicom.pixels.shape == (100, 100, 3)
    same = decode_path(pydicom_file("SC_rgb_jpeg.dcm"), max_pixels=LIMIT, max_side=1000)
    assert same.pixels.shape == (256, 256, 3)  # never enlarged


def test_pixels_are_read_only() -> None:
    image = decode_bytes(encode(Image.fromarray(noise(8, 8)), "PNG"), max_pixels=LIMIT)
    assert not image.pixels.flags.writeable
    assert np.array_equal(image.pixels, noise(8, 8))


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("LA", "PNG"), ("1", "PNG")],
)
def test_photo_modes_become_rgb(mode: str, fmt: str) -> None:
    source = Image.fromarray(noise(24, 16)).convert(mode)
    image = decode_bytes(encode(source, fmt), max_pixels=LIMIT)
    assert_valid(image)
    assert image.pixels.shape == (16, 24, 3)
    if mode in ("L", "1", "LA") and fmt == "PNG":
        gray = np.asarray(source.convert("L"))
        for channel in range(3):
            assert np.array_equal(image.pixels[:, :, channel], gray)


def test_palette_png_with_transparency_converts_without_warnings() -> None:
    source = Image.fromarray(noise(24, 16)).convert("P")
    source.info["transparency"] = bytes(range(256))
    data = encode(source, "PNG", transparency=bytes(range(256)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = decode_bytes(data, max_pixels=LIMIT)
    assert image.pixels.shape == (16, 24, 3)


def test_16_bit_png_keeps_the_high_byte() -> None:
    wide = np.full((6, 5), 0x1234, dtype=np.uint16)
    wide[0, 0] = 0xFFFF
    image = decode_bytes(encode(Image.fromarray(wide), "PNG"), max_pixels=LIMIT)
    assert image.pixels[1, 1].tolist() == [0x12, 0x12, 0x12]
    assert image.pixels[0, 0].tolist() == [255, 255, 255]


# --- DICOM colour, frames, tags -----------------------------------------------------------------


def _dicom_pixels(name: str) -> np.ndarray:
    return decode_path(pydicom_file(name), max_pixels=LIMIT).pixels.astype(np.int16)


def test_ybr_dicom_matches_its_rgb_counterpart() -> None:
    rgb = _dicom_pixels("SC_rgb_rle.dcm")  # RGB, lossless
    uncompressed_ybr = _dicom_pixels("SC_ybr_full_422_uncompressed.dcm")
    assert np.abs(uncompressed_ybr - rgb).max() <= 8
    for jpeg_ybr in ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"):
        difference = np.abs(_dicom_pixels(jpeg_ybr) - rgb)  # lossy, chroma subsampled
        assert difference.mean() < 4, jpeg_ybr
    # pydicom 3 really converts (as_rgb / raw=False): the raw YCbCr is far from the RGB
    ds = dcmread(pydicom_file("SC_ybr_full_422_uncompressed.dcm"))
    ds.pixel_array_options(raw=True)
    assert np.abs(ds.pixel_array.astype(np.int16) - rgb).mean() > 20


def test_palette_colour_dicom() -> None:
    ds = dcmread(pydicom_file("examples_palette.dcm"))
    expected = apply_color_lut(ds.pixel_array, ds)
    expected = expected if expected.dtype == np.uint8 else (expected >> 8).astype(np.uint8)
    assert np.array_equal(
        decode_path(pydicom_file("examples_palette.dcm"), max_pixels=LIMIT).pixels, expected
    )


def test_multi_frame_dicom_keeps_frame_zero() -> None:
    image = decode_path(pydicom_file("SC_rgb_rle_2frame.dcm"), max_pixels=LIMIT)
    assert image.dicom is not None and image.dicom.frames == 2
    frames = dcmread(pydicom_file("SC_rgb_rle_2frame.dcm")).pixel_array
    assert np.array_equal(image.pixels, frames[0])
    assert not np.array_equal(image.pixels, frames[1])


def test_monochrome1_is_inverted_and_wide_gray_is_stretched() -> None:
    wide = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 200) + 100  # 12-bit values
    normal = decode_bytes(make_dicom(wide, bits_stored=12), max_pixels=LIMIT).pixels
    inverted = decode_bytes(
        make_dicom(wide, photometric="MONOCHROME1", bits_stored=12), max_pixels=LIMIT
    ).pixels
    assert normal[0, 0, 0] == 0 and normal[-1, -1, 0] == 255
    assert np.array_equal(inverted, 255 - normal)
    windowed = decode_bytes(
        make_dicom(wide, bits_stored=12, WindowCenter=1000, WindowWidth=400), max_pixels=LIMIT
    ).pixels
    assert windowed[0, 0, 0] == 0 and windowed[-1, -1, 0] == 255
    # values 900 and 1100 are inside the window [800, 1200]; 700 and 1300 outside it
    assert windowed[0, 3, 0] == 0 and windowed[1, 1, 0] == 255
    assert 0 < windowed[0, 4, 0] < windowed[1, 0, 0] < 255
    real = decode_path(pydicom_file("6154"), max_pixels=LIMIT)  # a 12-bit MONOCHROME1 CR
    assert_valid(real)


def test_dicom_tags_keep_codes_never_names() -> None:
    data = make_dicom(
        np.zeros((4, 4), np.uint8),
        PatientName="Doe^Jane",
        PatientBirthDate="19800101",
        PatientID="  MRN-0042 ",
        ClinicalTrialSubjectID="S-017",
        ClinicalTrialTimePointID="week 4",
        StudyDate="20240230",  # invalid: 30 February
        AcquisitionDateTime="20240115093000.000000+0100",
        ContentDate="20240116",
        AnatomicRegionSequence=[Dataset()],
        StudyInstanceUID="1.2.3",
        SeriesInstanceUID="1.2.3.4",
        Modality="XC",
        NumberOfFrames=1,
    )
    tags = decode_bytes(data, max_pixels=LIMIT).dicom
    assert tags == DicomTags(
        subject_code="S-017",
        subject_source="ClinicalTrialSubjectID",
        visit_date=datetime.date(2024, 1, 15),
        date_source="AcquisitionDateTime",
        timepoint="week 4",
        body_site=None,
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        sop_uid=tags.sop_uid if tags else None,
        modality="XC",
        frames=1,
    )
    assert "Doe" not in repr(tags) and "1980" not in repr(tags)
    assert {field.name for field in fields(DicomTags)} == {
        "subject_code", "subject_source", "visit_date", "date_source", "timepoint", "body_site",
        "study_uid", "series_uid", "sop_uid", "modality", "frames", "subject_problem",
        "identifying_pixels", "device",
    }  # fmt: skip


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # the test writes them on purpose
def test_dicom_tag_fallbacks() -> None:
    region = Dataset()
    region.CodeMeaning = "Forearm"
    data = make_dicom(
        np.zeros((4, 4), np.uint8),
        PatientID=" P001 ",
        ClinicalTrialSubjectID="   ",
        StudyDate="",
        AcquisitionDate="00000000",
        ContentDate="2023.11.02",  # ACR-NEMA style
        AnatomicRegionSequence=[region],
    )
    tags = decode_bytes(data, max_pixels=LIMIT).dicom
    assert tags is not None
    # A hospital PatientID is never a subject code unless a study asks for its pseudonym.
    assert (tags.subject_code, tags.subject_source, tags.subject_problem) == (None, None, None)
    assert (tags.visit_date, tags.date_source) == (datetime.date(2023, 11, 2), "ContentDate")
    assert tags.body_site == "Forearm" and tags.timepoint is None and tags.frames == 1
    bare = decode_bytes(make_dicom(np.zeros((4, 4), np.uint8)), max_pixels=LIMIT).dicom
    assert bare is not None and bare.subject_code is None and bare.visit_date is None
    with_site = decode_bytes(
        make_dicom(np.zeros((2, 2), np.uint8), BodyPartExamined="ARM", StudyDate="20240105"),
        max_pixels=LIMIT,
    ).dicom
    assert with_site is not None and with_site.body_site == "ARM"
    assert (with_site.visit_date, with_site.date_source) == (datetime.date(2024, 1, 5), "StudyDate")


# --- masks --------------------------------------------------------------------------------------


def mask_png(array: np.ndarray, mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    return encode(image.convert(mode) if mode else image, "PNG")


def lesion(width: int = 320, height: int = 240) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[50:120, 40:200] = True
    return mask


def test_mask_of_the_wrong_size() -> None:
    data = mask_png(lesion(50, 50).astype(np.uint8) * 255)
    assert reason(lambda: read_mask(data, image_size=(320, 240))) == (
        "mask is 50x50 but its image is 320x240"
    )


def test_mask_errors() -> None:
    empty = mask_png(np.zeros((240, 320), np.uint8))
    assert reason(lambda: read_mask(empty, image_size=(320, 240))) == (
        "mask has no lesion pixels (all zero)"
    )
    jpeg = encode(Image.new("L", (320, 240)), "JPEG")
    assert reason(lambda: read_mask(jpeg, image_size=(320, 240))) == "mask is not a PNG image"
    inverted = mask_png(np.full((240, 320), 255, np.uint8))
    assert "inverted" in reason(lambda: read_mask(inverted, image_size=(320, 240)))
    good = mask_png(lesion().astype(np.uint8) * 255)
    assert "mask" in reason(lambda: read_mask(good[: len(good) // 2], image_size=(320, 240)))


@pytest.mark.parametrize("mode", ["1", "L", "RGB", "P", "RGBA", "LA", "I;16"])
def test_mask_modes(mode: str) -> None:
    expected = lesion()
    gray = expected.astype(np.uint8) * 255
    if mode == "I;16":
        data = mask_png(expected.astype(np.uint16) * 1000)
    else:
        data = mask_png(gray, mode)
    assert np.array_equal(read_mask(data, image_size=(320, 240)), expected)


def test_rgba_mask_painted_on_a_transparent_layer_uses_alpha() -> None:
    expected = lesion()
    rgba = np.zeros((240, 320, 4), np.uint8)
    rgba[..., :3] = 255  # transparent white background: the colour is not the mask
    rgba[expected] = (220, 30, 30, 255)
    assert np.array_equal(read_mask(mask_png(rgba), image_size=(320, 240)), expected)
    coloured = np.zeros((240, 320, 3), np.uint8)
    coloured[expected] = (0, 0, 9)  # any nonzero channel counts
    assert np.array_equal(read_mask(mask_png(coloured), image_size=(320, 240)), expected)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 7), (17, 9), (240, 320)])
def test_mask_png_round_trip(height: int, width: int) -> None:
    mask = np.random.default_rng(height * width).random((height, width)) > 0.5
    data = encode_mask_png(mask)
    assert data.startswith(PNG_SIGNATURE)
    assert Image.open(BytesIO(data)).mode == "1"
    back = decode_mask_png(data)
    assert back.dtype == np.bool_ and back.shape == (height, width)
    assert np.array_equal(back, mask)


def test_encoded_masks_are_compact() -> None:
    mask = lesion(4000, 3000)
    data = encode_mask_png(mask)
    assert len(data) < 10_000  # 12 MP of bool is 12 MB; 1-bit raw would be 1.5 MB
    assert np.array_equal(decode_mask_png(data), mask)
    with pytest.raises(ValueError):
        encode_mask_png(np.zeros((2, 2, 2), bool))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("uid", ["1.2.3/../../x", "1.2.abc", "1." + "2" * 70, "1..2", ".1.2"])
def test_a_uid_that_is_not_one_is_not_kept(uid: str) -> None:
    data = make_dicom(np.zeros((4, 4), np.uint8), SOPInstanceUID=uid, StudyInstanceUID=uid,
                      SeriesInstanceUID="1.2.840.10008.99")
    tags = decode_bytes(data, max_pixels=LIMIT).dicom
    assert tags is not None
    assert (tags.sop_uid, tags.study_uid, tags.series_uid) == (None, None, "1.2.840.10008.99")
