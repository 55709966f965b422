"""Appending chained rows to an environment's ``public.audit_logs``.

The upsert (``upsert_missing_lines``) and the rollback (``rollback_missing_lines``) both
write one audit row per line they changed, up to a million in one transaction. Both
describe their rows as a SELECT over their own temporary tables, and ``append_audit_rows``
does the rest, the same way for both:

* the rows' ``new_data`` and ``old_data`` are built in SQL, once, as the canonical JSON of
  ``audit.chain`` (``json_object_sql``: keys sorted, every value a JSON string, escaped by
  PostgreSQL's ``to_json(text)`` exactly as Python's ``json.dumps(..., ensure_ascii=False)``);
* here, row by row in chain order, the row's canonical JSON is assembled around them, its
  content hash and chain hash computed, and the finished row written with ``COPY`` (the
  server stores one row while the next is hashed);
* the table is locked against other writers (SHARE ROW EXCLUSIVE) from reading the chain's
  head until the caller's commit; the rows' ``created_at`` are one microsecond apart after
  the head, and this waits until the clock has passed the last of them, so a row another
  writer appends after our commit (stamped with ``clock_timestamp()``) sorts after ours.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from typing import Any

from audit.chain import HASH_SCHEME, chain_hash, format_created_at

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

CHAIN_CHUNK_ROWS = 50_000
ACTION_PATTERN = re.compile(r"[a-z][a-z_]*")


class AuditWriteFailed(Exception):
    """Fewer or more audit rows were written than lines changed (the caller rolls back)."""


class Constant(str):
    """A value known when the SQL is written (e.g. the hash scheme), embedded as a literal."""


def json_object_sql(fields: Mapping[str, str | Constant]) -> str:
    """A SQL expression yielding the canonical JSON text of an object.

    ``fields`` maps each key to a SQL expression of type text (never NULL: the whole
    object would be NULL), or to a ``Constant``. Keys are written in sorted order.
    """
    parts = []
    for key in sorted(fields):
        value = fields[key]
        if isinstance(value, Constant):
            literal = json.dumps(str(value), ensure_ascii=False)
            parts.append(_sql_literal(f"{json.dumps(key)}:{literal}"))
        else:
            parts.append(_sql_literal(f"{json.dumps(key)}:") + f" || to_json(({value})::text)::text")
    return "'{' || " + " || ',' || ".join(parts) + " || '}'"


def _sql_literal(text: str) -> str:
    # The SQL is run with parameters: a literal '%' must be doubled for psycopg.
    return "'" + text.replace("'", "''").replace("%", "%%") + "'"


SCHEME = Constant(HASH_SCHEME)
_COPY_SQL = (
    "COPY public.audit_logs (action, record_id, old_data, new_data, hash, previous_hash, created_at)"
    " FROM STDIN"
)


def append_audit_rows(
    cur: Any, *, action: str, rows_sql: str, rows: int, span: int | None = None, params: Mapping[str, Any]
) -> tuple[int, str | None]:
    """Append ``rows`` chained audit rows; returns (rows written, the chain's new head).

    ``rows_sql`` is a SELECT yielding ``k`` (the order along the chain: distinct, from 1 to
    ``span``, which defaults to ``rows``; gaps are allowed), ``record_id`` (text),
    ``new_json`` and ``old_json`` (canonical JSON text from ``json_object_sql``; ``old_json``
    may be NULL), restricted to ``k > %(low)s AND k <= %(high)s``; ``params`` fills its
    other placeholders. The rows are read a chunk of ``CHAIN_CHUNK_ROWS`` k at a time and
    written with COPY while the next row's hashes are computed. Memory: one chunk's JSON.
    """
    if not ACTION_PATTERN.fullmatch(action):
        raise ValueError(f"not an audit action: {action!r}")
    cur.execute("LOCK TABLE public.audit_logs IN SHARE ROW EXCLUSIVE MODE")
    cur.execute("SELECT hash, created_at FROM public.audit_logs ORDER BY created_at DESC, id DESC LIMIT 1")
    head = cur.fetchone()
    previous: str | None = head[0] if head else None
    if rows == 0:
        return 0, previous
    cur.execute("SELECT clock_timestamp()")
    now: datetime = cur.fetchone()[0]
    first = now - timedelta(microseconds=rows)
    if head is not None and first <= head[1]:
        first = head[1] + timedelta(microseconds=1)
    stamps = _Stamps(first)
    # The canonical JSON of audit.chain, assembled around the rows' JSON (already canonical).
    action_json = json.dumps(action, ensure_ascii=False)
    opening = '{"action":' + action_json + ',"created_at":"'
    written = 0
    with cur.connection.cursor() as sink:
        for low in range(0, span or rows, CHAIN_CHUNK_ROWS):
            cur.execute(
                f"SELECT record_id, new_json, old_json FROM ({rows_sql}) a ORDER BY k",
                {**params, "low": low, "high": low + CHAIN_CHUNK_ROWS},
            )
            with sink.copy(_COPY_SQL) as copy:
                for record_id, new_json, old_json in cur:
                    stamp = stamps.next()
                    canonical = "".join(
                        (
                            opening,
                            stamp,
                            '","new_data":',
                            new_json,
                            ',"old_data":',
                            "null" if old_json is None else old_json,
                            ',"record_id":',
                            json.dumps(record_id, ensure_ascii=False),
                            "}",
                        )
                    )
                    digest = chain_hash(previous, sha256(canonical.encode("utf-8")).hexdigest())
                    copy.write_row((action, record_id, old_json, new_json, digest, previous, stamp))
                    previous = digest
                    written += 1
    if written != rows:
        raise AuditWriteFailed(f"wrote {written} audit rows for {rows} changed lines")
    # Whoever appends after our commit stamps clock_timestamp(): it must sort after our last row.
    cur.execute(
        "SELECT pg_sleep(GREATEST(0, extract(epoch FROM %s::timestamptz - clock_timestamp()) + 0.000001))",
        [stamps.last],
    )
    return written, previous


class _Stamps:
    """``created_at`` of consecutive rows, one microsecond apart from ``first``, as
    ``audit.chain.format_created_at`` writes them (PostgreSQL reads the same text back)."""

    def __init__(self, first: datetime) -> None:
        self._micros = round((first - EPOCH) / timedelta(microseconds=1)) - 1
        self._second = -1
        self._prefix = ""

    def next(self) -> str:
        self._micros += 1
        second, fraction = divmod(self._micros, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = format_created_at(EPOCH + timedelta(seconds=second))[:20]  # up to the '.'
        return f"{self._prefix}{fraction:06d}Z"

    @property
    def last(self) -> datetime:
        return EPOCH + timedelta(microseconds=self._micros)
