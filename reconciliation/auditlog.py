"""Appending chained rows to an environment's ``public.audit_logs``.

The upsert (``upsert_missing_lines``) and the rollback (``rollback_missing_lines``) both
write one audit row per line they changed, up to a million in one transaction. Both
describe their rows as a SELECT over their own temporary tables yielding the raw values
(``AuditObject`` says which go into ``new_data`` and ``old_data``), and
``append_audit_rows`` does the rest, the same way for both:

* here, row by row in chain order, ``new_data`` and ``old_data`` are written as the
  canonical JSON of ``audit.chain`` (keys sorted, every value a JSON string escaped by
  ``json``'s own encoder, as ``json.dumps(..., ensure_ascii=False)`` does), the row's
  canonical JSON assembled around them, its content hash and chain hash computed, and the
  finished row sent to the server with ``COPY``. The server stores (and parses into jsonb)
  the rows already sent while the next ones are built, so the two cores work at once;
* the table is locked against other writers (SHARE ROW EXCLUSIVE) from reading the chain's
  head until the caller's commit; the rows' ``created_at`` are one microsecond apart after
  the head, and this waits until the clock has passed the last of them, so a row another
  writer appends after our commit (stamped with ``clock_timestamp()``) sorts after ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from json.encoder import encode_basestring  # json.dumps(str, ensure_ascii=False), in C
from typing import Any

from audit.chain import HASH_SCHEME, chain_hash, format_created_at

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

CHAIN_CHUNK_ROWS = 50_000
COPY_FLUSH_ROWS = 1_000  # rows sent to the server per write while the next are built
ACTION_PATTERN = re.compile(r"[a-z][a-z_]*")
KEY_PATTERN = re.compile(r"[a-z][a-z_]*")
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_NULL = "\\N"
COPY_COLUMNS = "action, record_id, old_data, new_data, hash, previous_hash, created_at"
_COPY_SQL = f"COPY public.audit_logs ({COPY_COLUMNS}) FROM STDIN"


class AuditWriteFailed(Exception):
    """Fewer or more audit rows were written than lines changed (the caller rolls back)."""


@dataclass(frozen=True)
class AuditObject:
    """How one JSON object of an audit row (``new_data`` or ``old_data``) is made.

    ``columns``: keys whose values the rows' SELECT yields as text, in columns named
    ``<prefix>_<key>`` (``new_amount``, ``old_amount``); a NULL value leaves its key out.
    ``constants``: keys with the same value on every row (the run id). An object left with
    no keys is written as null. ``append_audit_rows`` adds ``hash_scheme`` to ``new_data``
    itself: every row it writes is one ``audit.chain`` can recompute.
    """

    columns: tuple[str, ...]
    constants: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in (*self.columns, *self.constants):
            if not KEY_PATTERN.fullmatch(key):
                raise ValueError(f"not an audit data key: {key!r}")
        if set(self.columns) & set(self.constants):
            raise ValueError("a key is both a column and a constant")

    def select_list(self, prefix: str) -> list[str]:
        return [f"({prefix}_{key})::text" for key in self.columns]

    def template(self, first_column: int) -> tuple[tuple[str, int, str], ...]:
        """(``"key":``, the row's column index or -1, the constant's JSON) in key order."""
        where = {key: first_column + i for i, key in enumerate(self.columns)}
        return tuple(
            (
                encode_basestring(key) + ":",
                where.get(key, -1),
                encode_basestring(self.constants[key]) if key in self.constants else "",
            )
            for key in sorted((*self.columns, *self.constants))
        )


def _render(template: tuple[tuple[str, int, str], ...], row: Sequence[Any]) -> str | None:
    """The canonical JSON of one object of ``row`` (keys sorted, values JSON strings)."""
    items = []
    for key, index, constant in template:
        if index < 0:
            items.append(key + constant)
        elif (value := row[index]) is not None:
            items.append(key + encode_basestring(value))
    return "{" + ",".join(items) + "}" if items else None


def _copy_text(value: str | None) -> str:
    """``value`` as a field of COPY's text format."""
    if value is None:
        return _COPY_NULL
    return value.translate(_COPY_ESCAPES) if _COPY_SPECIAL.search(value) else value


def _copy_json(value: str | None) -> str:
    """JSON text as a field of COPY's text format: only its backslashes need doubling
    (``encode_basestring`` leaves no tab, newline or carriage return in it)."""
    return _COPY_NULL if value is None else value.replace("\\", "\\\\")


def _json_or_null(value: str | None) -> str:
    return "null" if value is None else value


def _json_string(value: str | None) -> str:
    return "null" if value is None else encode_basestring(value)


def append_audit_rows(
    cur: Any,
    *,
    action: str,
    rows_sql: str,
    rows: int,
    span: int | None = None,
    params: Mapping[str, Any],
    new_data: AuditObject,
    old_data: AuditObject,
) -> tuple[int, str | None]:
    """Append ``rows`` chained audit rows; returns (rows written, the chain's new head).

    ``rows_sql`` is a SELECT yielding ``k`` (the order along the chain: distinct, from 1 to
    ``span``, which defaults to ``rows``; gaps are allowed), ``record_id`` (text), and the
    columns ``new_<key>`` of ``new_data`` and ``old_<key>`` of ``old_data``, restricted to
    ``k > %(low)s AND k <= %(high)s``; ``params`` fills its other placeholders. The rows are
    read a chunk of ``CHAIN_CHUNK_ROWS`` k at a time and written with COPY while the next
    rows are built and hashed. Memory: one chunk's values.
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
    next_stamp = stamps.next
    new_data = replace(new_data, constants={**new_data.constants, "hash_scheme": HASH_SCHEME})
    new_template = new_data.template(1)
    old_template = old_data.template(1 + len(new_data.columns))
    columns = ", ".join(["record_id::text", *new_data.select_list("new"), *old_data.select_list("old")])
    select = f"SELECT {columns} FROM ({rows_sql}) a ORDER BY k"
    # The canonical JSON of audit.chain: {"action", "created_at", "new_data", "old_data", "record_id"}.
    opening = '{"action":' + encode_basestring(action) + ',"created_at":"'
    written = 0
    with cur.connection.cursor() as sink:
        for low in range(0, span or rows, CHAIN_CHUNK_ROWS):
            cur.execute(select, {**params, "low": low, "high": low + CHAIN_CHUNK_ROWS})
            with sink.copy(_COPY_SQL) as copy:
                lines = []
                for row in cur:
                    record_id = row[0]
                    new_json = _render(new_template, row)
                    old_json = _render(old_template, row)
                    stamp = next_stamp()
                    canonical = (
                        f'{opening}{stamp}","new_data":{_json_or_null(new_json)}'
                        f',"old_data":{_json_or_null(old_json)}'
                        f',"record_id":{_json_string(record_id)}}}'
                    )
                    digest = chain_hash(previous, sha256(canonical.encode("utf-8")).hexdigest())
                    lines.append(
                        f"{action}\t{_copy_text(record_id)}\t{_copy_json(old_json)}\t{_copy_json(new_json)}"
                        f"\t{digest}\t{_COPY_NULL if previous is None else previous}\t{stamp}\n"
                    )
                    previous = digest
                    written += 1
                    if len(lines) == COPY_FLUSH_ROWS:
                        copy.write("".join(lines))
                        lines = []
                if lines:
                    copy.write("".join(lines))
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
