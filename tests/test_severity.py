"""One rule for reading a severity, from a manifest cell or a rater's `review set`."""

from __future__ import annotations

import pytest

from eczema_batch.errors import UsageError
from eczema_batch.severity import DEFAULT_CLASSES, SeverityError, parse_severity


@pytest.mark.parametrize(("value", "index"), [
    ("clear", 0), ("Mild", 1), (" MODERATE ", 2), ("severe", 3), ("0", 0), (" 3 ", 3), (2, 2),
])
def test_a_class_name_or_index_is_read(value: str | int, index: int) -> None:
    assert parse_severity(value) == index


@pytest.mark.parametrize("value", ["4", "-1", "1.0", "moderat", "", "³", "２"])
def test_anything_else_is_refused_with_the_choices(value: str) -> None:
    with pytest.raises(SeverityError, match=r"use one of 0 \(clear\), 1 \(mild\)") as caught:
        parse_severity(value)
    # A manifest treats it as a bad cell (ValueError), the CLI as a usage error.
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, UsageError)


def test_a_head_with_its_own_classes() -> None:
    classes = ("none", "some", "much")
    assert parse_severity("Much", classes) == 2
    with pytest.raises(SeverityError):
        parse_severity("3", classes)
    assert DEFAULT_CLASSES == ("clear", "mild", "moderate", "severe")
