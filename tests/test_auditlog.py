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
