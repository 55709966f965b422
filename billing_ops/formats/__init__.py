"""Per-language date and number formats (FORMAT_MODULE_PATH), and ``grouped()``: a count
written in Python text the way the templates' ``intcomma`` writes it in the active
language (1,234 in English, 1 234 in Georgian). Machine-readable output (CSV, JSON,
metrics) does not use it."""

from __future__ import annotations

from django.utils.formats import number_format


def grouped(value: int | float) -> str:
    return number_format(value, force_grouping=True)
