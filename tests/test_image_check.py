"""Ingest's check of an image: the same verdicts as a full decode, in bounded memory."""

from __future__ import annotations

import io
import random
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging import check_bytes, decode_bytes
from eczema_batch.imaging.budget import DECODE_BUDGET, PixelBudget
from eczema_batch.imaging.quality import SAMPLE_SIDE
from eczema_batch.ingest import read as ingest_read
from eczema_batch.ingest.scan import scan_study
from tests.memory import peak_rss_above

LIMIT = 200_000_000
#: Adam7 passes: (x start, y start, x step, y step).
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def interlaced_png(pixels: np.ndarray, colour: int, depth: int, *, exif: bytes | None = None
                   ) -> bytes:
    """An Adam7 PNG (Pillow cannot write one), random row filters, IDAT split in two, and an
    optional eXIf chunk after the pixels."""
    rng = np.random.default_rng(0)
    height, width = pixels.shape[:2]
    raw = bytearray()
    for x0, y0, dx, dy in ADAM7:
        sub = pixels[y0::dy, x0::dx]
        if sub.shape[0] == 0 or sub.shape[1] == 0:
            continue
        for row in sub:
            raw.append(int(rng.integers(0, 5)))
            raw += row.astype(">u2" if depth == 16 else np.uint8).tobytes()
    stream = zlib.compress(bytes(raw))
    half = len(stream) // 2
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", stream[:half])
            + _chunk(b"IDAT", stream[half:]) + (_chunk(b"eXIf", exif) if exif else b"")
            + _chunk(b"IEND", b""))


def sideways_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to display
    return exif.tobytes()[6:]  # without the "Exif\0\0" prefix, as in a PNG eXIf chunk


def corpus() -> Iterator[bytes]:
    """PNGs in every colour type and depth Pillow writes, interlaced ones, and JPEGs."""
    rng = np.random.default_rng(1)
    for width, height in ((1, 1), (3, 5), (9, 7), (33, 17), (64, 48)):
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        base = Image.fromarray(rgb, "RGB")
        images = [base, base.convert("L"), base.convert("LA"), base.convert("RGBA"),
                  base.convert("1"), base.convert("P"),
                  Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).convert("I;16")]
        for image in images:
            for options in ({}, {"optimize": True}, {"bits": 2} if image.mode == "P" else {}):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG", **options)
                yield buffer.getvalue()
        for colour, samples in ((0, 1), (2, 3), (4, 2), (6, 4)):
            for depth in (8, 16):
                pixels = rng.integers(0, 2**depth, (height, width, samples), dtype=np.uint32)
                yield interlaced_png(pixels, colour, depth)
        for mode in ("RGB", "L", "CMYK"):
            for options in ({}, {"progressive": True}, {"subsampling": 0}):
                buffer = io.BytesIO()
                base.convert(mode).save(buffer, format="JPEG", **options)
                yield buffer.getvalue()


def verdict(check: object, data: bytes, **options: object) -> tuple[str, ...]:
    try:
        result = check(data, max_pixels=LIMIT, **options)  # type: ignore[operator]
    except RejectedFileError as exc:
        return ("rejected", str(exc))
    return ("ok", str(result.width), str(result.height), result.format)


def damaged(data: bytes, rng: random.Random) -> Iterator[bytes]:
    yield data
    for _ in range(4):  # cut anywhere after the signature: truncated copies
        yield data[: rng.randrange(9, len(data))]
    for _ in range(6):  # one byte changed: corrupt streams, bad filter types, broken chunks
        changed = bytearray(data)
        changed[rng.randrange(9, len(changed))] ^= rng.randrange(1, 256)
        yield bytes(changed)


def test_the_check_accepts_and_rejects_exactly_what_a_full_decode_does() -> None:
    rng = random.Random(7)
    differ = []
    for original in corpus():
        for data in damaged(original, rng):
            full = verdict(decode_bytes, data)
            # as ingest calls it (a sample for the quality measures: a PNG is decoded in full
            # instead of checked) and without a sample
            for options in ({}, {"sample_side": SAMPLE_SIDE}):
                checked = verdict(check_bytes, data, **options)
                # Same outcome; a rejection may word a corrupt stream differently.
                if full[0] != checked[0] or (full[0] == "ok" and full != checked):
                    differ.append((len(original), len(data), options, full, checked))
    assert differ == []


