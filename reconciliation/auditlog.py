"""Appending chained rows to an environment's ``public.audit_logs`` from SQL.

The upsert (``upsert_missing_lines``) and the rollback (``rollback_missing_lines``) both
write one audit row per line they changed, up to a million in one transaction. Both
describe their rows as a SELECT over their own temporary tables, and ``append_audit_rows``
does the rest, the same way for both:

* the rows' ``new_data`` and ``old_data`` are built in SQL as the canonical JSON of
  ``audit.chain`` (``json_object_sql``: keys sorted, every value a JSON string, escaped by
  PostgreSQL's ``to_json(text)`` exactly as Python's ``json.dumps(..., ensure_ascii=False)``),
  and so are the content hashes, for a chunk of ``CHAIN_CHUNK_ROWS`` rows at once;
* only the chain step (``sha256(previous_hash + content_hash)``) runs here, in order;
* the table is locked against other writers (SHARE ROW EXCLUSIVE) from reading the chain's
  head until the caller's commit; the rows' ``created_at`` are one microsecond apart after
  the head, and this waits until the clock has passed the last of them, so a row another
  writer appends after our commit (stamped with ``clock_timestamp()``) sorts after ours.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from audit.chain import HASH_SCHEME, chain_hash

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


def _canonical_sql(action: str) -> str:
    """``audit.chain.canonical_json`` of a row of ``rows_sql``, in SQL."""
    created_at = "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    return (
        _sql_literal(f'{{"action":{json.dumps(action)},"created_at":')
        + f" || to_json({created_at})::text"
        + " || ',\"new_data\":' || new_json || ',\"old_data\":' || coalesce(old_json, 'null')"
        + " || ',\"record_id\":' || to_json(record_id::text)::text || '}'"
    )


def append_audit_rows(
    cur: Any, *, action: str, rows_sql: str, rows: int, params: Mapping[str, Any]
) -> tuple[int, str | None]:
    """Append ``rows`` chained audit rows; returns (rows written, the chain's new head).

    ``rows_sql`` is a SELECT yielding ``k`` (1..rows, the order along the chain),
    ``record_id`` (text), ``created_at`` (``%(first)s::timestamptz + (k - 1) *
    interval '1 microsecond'``), ``new_json`` and ``old_json`` (JSON text, ``old_json`` may
    be NULL), restricted to ``k > %(low)s AND k <= %(high)s``; ``params`` fills its other
    placeholders. Memory: one chunk of hashes.
    """
    if not ACTION_PATTERN.fullmatch(action):
        raise ValueError(f"not an audit action: {action!r}")
    canonical = _canonical_sql(action)
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
    last = first + timedelta(microseconds=rows - 1)
    cur.execute(
        "CREATE TEMPORARY TABLE IF NOT EXISTS audit_chain_step (k bigint, hash text, previous_hash text)"
        " ON COMMIT DROP"
    )
    written = 0
    for low in range(0, rows, CHAIN_CHUNK_ROWS):
        bounds = {**params, "first": first, "low": low, "high": low + CHAIN_CHUNK_ROWS}
        cur.execute("TRUNCATE audit_chain_step")
        cur.execute(
            f"""
            SELECT k, encode(sha256(convert_to({canonical}, 'UTF8')), 'hex')
              FROM ({rows_sql}) a ORDER BY k
            """,
            bounds,
        )
        # Read the chunk's hashes row by row from this cursor's result while another
        # cursor of the same connection COPYs the chained hashes in (no list of the chunk).
        with (
            cur.connection.cursor() as sink,
            sink.copy("COPY audit_chain_step (k, hash, previous_hash) FROM STDIN") as copy,
        ):
            for k, content in cur:
                digest = chain_hash(previous, content)
                copy.write_row((k, digest, previous))
                previous = digest
        cur.execute(
            f"""
            INSERT INTO public.audit_logs
                   (action, record_id, old_data, new_data, hash, previous_hash, created_at)
            SELECT %(action)s, a.record_id, a.old_json::jsonb, a.new_json::jsonb,
                   h.hash, h.previous_hash, a.created_at
              FROM ({rows_sql}) a JOIN audit_chain_step h USING (k)
             ORDER BY a.k
            """,
            {**bounds, "action": action},
        )
        written += cur.rowcount
    if written != rows:
        raise AuditWriteFailed(f"wrote {written} audit rows for {rows} changed lines")
    # Whoever appends after our commit stamps clock_timestamp(): it must sort after our last row.
    cur.execute(
        "SELECT pg_sleep(GREATEST(0, extract(epoch FROM %s::timestamptz - clock_timestamp()) + 0.000001))",
        [last],
    )
    return written, previous
