"""Batch upsert of missing invoice lines (runbook §3), as one transaction.

What one run does, in one transaction of the environment database:

1. refuses to start if the dedup index is missing or invalid, or the run id was used;
2. streams the CSV with COPY into the temporary table ``tmp_invoice_lines``, whose column
   types and constraints are the CSV contract (``reconciliation.csvfile``) and which
   normalizes each description as it is stored, with the runbook's expression
   ``regexp_replace(lower(trim(description)), '\\s+', ' ', 'g')``: a bad value stops it
   with the file's line and column, before anything is written;
3. of rows whose keys collide after normalization, keeps the last one in the file (the
   others are counted, reported and dropped: the upsert never meets the same key twice, so
   "ON CONFLICT DO UPDATE command cannot affect row a second time" cannot happen, within a
   batch or across batches);
4. locks the existing lines the file's keys meet (``FOR UPDATE``, one statement), keeping
   their values for the audit rows and whether the file changes them;
5. per batch of ``batch_size`` rows, in the file's order: the rows whose key has no line
   are inserted (with time-ordered ids, ``_NEW_ID``); the rows whose line step 4 locked go
   through ``INSERT ... ON CONFLICT (invoice_id, unit_id, line_type, normalized_description)
   DO UPDATE ... WHERE (description, quantity, amount) IS DISTINCT FROM ...``: identical
   lines are not rewritten (and get no audit row). If another session inserted one of the
   file's keys after step 4, the insert meets it on the dedup index and the run stops,
   naming the key (that line would not be ours);
6. writes one ``audit_logs`` row per inserted or updated line, chained
   (``reconciliation.auditlog``): the lines' values are read back in chunks, and
   ``new_data``, ``old_data`` and the hashes built in Python in chain order while COPY
   stores the rows already built. The table is locked against other writers (SHARE ROW
   EXCLUSIVE) from reading the chain's head until commit, the rows' ``created_at`` are one
   microsecond apart after the head, and the commit waits until the clock has passed the
   last of them, so rows appended after ours sort after ours;
7. commits, or for a dry run rolls back, reporting the same counts.

Any error anywhere rolls the whole transaction back: nothing is committed.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
from django.conf import settings

from reconciliation.auditlog import AuditObject, append_audit_rows
from reconciliation.csvfile import STAGING_TABLE, STAGING_TABLE_SQL, CsvError, CsvHeader, copy_error
from reconciliation.indexes import DEDUP_INDEX, DedupIndexUnusable, require_dedup_index

UPSERT_ACTION = "upsert_missing_lines"
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")
COPY_CHUNK_BYTES = 1 << 20
DUPLICATE_EXAMPLES = 20
PREFIX = "[batch_upsert]"
TEMP_BUFFERS = "1GB"  # an upper bound: local buffers are allocated as the tables grow


class UpsertRefused(Exception):
    """The upsert must not start (nothing was done)."""


class UpsertFailed(Exception):
    """The upsert stopped; its transaction was rolled back."""


class Reporter(Protocol):
    def log(self, message: str) -> None: ...

    def progress(self, done: int, total: int | None = None, message: str = "") -> None: ...

    def check_cancel(self) -> None: ...


@dataclass
class UpsertOutcome:
    run_id: str
    dry_run: bool
    rows_streamed: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: int = 0
    duplicate_examples: list[dict[str, Any]] = field(default_factory=list)
    batches: int = 0
    audit_rows: int = 0
    audit_head: str | None = None
    upsert_ms: int = 0
    duration_ms: int = 0

    def as_result(self) -> dict[str, Any]:
        return asdict(self)


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise UpsertRefused(
            f"run id {run_id[:120]!r} is not allowed: 1 to 100 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return run_id


def run_id_used_in(cursor: Any, run_id: str) -> bool:
    """Whether the environment's audit trail already has rows of this run (runbook §4.2's filter)."""
    cursor.execute(
        "SELECT EXISTS (SELECT 1 FROM public.audit_logs WHERE action = %s AND new_data ->> 'run_id' = %s)",
        [UPSERT_ACTION, run_id],
    )
    return bool(cursor.fetchone()[0])


def batch_upsert(
    conn: Any,
    *,
    csv_path: Path,
    csv_name: str,
    header: CsvHeader,
    run_id: str,
    batch_size: int,
    dry_run: bool,
    report: Reporter,
) -> UpsertOutcome:
    """Run the upsert on ``conn`` (a psycopg connection, not in a transaction)."""
    check_run_id(run_id)
    if batch_size < 1:
        raise UpsertRefused("the batch size must be at least 1")
    outcome = UpsertOutcome(run_id=run_id, dry_run=dry_run)
    started = time.monotonic()
    report.log(f"{PREFIX} Loading CSV: {csv_name}")
    try:
        with conn.transaction(force_rollback=dry_run), conn.cursor() as cur:
            cur.execute(
                "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true),"
                " set_config('TimeZone', 'UTC', true), set_config('work_mem', '256MB', true),"
                # The staging tables are temporary: without room in temp_buffers (8MB by
                # default; settable until the session's first temporary table) they spill.
                " set_config('temp_buffers', %s, true)",
                [
                    str(settings.UPSERT_STATEMENT_TIMEOUT_MS),
                    str(settings.UPSERT_LOCK_TIMEOUT_MS),
                    TEMP_BUFFERS,
                ],
            )
            try:
                require_dedup_index(cur)
            except DedupIndexUnusable as exc:
                raise UpsertRefused(f"the upsert cannot start: {exc}") from None
            if run_id_used_in(cur, run_id):
                raise UpsertRefused(
                    f"run id {run_id!r} already has audit rows in this environment: "
                    "a retry needs a new run id "
                    "(runbook §5.3)"
                )
            outcome.rows_streamed = _copy_csv(cur, csv_path, csv_name, header)
            report.log(f"{PREFIX} COPY streamed {outcome.rows_streamed} rows into {STAGING_TABLE}")
            if outcome.rows_streamed == 0:
                raise CsvError("the file has a header but no lines", file=csv_name, line=2)
            report.check_cancel()
            outcome.duplicates, outcome.duplicate_examples = _keep_last_rows(cur)
            keys = outcome.rows_streamed - outcome.duplicates
            if outcome.duplicates:
                report.log(
                    f"{PREFIX} {outcome.duplicates} row(s) repeat a key of a later row after normalization; "
                    "the last row in the file wins"
                )
            upsert_started = time.monotonic()
            existing, changed = _lock_existing_lines(cur)
            ids = new_line_ids()
            outcome.batches, outcome.inserted, outcome.updated = _upsert_batches(
                cur, keys=keys, batch_size=batch_size, report=report, ids=ids
            )
            if (outcome.inserted, outcome.updated) != (keys - existing, changed):
                raise UpsertFailed(
                    f"wrote {outcome.inserted} new and {outcome.updated} changed lines where "
                    f"{keys - existing} and {changed} were expected; nothing was committed"
                )
            outcome.unchanged = existing - changed
            outcome.upsert_ms = round((time.monotonic() - upsert_started) * 1000)
            report.log(
                f"{PREFIX} Upsert complete: {outcome.inserted} inserted, {outcome.updated} updated "
                f"({outcome.upsert_ms}ms)"
            )
            if outcome.unchanged:
                report.log(
                    f"{PREFIX} {outcome.unchanged} line(s) unchanged (identical; not rewritten, no audit row)"
                )
            report.check_cancel()
            report.progress(outcome.batches, outcome.batches + 1, "Writing the audit trail")
            outcome.audit_rows, outcome.audit_head = append_audit_rows(
                cur,
                action=UPSERT_ACTION,
                rows_sql=_AUDIT_ROWS,
                rows=outcome.inserted + outcome.updated,
                span=outcome.rows_streamed,
                params=ids,
                new_data=_new_data(run_id),
                old_data=_OLD_DATA,
            )
            report.log(f"{PREFIX} Audit logs written for run_id={run_id}")
            report.check_cancel()
    except (CsvError, UpsertRefused):
        raise
    except Exception as exc:
        problem = copy_error(exc, path=csv_path, header=header, file=csv_name)
        if problem is not None:
            raise problem from None
        raise
    outcome.duration_ms = round((time.monotonic() - started) * 1000)
    report.progress(outcome.batches + 1, outcome.batches + 1, "Done")
    if dry_run:
        report.log(
            f"{PREFIX} Dry run: rolled back; nothing was written. A real run would write the counts above."
        )
    report.log(f"{PREFIX} Done.")
    return outcome


def _copy_csv(cur: Any, csv_path: Path, csv_name: str, header: CsvHeader) -> int:
    from psycopg import sql

    cur.execute(STAGING_TABLE_SQL)
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in header.columns)
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv, ENCODING 'UTF8')").format(
        sql.Identifier(STAGING_TABLE), columns
    )
    with csv_path.open("rb") as f:
        f.seek(header.data_offset)
        with cur.copy(statement) as copy:
            while chunk := f.read(COPY_CHUNK_BYTES):
                copy.write(chunk)
    return int(cur.rowcount)


# Whether the file's row (``s`` in the lock, ``excluded`` in the upsert) changes the line
# ``l``: one condition, so the lock counts exactly the lines the upsert rewrites.
_UPDATED_VALUES = ("description", "quantity", "amount")


def _changes(row: str) -> str:
    line = ", ".join(f"l.{c}" for c in _UPDATED_VALUES)
    new = ", ".join(f"{row}.{c}" for c in _UPDATED_VALUES)
    return f"({line}) IS DISTINCT FROM ({new})"


_KEY_JOIN = (
    "l.invoice_id = s.invoice_id AND l.unit_id = s.unit_id AND l.line_type = s.line_type"
    " AND l.normalized_description = s.nd"
)
# A new line's id: an RFC 9562 version-7 UUID (time-ordered), made from the run's start
# (``id_prefix``: 48-bit Unix milliseconds, the version, 12 random bits) and a random 62-bit
# counter seeded once per run and advanced by the file's row number (the RFC's "monotonic
# random" method). The ids of one run are adjacent in the primary key's index, where
# ``gen_random_uuid()`` would scatter a million inserts across it.
_NEW_ID = "(%(id_prefix)s || to_hex((%(id_seed)s::bigint + s.record) | (-9223372036854775808)::bigint))::uuid"
_ID_SEED_ROOM = 1 << 40  # more rows than any file can have: seed + record stays under 2**62


def new_line_ids() -> dict[str, Any]:
    """The parameters of ``_NEW_ID`` for one run."""
    millis = time.time_ns() // 1_000_000
    return {
        "id_prefix": f"{millis & 0xFFFF_FFFF_FFFF:012x}7{secrets.randbits(12):03x}",
        "id_seed": secrets.randbelow((1 << 62) - _ID_SEED_ROOM),
    }


def _keep_last_rows(cur: Any) -> tuple[int, list[dict[str, Any]]]:
    """Drop the rows a later row of the file overrides (same key after normalization):
    (how many, examples). Then index the rows left by their row number, for the batches."""
    cur.execute(
        f"""
        CREATE TEMPORARY TABLE upsert_repeated ON COMMIT DROP AS
        SELECT invoice_id, unit_id, line_type, nd, min(record) AS first, max(record) AS last
          FROM {STAGING_TABLE} GROUP BY invoice_id, unit_id, line_type, nd HAVING count(*) > 1
        """
    )
    if not cur.rowcount:
        duplicates, examples = 0, []
    else:
        cur.execute(
            f"""
            SELECT r.invoice_id, r.unit_id, r.line_type, r.nd, array_agg(s.record ORDER BY s.record)
              FROM (SELECT * FROM upsert_repeated ORDER BY first LIMIT %s) r
              JOIN {STAGING_TABLE} s
                ON (s.invoice_id, s.unit_id, s.line_type, s.nd) = (r.invoice_id, r.unit_id, r.line_type, r.nd)
             GROUP BY r.invoice_id, r.unit_id, r.line_type, r.nd, r.first ORDER BY r.first
            """,
            [DUPLICATE_EXAMPLES],
        )
        examples = [
            {
                "invoice_id": inv,
                "unit_id": unit,
                "line_type": line_type,
                "normalized_description": nd,
                "rows": records,  # data rows of the file (the header is not counted)
                "kept_row": records[-1],
            }
            for inv, unit, line_type, nd, records in cur.fetchall()
        ]
        cur.execute(
            f"""
            DELETE FROM {STAGING_TABLE} s USING upsert_repeated r
             WHERE (s.invoice_id, s.unit_id, s.line_type, s.nd) = (r.invoice_id, r.unit_id, r.line_type, r.nd)
               AND s.record < r.last
            """
        )
        duplicates = int(cur.rowcount)
    cur.execute(f"CREATE UNIQUE INDEX ON {STAGING_TABLE} (record)")
    cur.execute(f"ANALYZE {STAGING_TABLE}")
    return duplicates, examples


def _lock_existing_lines(cur: Any) -> tuple[int, int]:
    """Lock (``FOR UPDATE``) the lines the file's keys already have, keeping their values
    for the audit rows' ``old_data`` and whether the file changes them: (how many lines,
    how many the file changes). Locked, they cannot change until the run ends, so the
    upsert below rewrites exactly the ``changed`` ones."""
    cur.execute(
        f"""
        CREATE TEMPORARY TABLE upsert_old ON COMMIT DROP AS
        SELECT s.record, l.id, l.invoice_id, l.unit_id, l.line_type, l.description, l.quantity, l.amount,
               {_CHANGES_IN_LOCK} AS changed
          FROM {STAGING_TABLE} s JOIN public.invoice_lines l ON {_KEY_JOIN}
           FOR UPDATE OF l
        """
    )
    cur.execute(
        """
        ALTER TABLE upsert_old ADD PRIMARY KEY (record);
        ANALYZE upsert_old;
        """
    )
    cur.execute("SELECT count(*), count(*) FILTER (WHERE changed) FROM upsert_old")
    existing, changed = cur.fetchone()
    return int(existing), int(changed)


def _upsert_batches(
    cur: Any, *, keys: int, batch_size: int, report: Reporter, ids: dict[str, Any]
) -> tuple[int, int, int]:
    """Write the rows ``batch_size`` at a time in the file's order: (batches, inserted,
    updated). Per batch, the rows whose key has no line are inserted; the rows whose line
    step 4 locked go through ``INSERT ... ON CONFLICT (the dedup key) DO UPDATE ... WHERE``
    the values differ, so identical lines are not rewritten.

    The new keys need no conflict handling: their lines did not exist when the existing ones
    were locked, and a line another session inserted since makes the INSERT fail on the
    dedup index; the run then stops (the line would not be ours) and names the key. Leaving
    them out of ON CONFLICT spares its speculative insertion (2.2 s per 900,000 new lines,
    measured once).
    """
    cur.execute(
        f"""
        SELECT record FROM (SELECT record, row_number() OVER (ORDER BY record) AS n FROM {STAGING_TABLE}) r
         WHERE n %% %(size)s = 0 OR n = %(keys)s ORDER BY record
        """,
        {"size": batch_size, "keys": keys},
    )
    highs = [high for (high,) in cur.fetchall()]
    report.progress(0, len(highs) + 1, f"Normalized: {keys} keys, {len(highs)} batches to upsert")
    inserted = updated = 0
    low = 0
    for number, high in enumerate(highs, start=1):
        report.check_cancel()
        params = {**ids, "low": low, "high": high}
        try:
            cur.execute(_INSERT_NEW, params)
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != DEDUP_INDEX.name:
                raise
            raise UpsertFailed(
                f"another session inserted {_conflicting_line(exc)} while the upsert ran; "
                "nothing was committed: run it again with a new run id"
            ) from None
        inserted += cur.rowcount
        cur.execute(_UPSERT_CHANGED, params)
        updated += cur.rowcount
        low = high
        report.progress(number, len(highs) + 1, f"Batch {number} of {len(highs)}")
    return len(highs), inserted, updated


def _conflicting_line(exc: psycopg.Error) -> str:
    """The line a unique violation names ("Key (...)=(INV-2, U-1, FEE, fee) already exists.";
    the server may word it in another language)."""
    found = re.search(r"\)=\((.*)\)", exc.diag.message_detail or "")
    return f"a line with the key ({found.group(1)})" if found else "a line with a key of the file"


# Both write in the file's order (ORDER BY): the new ids ascend, so the primary key (and the
# dedup index, for a file sorted by invoice) takes each insert at its right edge. Without it
# the anti-join hands the rows over in hash order (measured once: 8.4 s instead of 5.8 s
# for 900,000 new lines).
_LINE_COLUMNS = "id, invoice_id, unit_id, line_type, description, normalized_description, quantity, amount"
_LINE_ROW = f"{_NEW_ID}, s.invoice_id, s.unit_id, s.line_type, s.description, s.nd, s.quantity, s.amount"
_BATCH = "s.record > %(low)s AND s.record <= %(high)s"
_INSERT_NEW = f"""
    INSERT INTO public.invoice_lines ({_LINE_COLUMNS})
    SELECT {_LINE_ROW} FROM {STAGING_TABLE} s
     WHERE {_BATCH} AND NOT EXISTS (SELECT 1 FROM upsert_old o WHERE o.record = s.record)
     ORDER BY s.record
