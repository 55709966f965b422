"""Batch upsert of missing invoice lines (runbook §3), as one transaction.

What one run does, in one transaction of the environment database:

1. refuses to start if the dedup index is missing or invalid, or the run id was used;
2. streams the CSV with COPY into the temporary table ``tmp_invoice_lines``, whose column
   types and constraints are the CSV contract (``reconciliation.csvfile``): a bad value
   stops it with the file's line and column, before anything is written;
3. normalizes descriptions with the runbook's expression
   ``regexp_replace(lower(trim(description)), '\\s+', ' ', 'g')`` and keeps, of rows whose
   keys collide after normalization, the last one in the file (the others are counted and
   reported: the upsert never meets the same key twice, so "ON CONFLICT DO UPDATE command
   cannot affect row a second time" cannot happen, within a batch or across batches);
4. per batch of ``batch_size`` keys: locks the existing lines it will meet
   (``FOR UPDATE``) and keeps their values, then
   ``INSERT ... ON CONFLICT (invoice_id, unit_id, line_type, normalized_description)
   DO UPDATE ... WHERE (description, quantity, amount) IS DISTINCT FROM ...``: identical
   lines are not rewritten (and get no audit row);
5. writes one ``audit_logs`` row per inserted or updated line, chained (``audit.chain``):
   the content hashes are computed in SQL for all rows at once, the chain step in order.
   The table is locked against other writers (SHARE ROW EXCLUSIVE) from reading the
   chain's head until commit, the rows' ``created_at`` are one microsecond apart after
   the head, and the commit waits until the clock has passed the last of them, so rows
   appended after ours sort after ours;
6. commits, or for a dry run rolls back, reporting the same counts.

Any error anywhere rolls the whole transaction back: nothing is committed.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings

from reconciliation.auditlog import SCHEME, append_audit_rows, json_object_sql
from reconciliation.csvfile import STAGING_TABLE, STAGING_TABLE_SQL, CsvError, CsvHeader, copy_error

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
    from reconciliation.indexes import DedupIndexUnusable, require_dedup_index

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
            keys = _prepare_source(cur)
            outcome.duplicates = outcome.rows_streamed - keys
            if outcome.duplicates:
                outcome.duplicate_examples = _duplicate_examples(cur)
                report.log(
                    f"{PREFIX} {outcome.duplicates} row(s) repeat a key of a later row after normalization; "
                    "the last row in the file wins"
                )
            upsert_started = time.monotonic()
            outcome.batches = _upsert_batches(cur, keys=keys, batch_size=batch_size, report=report)
            cur.execute(
                "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)"
                " FROM upsert_changed"
            )
            outcome.inserted, outcome.updated = cur.fetchone()
            outcome.unchanged = keys - outcome.inserted - outcome.updated
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
                params={"run_id": run_id},
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


_NORMALIZED = r"regexp_replace(lower(trim(description)), '\s+', ' ', 'g')"  # runbook §1.2, §3
_KEY_ORDER = 'invoice_id COLLATE "C", unit_id COLLATE "C", line_type COLLATE "C", nd COLLATE "C"'


def _prepare_source(cur: Any) -> int:
    """One row per key, the file's last; numbered in key order for batching."""
    cur.execute(
        f"""
        CREATE TEMPORARY TABLE upsert_source ON COMMIT DROP AS
        SELECT row_number() OVER () AS seq, d.*
          FROM (SELECT DISTINCT ON ({_KEY_ORDER})
                       record, invoice_id::text, unit_id::text, line_type::text, description::text, nd,
                       quantity, amount
                  FROM (SELECT t.*, {_NORMALIZED} AS nd FROM {STAGING_TABLE} t) n
                 ORDER BY {_KEY_ORDER}, record DESC) d
        """
    )
    keys = int(cur.rowcount)
    cur.execute("CREATE INDEX ON upsert_source (seq)")
    cur.execute("ANALYZE upsert_source")
    cur.execute(
        """
        CREATE TEMPORARY TABLE upsert_old (id uuid PRIMARY KEY, invoice_id text, unit_id text, line_type text,
                                           description text, quantity text, amount text) ON COMMIT DROP;
        CREATE TEMPORARY SEQUENCE upsert_k;
        CREATE TEMPORARY TABLE upsert_changed (k bigint, id uuid, inserted boolean, invoice_id text,
                                               unit_id text, line_type text, description text,
                                               quantity text, amount text) ON COMMIT DROP;
        """
    )
    return keys


