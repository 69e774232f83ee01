"""The camera that took a picture, as one "Make Model" string (`images.device`).

EXIF Make/Model and DICOM Manufacturer/ManufacturerModelName are free text written by firmware:
padded with spaces or NULs, sometimes with the make repeated in the model ("Canon" + "Canon EOS
R5"), rarely with control characters that would rewrite a terminal. The subgroup report groups by
this string, so it is cleaned the same way whatever the source.
"""

from __future__ import annotations

import re

#: The catalogue's column width (images.device).
MAX_DEVICE = 128
#: C0 and C1 control characters (NUL included: PostgreSQL refuses it in text).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _clean(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if value is None:
        return ""
    return " ".join(_CONTROL.sub(" ", str(value)).split())


def camera_name(make: object, model: object) -> str | None:
    """"Make Model", the make left out when the model already starts with it (or with its first
    word: "NIKON CORPORATION" + "NIKON D750"); None when both are blank. Control characters become
    spaces, runs of space one, and the result is cut to fit."""
    make_text, model_text = _clean(make), _clean(model)
    model_words = model_text.casefold().split()
    if make_text and model_words and (
            model_text.casefold().startswith(make_text.casefold())
            or model_words[0] == make_text.casefold().split()[0]):
        make_text = ""
    name = " ".join(part for part in (make_text, model_text) if part)
    return name[:MAX_DEVICE].rstrip() or None
