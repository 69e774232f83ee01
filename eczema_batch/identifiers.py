"""What may become an identifier: subject codes, visit labels, study names.

Folder names, manifest cells and DICOM tags are free text typed on many keyboards. Two names that
look the same must be one identifier, and two that differ must stay two, so every name is
normalised the same way before it is compared or stored:

- Unicode NFKC (fullwidth `Ｐ００１` is `P001`), every dash-like character (U+2010 hyphen, en and
  em dashes, minus sign) is `-`, invisible format characters (zero-width space, BOM) are dropped,
  and runs of spaces are one space, with none at the ends;
- control characters (NUL, newline, escape...) are refused, never cleaned away: a name that holds
  one was not typed by a person;
- a name too long for its column is refused, never cut: cutting would make two names one.

A subject code is then ASCII letters and digits, `-`, `_` and `.` (no `/`, no `..`), starting with
a letter or digit: it names folders of exports and must never look like a path.

A hospital's DICOM PatientID becomes a subject code only when a study opts in, and then only as a
keyed pseudonym (HMAC-SHA-256 with a secret the user keeps): the number itself is never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata

#: visits.label is String(128), studies.name String(200), patients.subject_code String(64).
MAX_LABEL = 128
MAX_STUDY_NAME = 200
MAX_CODE = 64

#: Characters that render as a hyphen (after NFKC, which maps U+FF0D, U+FE63 and U+2011 already).
_DASHES = dict.fromkeys(
    (0x2010, 0x2011, 0x2012, 0x2013, 0x2014, 0x2015, 0x2212, 0xFE58, 0xFE63, 0xFF0D), "-"
)
#: A subject code: starts with a letter or digit; dots never two in a row, never last.
_CODE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.))*", re.ASCII)

CODE_RULE = "letters, digits, '-', '_', '.' only; never a name"


class IdentifierError(ValueError):
    """A name that cannot be an identifier; the message never repeats the name."""


def normalise(raw: str) -> str:
    """`raw` in its one canonical form. Raises IdentifierError for control characters."""
    if any(unicodedata.category(ch) == "Cc" for ch in raw):
        raise IdentifierError("has control characters")
    text = unicodedata.normalize("NFKC", raw).translate(_DASHES)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return " ".join(text.split())


def normalise_label(raw: str, *, limit: int = MAX_LABEL) -> str:
    """A visit label or study name, normalised; IdentifierError says what is wrong with it."""
    text = normalise(raw)
    if not text:
        raise IdentifierError("is blank")
    if len(text) > limit:
        raise IdentifierError(f"is longer than {limit} characters")
    return text


def normalise_code(raw: str) -> str:
    """A subject code, normalised; IdentifierError when it cannot be one."""
    text = normalise(raw)
    if len(text) > MAX_CODE or _CODE.fullmatch(text) is None or text.endswith("."):
        raise IdentifierError(f"is not a subject code ({CODE_RULE})")
    return text


def check_subject_code(code: str) -> str | None:
    """The reason `code` cannot be a subject code even once normalised, or None."""
    try:
        normalise_code(code)
    except IdentifierError as exc:
        return f"patient {ascii(code)} {exc}"
    return None


# --- keyed pseudonyms of hospital patient IDs -----------------------------------------------------

#: A pseudonym is "PID-" and 20 hex digits (80 bits) of HMAC-SHA-256: no two patients of any study
#: share one by chance, and without the key nobody can tell which PatientID made it.
PSEUDONYM_PREFIX = "PID-"
_PSEUDONYM_HEX = 20
#: Domain separation: the key signs nothing else with these bytes in front.
_PSEUDONYM_CONTEXT = b"eczema-batch PatientID pseudonym\x00"
_KEY_CHECK_CONTEXT = b"eczema-batch pseudonym key check"
#: A shorter key could be guessed together with the (small) space of hospital numbers.
MIN_KEY_BYTES = 16


def pseudonym(key: bytes, patient_id: str) -> str:
    """The subject code of a DICOM PatientID: a keyed hash, never the number itself."""
    text = normalise(patient_id)
    if not text:
        raise IdentifierError("is blank")
    digest = hmac.new(key, _PSEUDONYM_CONTEXT + text.encode("utf-8"), hashlib.sha256)
    return PSEUDONYM_PREFIX + digest.hexdigest()[:_PSEUDONYM_HEX]


def key_check(key: bytes) -> str:
    """What a study stores to know a later ingest uses the same key; it reveals no pseudonym."""
    return hmac.new(key, _KEY_CHECK_CONTEXT, hashlib.sha256).hexdigest()
