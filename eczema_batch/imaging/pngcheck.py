"""Check a PNG's image data to the last row without holding its pixels.

Ingest decodes every image once to find broken files, but it keeps only the size: a full decode
of a 14000 x 14000 PNG holds 0.8 GB of pixels (Pillow stores RGB in 4 bytes) plus its copies. This
does what Pillow's PNG decoder does that can fail — inflate the IDAT stream and read every row's
filter type — streaming, in 1 MB pieces, so memory stays flat whatever the size. Unfiltering cannot
fail once those hold, so a file that passes here decodes.

The verdicts match Pillow's: IDAT is read up to the first other chunk, nothing past the last row
(the zlib checksum included) is looked at, and CRCs are not checked. The chunks after the pixels
are then left to Pillow's own reader (`photo.py`), which is cheap.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import numpy as np

from eczema_batch.errors import RejectedFileError

#: PNG colour type -> samples per pixel (grey, RGB, palette, grey + alpha, RGBA).
_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Adam7 passes: (x start, y start, x step, y step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))
#: Row filter types 0-4 (None, Sub, Up, Average, Paeth); anything higher is a broken stream.
_MAX_FILTER = 4
#: Inflated bytes looked at per step.
_PIECE = 1 << 20
_SIGNATURE_BYTES = 8

TRUNCATED = "truncated PNG"


def _rows(width: int, height: int, depth: int, colour: int, interlaced: bool
          ) -> list[tuple[int, int]]:
    """(rows, bytes per row including its filter byte) of each pass."""
    bits = _SAMPLES[colour] * depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    out = []
    for x0, y0, dx, dy in passes:
        w = (width - x0 + dx - 1) // dx
        h = (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:  # an empty pass has no rows at all, not even filter bytes
            out.append((h, (w * bits + 7) // 8 + 1))
    return out


def _idat_run(data: bytes) -> Iterator[tuple[memoryview, int]]:
    """(payload, offset just past it) of each IDAT chunk of the first run of them, as Pillow
    reads them: from the first IDAT up to the first other chunk; a payload the file cuts short
    is what there is of it."""
    view = memoryview(data)
    pos = _SIGNATURE_BYTES
    seen = False
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            seen = True
            end = min(pos + 8 + length, len(data))
            yield view[pos + 8: end], end
        elif seen:
            return
        pos += 12 + length  # length, type, payload, CRC


def check_png_data(data: bytes) -> int:
    """Raise RejectedFileError unless every row of the PNG's image decodes; return the offset
    just past the last IDAT payload (where Pillow goes on to read the chunks after the pixels).

    The header (IHDR) must already have been parsed by Pillow: its values are trusted here.
    """
    width, height, depth, colour, _compression, _filter, interlace = struct.unpack_from(
        ">IIBBBBB", data, 16)
    passes = _rows(width, height, depth, colour, interlace == 1)
    expected = sum(rows * stride for rows, stride in passes)
    run = list(_idat_run(data))
    final = max((i for i, (payload, _) in enumerate(run) if len(payload)), default=-1)
    inflater = zlib.decompressobj()
    produced = 0
    end = 0
    try:
        for i, (payload, payload_end) in enumerate(run):
            end = payload_end
            produced = _inflate(inflater, payload, produced, expected, passes,
                                last=i == final)
            if produced >= expected:
                break
    except zlib.error as exc:
        raise RejectedFileError(f"PNG cannot be decoded: broken data stream ({exc})") from exc
    if produced < expected:
        raise RejectedFileError(TRUNCATED)
    return end


def _inflate(inflater: zlib._Decompress, payload: bytes | memoryview, produced: int,
             expected: int, passes: list[tuple[int, int]], *, last: bool) -> int:
    """Inflate one IDAT payload, checking the rows it completes; the new count of bytes out.

    As Pillow's decoder: it inflates only while input is left, and never past the last row (so
    the stream's end and checksum are not looked at).
    """
    feed: bytes | memoryview = payload
    while feed:
        snapshot = inflater.copy() if last else None
        piece = inflater.decompress(feed, min(_PIECE, expected - produced))
        if snapshot is not None and not inflater.unconsumed_tail:
            # The last input ran out inside this call, which may have gone on to output that
            # zlib held back: Pillow, a row at a time, stops at the row where the input ran out.
            piece = _rows_while_input_lasts(snapshot, feed, produced, expected, passes)
        feed = inflater.unconsumed_tail
        _check_filters(piece, produced, passes)
        produced += len(piece)
        if produced >= expected or snapshot is not None and not feed:
            break
    return produced


def _rows_while_input_lasts(inflater: zlib._Decompress, feed: bytes | memoryview,
                            produced: int, expected: int, passes: list[tuple[int, int]]
                            ) -> bytes:
    out = []
    while feed and produced < expected:
        want = _row_end(produced, passes) - produced
        piece = inflater.decompress(feed, want)
        feed = inflater.unconsumed_tail
        out.append(piece)
        produced += len(piece)
        if len(piece) < want:
            break  # the row needs input that never comes
    return b"".join(out)


def _row_end(offset: int, passes: list[tuple[int, int]]) -> int:
    """Where the row holding stream offset `offset` ends."""
    start = 0
    for rows, stride in passes:
        stop = start + rows * stride
        if offset < stop:
            return start + ((offset - start) // stride + 1) * stride
        start = stop
    return start


def _check_filters(piece: bytes, offset: int, passes: list[tuple[int, int]]) -> None:
    """The filter byte of every row that starts inside `piece` (stream offset `offset`)."""
    values = np.frombuffer(piece, dtype=np.uint8)
    start = 0
    end = offset + len(piece)
    for rows, stride in passes:
        stop = start + rows * stride
        lo, hi = max(start, offset), min(stop, end)
        if lo < hi:
            first = start + -(-(lo - start) // stride) * stride  # first row start >= lo
            if first < hi and (values[first - offset: hi - offset: stride] > _MAX_FILTER).any():
                raise RejectedFileError("PNG cannot be decoded: unknown filter type in a row")
        start = stop