def test_exif_after_the_pixels_still_turns_the_size() -> None:
    pixels = np.zeros((30, 50, 3), dtype=np.uint32)
    data = interlaced_png(pixels, 2, 8, exif=sideways_exif())
    assert verdict(decode_bytes, data) == ("ok", "30", "50", "png")
    assert verdict(check_bytes, data) == ("ok", "30", "50", "png")
    assert verdict(check_bytes, data, sample_side=SAMPLE_SIDE) == ("ok", "30", "50", "png")


def _photo(side: int) -> Image.Image:
    ramp = np.linspace(0, 255, side, dtype=np.float32).astype(np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[None, :] // 2),
                      axis=2)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
def test_ingest_checks_a_large_photo_without_holding_its_pixels(
    tmp_path: Path, kind: str
) -> None:
    side = 6000  # 36 MP: a full decode holds ~250 MB
    path = tmp_path / "study" / "P1" / "v1" / f"big.{kind.lower()}"
    path.parent.mkdir(parents=True)
    _photo(side).save(path, format=kind, **({"compress_level": 1} if kind == "PNG" else {}))
    data = path.read_bytes()
    scan = scan_study(tmp_path / "study")
    rel = f"P1/v1/big.{kind.lower()}"
    task = ingest_read.ReadTask(rel, scan.entries[rel])

    def ingest_read_file() -> None:
        ingest_read._init_worker({}, LIMIT, ingest_read.StudyRoot(scan.root, scan.root_id))
        read = ingest_read.read_file(task)
        assert (read.error, read.width, read.height) == (None, side, side)

    full = peak_rss_above(lambda: decode_bytes(data, max_pixels=LIMIT))
    checked = peak_rss_above(ingest_read_file)
    # The file's bytes (a few MB) are read; the ~250 MB of pixels are not held.
    assert full > 100 << 20
    assert checked < len(data) + (32 << 20)
    # A JPEG's quality comes from a reduced-scale decode; a PNG this large would need a full one,
    # so it is left unmeasured, and ingest says why (read again here: the check ran in a child).
    ingest_read._init_worker({}, LIMIT, ingest_read.StudyRoot(scan.root, scan.root_id))
    read = ingest_read.read_file(task)
    if kind == "JPEG":
        assert read.quality is not None and read.quality_skipped is None
    else:
        assert read.quality is None
        assert read.quality_skipped is not None and "6000 x 6000 px" in read.quality_skipped


def _until(condition: Callable[[], bool]) -> None:
    """Wait for another thread to get somewhere (no time is asserted: the bound only stops a
    broken test from hanging)."""
    for _ in range(2000):
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError("the other thread never got there")


def test_a_decode_waits_for_its_share_of_the_pixel_budget() -> None:
    budget = PixelBudget(100)
    done: list[str] = []

    def decode(name: str, amount: int) -> None:
        with budget.hold(amount):
            done.append(name)

    with budget.hold(80):
        with budget.hold(20):  # fits beside it
            pass
        waiting = threading.Thread(target=decode, args=("50", 50))
        waiting.start()
        _until(lambda: budget.waiting == 1)
        assert done == [] and budget.used == 80
    waiting.join()
    assert done == ["50"] and budget.used == 0
    decode("more than the whole budget runs alone", 500)
    assert budget.used == 0


def test_run_decodes_take_their_pixels_from_the_process_budget(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = io.BytesIO()
    _photo(300).save(buffer, format="PNG")
    monkeypatch.setattr(DECODE_BUDGET, "total", 300 * 300 * 8)
    result: list[int] = []

    def decode() -> None:
        result.append(decode_bytes(buffer.getvalue(), max_pixels=LIMIT, max_side=64).width)

    with DECODE_BUDGET.hold(1):  # another decode holds some of it
        thread = threading.Thread(target=decode)
        thread.start()
        _until(lambda: DECODE_BUDGET.waiting == 1)
        assert result == []
    thread.join()
    assert result == [300]
