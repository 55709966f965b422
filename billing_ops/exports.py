"""Cells of the CSV files the dashboard exports (lock reports, the audit trail)."""

from __future__ import annotations

from typing import Any

# A spreadsheet runs a cell starting with one of these as a formula (OWASP "CSV injection").
CSV_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
CSV_FORMULA_ESCAPE = "'"


def csv_cell(value: Any) -> str:
    """A value as an exported cell: text that a spreadsheet would run is escaped, verbatim
    otherwise; numbers stay numbers (a number is never a formula); None is empty."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return str(value)
    if value.startswith(CSV_FORMULA_PREFIXES):
        return CSV_FORMULA_ESCAPE + value
    return value
