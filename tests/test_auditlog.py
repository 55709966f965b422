"""reconciliation.auditlog's own arithmetic, without a database: the created_at text the
writer hashes and stores must be audit.chain's for every row, however many seconds, days
or years a run's rows span (the database tests' runs are too small to cross a second)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from audit.chain import format_created_at
from reconciliation.auditlog import _Stamps


@pytest.mark.parametrize(
    "first",
    [
        datetime(2026, 11, 22, 10, 0, 59, 999_997, tzinfo=UTC),  # a second ends
        datetime(2026, 12, 31, 23, 59, 59, 999_998, tzinfo=UTC),  # a year ends
        datetime(2026, 11, 22, 10, 0, 0, 0, tzinfo=UTC),  # a whole second
    ],
)
def test_each_rows_stamp_is_the_canonical_text_one_microsecond_after_the_last(first) -> None:
    stamps = _Stamps(first)
    texts = [stamps.next() for _ in range(6)]
    assert texts == [format_created_at(first + timedelta(microseconds=i)) for i in range(6)]
    assert stamps.last == first + timedelta(microseconds=5)


def test_a_first_stamp_in_another_zone_is_written_in_utc() -> None:
    from zoneinfo import ZoneInfo

    first = datetime(2026, 11, 22, 13, 0, 0, 5, tzinfo=ZoneInfo("Asia/Tbilisi"))
    assert _Stamps(first).next() == "2026-11-22T09:00:00.000005Z"


HOSTILE = [
    'Fee "quoted", with comma',
    "back\\slash and \\n written out",
    "tab\there, newline\nhere, return\rhere, \x1f unit separator",
    "ქართული ტექსტი, é, 😀, \u2028 line separator",
    "",
]


def _copy_unescape(field: str) -> str | None:
    """What PostgreSQL's COPY text format reads back from a field."""
    if field == "\\N":
        return None
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\":
            out.append({"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}[field[i + 1]])
            i += 2
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@pytest.mark.parametrize("value", HOSTILE)
def test_an_object_is_the_canonical_json_of_audit_chain_and_survives_copy(value) -> None:
    import json

    from reconciliation.auditlog import AuditObject, _copy_json, _copy_text, _render

    shape = AuditObject(columns=("description", "amount"), constants={"run_id": value, "hash_scheme": "x"})
    row = ("record", value, "10.500000")  # the SELECT's order: record_id, then the columns as given
    rendered = _render(shape.template(1), row)
    expected = {"description": value, "amount": "10.500000", "run_id": value, "hash_scheme": "x"}
    assert rendered == json.dumps(expected, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for field in (_copy_json(rendered), _copy_text(value)):
        assert not {"\t", "\n", "\r"} & set(field)  # one line, seven fields
    assert _copy_unescape(_copy_json(rendered)) == rendered
    assert _copy_unescape(_copy_text(value)) == value


def test_a_null_value_leaves_its_key_out_and_an_object_with_no_keys_is_null() -> None:
    from reconciliation.auditlog import AuditObject, _copy_json, _copy_text, _render

    shape = AuditObject(columns=("amount", "operation"))
    assert _render(shape.template(1), ("id", None, "delete")) == '{"operation":"delete"}'
    assert _render(shape.template(1), ("id", None, None)) is None
    assert _copy_json(None) == _copy_text(None) == "\\N"


def test_keys_are_checked() -> None:
    from reconciliation.auditlog import AuditObject

    with pytest.raises(ValueError, match="not an audit data key"):
        AuditObject(columns=("amount; DROP TABLE audit_logs",))
    with pytest.raises(ValueError, match="both a column and a constant"):
        AuditObject(columns=("run_id",), constants={"run_id": "x"})
