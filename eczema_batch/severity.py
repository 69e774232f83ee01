"""Severity classes: their default names and how a rater's or a manifest's value is read."""

from __future__ import annotations

from eczema_batch.errors import UsageError

#: Class names when no head says otherwise (the paper's four ordinal classes).
DEFAULT_CLASSES = ("clear", "mild", "moderate", "severe")


class SeverityError(UsageError, ValueError):
    """A value that is neither a class index nor a class name."""


def parse_severity(value: str | int, classes: tuple[str, ...] = DEFAULT_CLASSES) -> int:
    """A class index (0..C-1) or a class name, case-insensitive, spaces around ignored."""
    text = str(value).strip()
    names = [c.lower() for c in classes]
    if text.lower() in names:
        return names.index(text.lower())
    if text.isascii() and text.isdigit() and int(text) < len(classes):
        return int(text)
    choices = ", ".join(f"{k} ({c})" for k, c in enumerate(classes))
    raise SeverityError(f"severity {text!r} is not a class: use one of {choices}")