"""
_CHANGES_IN_LOCK = _changes("s")
_CHANGES_IN_UPSERT = _changes("excluded")
_SET_VALUES = ", ".join(f"{c} = excluded.{c}" for c in _UPDATED_VALUES)
_UPSERT_CHANGED = f"""
    INSERT INTO public.invoice_lines AS l ({_LINE_COLUMNS})
    SELECT {_LINE_ROW} FROM {STAGING_TABLE} s JOIN upsert_old o ON o.record = s.record
     WHERE {_BATCH} AND o.changed
     ORDER BY s.record
        ON CONFLICT (invoice_id, unit_id, line_type, normalized_description)
        DO UPDATE SET {_SET_VALUES} WHERE {_CHANGES_IN_UPSERT}
"""


# The audit row of a changed line (reconciliation.auditlog), in the file's row order: every
# row whose key had no line (inserted), and the rows whose line was rewritten (updated).
_LINE_VALUES = ("amount", "description", "invoice_id", "line_type", "quantity", "unit_id")
_OLD_DATA = AuditObject(columns=_LINE_VALUES)
_NEW_VALUES = ", ".join(f"s.{c} AS new_{c}" for c in _LINE_VALUES)
_OLD_VALUES = ", ".join(f"o.{c} AS old_{c}" for c in _LINE_VALUES)
_AUDIT_ROWS = f"""
    SELECT s.record AS k, coalesce(o.id, {_NEW_ID}) AS record_id,
           CASE WHEN o.id IS NULL THEN 'insert' ELSE 'update' END AS new_operation,
           {_NEW_VALUES}, {_OLD_VALUES}
      FROM {STAGING_TABLE} s
      LEFT JOIN upsert_old o ON o.record = s.record AND o.record > %(low)s AND o.record <= %(high)s
     WHERE s.record > %(low)s AND s.record <= %(high)s AND (o.id IS NULL OR o.changed)
"""


def _new_data(run_id: str) -> AuditObject:
    """new_data of the run's rows: the line's values, the operation and the run id."""
    return AuditObject(columns=(*_LINE_VALUES, "operation"), constants={"run_id": run_id})