def _duplicate_examples(cur: Any) -> list[dict[str, Any]]:
    cur.execute(
        f"""
        SELECT invoice_id, unit_id, line_type, nd, array_agg(record ORDER BY record)
          FROM (SELECT t.*, {_NORMALIZED} AS nd FROM {STAGING_TABLE} t) n
         GROUP BY 1, 2, 3, 4 HAVING count(*) > 1
         ORDER BY min(record) LIMIT %s
        """,
        [DUPLICATE_EXAMPLES],
    )
    return [
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


def _upsert_batches(cur: Any, *, keys: int, batch_size: int, report: Reporter) -> int:
    batches = -(-keys // batch_size)
    changed = 0  # upsert_changed.k of the last line changed so far
    report.progress(0, batches + 1, f"Normalized: {keys} keys, {batches} batches to upsert")
    for number, low in enumerate(range(0, keys, batch_size), start=1):
        report.check_cancel()
        bounds = {"low": low, "high": low + batch_size}
        cur.execute(
            """
            INSERT INTO upsert_old
            SELECT l.id, l.invoice_id, l.unit_id, l.line_type, l.description, l.quantity::text, l.amount::text
              FROM upsert_source s
              JOIN public.invoice_lines l
                ON l.invoice_id = s.invoice_id AND l.unit_id = s.unit_id AND l.line_type = s.line_type
               AND l.normalized_description = s.nd
             WHERE s.seq > %(low)s AND s.seq <= %(high)s
               FOR UPDATE OF l
            """,
            bounds,
        )
        cur.execute(
            """
            WITH up AS (
                INSERT INTO public.invoice_lines AS l
                       (invoice_id, unit_id, line_type, description, normalized_description, quantity, amount)
                SELECT invoice_id, unit_id, line_type, description, nd, quantity, amount
                  FROM upsert_source WHERE seq > %(low)s AND seq <= %(high)s ORDER BY seq
                    ON CONFLICT (invoice_id, unit_id, line_type, normalized_description) DO UPDATE
                   SET description = excluded.description, quantity = excluded.quantity,
                       amount = excluded.amount
                 WHERE (l.description, l.quantity, l.amount)
                       IS DISTINCT FROM (excluded.description, excluded.quantity, excluded.amount)
                RETURNING l.id, l.xmax = 0 AS inserted, l.invoice_id, l.unit_id, l.line_type, l.description,
                          l.quantity::text AS quantity, l.amount::text AS amount
            )
            INSERT INTO upsert_changed
            SELECT nextval('upsert_k'), id, inserted, invoice_id, unit_id, line_type, description,
                   quantity, amount
              FROM up
            """,
            bounds,
        )
        written = cur.rowcount
        # An update we hold no old values for: another session inserted the key after we
        # looked. Its old_data would be unknown, so the run stops rather than guess.
        cur.execute(
            """
            SELECT c.invoice_id, c.unit_id, c.line_type FROM upsert_changed c
             WHERE c.k > %(done)s AND NOT c.inserted
               AND NOT EXISTS (SELECT 1 FROM upsert_old o WHERE o.id = c.id)
             LIMIT 1
            """,
            {"done": changed},
        )
        raced = cur.fetchone()
        if raced is not None:
            raise UpsertFailed(
                "another session inserted line {}/{}/{} while the upsert ran; "
                "run it again with a new run id".format(*raced)
            )
        changed += written
        report.progress(number, batches + 1, f"Batch {number} of {batches}")
    cur.execute("CREATE INDEX ON upsert_changed (k)")
    return batches


# The audit row of a changed line (reconciliation.auditlog), one per upsert_changed.k.
_LINE_VALUES = ("amount", "description", "invoice_id", "line_type", "quantity", "unit_id")
_NEW_JSON = json_object_sql(
    {
        **{column: f"c.{column}" for column in _LINE_VALUES},
        "hash_scheme": SCHEME,
        "operation": "CASE WHEN c.inserted THEN 'insert' ELSE 'update' END",
        "run_id": "%(run_id)s::text",
    }
)
_OLD_JSON = json_object_sql({column: f"o.{column}" for column in _LINE_VALUES})
# Not materialized: 1M rows of JSON would be ~500 MB of temporary table.
_AUDIT_ROWS = f"""
    SELECT c.k, c.id::text AS record_id,
           %(first)s::timestamptz + (c.k - 1) * interval '1 microsecond' AS created_at,
           {_NEW_JSON} AS new_json,
           CASE WHEN c.inserted THEN NULL ELSE {_OLD_JSON} END AS old_json
      FROM upsert_changed c LEFT JOIN upsert_old o ON o.id = c.id
     WHERE c.k > %(low)s AND c.k <= %(high)s
"""
