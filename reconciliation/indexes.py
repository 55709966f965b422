"""The two indexes the runbook creates on ``public.invoice_lines`` (§2.2), checked and built.

``idx_invoice_lines_dedup`` is what the upsert's ``ON CONFLICT (invoice_id, unit_id,
line_type, normalized_description)`` stands on; ``idx_invoice_lines_unit_month`` serves
settlement queries. An index is judged from the catalogs (``pg_index``, ``pg_class``,
``pg_attribute``), never by its name alone: it must be on ``public.invoice_lines``,
valid and ready, unique where it must be, on exactly the expected key columns, and not
partial.

The runbook's ``CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS`` has a trap: a
``CONCURRENTLY`` build that fails (duplicates, a timeout, a cancel) leaves an *invalid*
index behind, and the next ``IF NOT EXISTS`` "succeeds" without building anything. So
``index_create_execute`` never uses ``IF NOT EXISTS``: it looks first, drops an invalid
leftover with ``DROP INDEX CONCURRENTLY``, builds with ``CREATE [UNIQUE] INDEX
CONCURRENTLY`` on an autocommit connection (it cannot run inside a transaction), and
checks the catalogs again afterwards. A unique build that fails because of duplicates
drops its own invalid leftover and points at the duplicate precheck.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from django.db import connections
from django.utils.translation import gettext as _
from psycopg import sql

from audit.services import SYSTEM_WORKER, audit_record
from billing_ops.environments import Environment, environment_connect
from billing_ops.selectors import describe_error
from billing_ops.services import Actor, JobContext, JobRefused, job_request

INDEX_CHECK_KIND = "index_check"
INDEX_CREATE_KIND = "index_create"

TABLE_SCHEMA = "public"
TABLE_NAME = "invoice_lines"
TABLE = f"{TABLE_SCHEMA}.{TABLE_NAME}"

# A CONCURRENTLY build reads the whole table twice; on a big table that takes long.
INDEX_BUILD_STATEMENT_TIMEOUT_MS = 3 * 3600 * 1000
# It also waits for every transaction that could use the table; not forever.
INDEX_BUILD_LOCK_TIMEOUT_MS = 60_000

# Problem codes, in the order they are reported.
MISSING = "missing"
WRONG_TABLE = "wrong_table"
INVALID = "invalid"
NOT_UNIQUE = "not_unique"
WRONG_COLUMNS = "wrong_columns"
PARTIAL = "partial"


@dataclass(frozen=True)
class ExpectedIndex:
    name: str
    columns: tuple[str, ...]
    unique: bool


DEDUP_INDEX = ExpectedIndex(
    "idx_invoice_lines_dedup", ("invoice_id", "unit_id", "line_type", "normalized_description"), unique=True
)
UNIT_MONTH_INDEX = ExpectedIndex("idx_invoice_lines_unit_month", ("unit_id", "invoice_id"), unique=False)
# The dedup index first: it is the one the upsert needs.
EXPECTED_INDEXES = (DEDUP_INDEX, UNIT_MONTH_INDEX)


@dataclass(frozen=True)
class IndexStatus:
    """One expected index as the catalogs describe it."""

    name: str
    expected_columns: tuple[str, ...]
    must_be_unique: bool
    exists: bool = False
    table: str = ""
    valid: bool = False
    ready: bool = False
    unique: bool = False
    # Key columns in order; an expression is shown as None.
    columns: tuple[str | None, ...] = ()
    partial: bool = False
    definition: str = ""
    oid: int | None = None
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def reasons(self) -> list[str]:
        return [problem_reason(self, p) for p in self.problems]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["reasons"] = self.reasons
        return data


def problem_reason(status: IndexStatus, problem: str) -> str:
    """What is wrong with the index, in words an operator can act on."""
    name = status.name
    expected = ", ".join(status.expected_columns)
    if problem == MISSING:
        return _("%(name)s does not exist: create it (runbook §2.2).") % {"name": name}
    if problem == WRONG_TABLE:
        return _("%(name)s is an index on %(table)s, not on %(expected)s.") % {
            "name": name,
            "table": status.table,
            "expected": TABLE,
        }
    if problem == INVALID:
        return _(
            "%(name)s exists but is INVALID (pg_index.indisvalid/indisready false): a CREATE INDEX "
            "CONCURRENTLY failed or is still running. It must be dropped and built again."
        ) % {"name": name}
    if problem == NOT_UNIQUE:
        return _("%(name)s is not UNIQUE: ON CONFLICT (%(columns)s) needs a unique index.") % {
            "name": name,
            "columns": expected,
        }
    if problem == WRONG_COLUMNS:
        actual = ", ".join(c if c is not None else _("(expression)") for c in status.columns)
        return _("%(name)s is on (%(actual)s), not on (%(expected)s).") % {
            "name": name,
            "actual": actual,
            "expected": expected,
        }
    if problem == PARTIAL:
        return _("%(name)s is a partial index (it has a WHERE clause): it does not cover every line.") % {
            "name": name
        }
    return problem


# The key columns of an index, in order (attnum 0 = an expression), from pg_attribute.
INDEX_CATALOG_SQL = """
SELECT c.relname,
       c.oid,
       tn.nspname || '.' || t.relname,
       i.indisvalid,
       i.indisready,
       i.indisunique,
       i.indpred IS NOT NULL,
       ARRAY(
           SELECT a.attname::text
             FROM unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, n)
             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum AND k.attnum > 0
            ORDER BY k.n
       ),
       pg_get_indexdef(c.oid)
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_index i ON i.indexrelid = c.oid
  JOIN pg_class t ON t.oid = i.indrelid
  JOIN pg_namespace tn ON tn.oid = t.relnamespace
 WHERE n.nspname = %s AND c.relname = ANY(%s)
"""


def index_statuses(
    cursor: Any, expected: Iterable[ExpectedIndex] = EXPECTED_INDEXES
) -> dict[str, IndexStatus]:
    """The expected indexes as the catalogs describe them, by name (in ``expected``'s order).

    ``cursor`` is any DB-API cursor on the environment (a Django cursor, or the psycopg
    cursor of a caller's own transaction): only catalogs are read, nothing is locked.
    """
    expected = tuple(expected)
    cursor.execute(INDEX_CATALOG_SQL, [TABLE_SCHEMA, [e.name for e in expected]])
    found = {row[0]: row for row in cursor.fetchall()}
    result: dict[str, IndexStatus] = {}
    for want in expected:
        row = found.get(want.name)
        if row is None:
            result[want.name] = IndexStatus(
                name=want.name, expected_columns=want.columns, must_be_unique=want.unique, problems=(MISSING,)
            )
            continue
        _name, oid, table, valid, ready, unique, partial, columns, definition = row
        columns = tuple(columns)
        problems: list[str] = []
        if table != TABLE:
            problems.append(WRONG_TABLE)
        if not (valid and ready):
            problems.append(INVALID)
        if want.unique and not unique:
            problems.append(NOT_UNIQUE)
        if columns != want.columns:
            problems.append(WRONG_COLUMNS)
        if partial:
            problems.append(PARTIAL)
        result[want.name] = IndexStatus(
            name=want.name,
            expected_columns=want.columns,
            must_be_unique=want.unique,
            exists=True,
            table=table,
            valid=bool(valid),
            ready=bool(ready),
            unique=bool(unique),
            columns=columns,
            partial=bool(partial),
            definition=definition,
            oid=int(oid),
            problems=tuple(problems),
        )
    return result


def dedup_index_status(env: Environment) -> dict[str, IndexStatus]:
    """Both indexes of runbook §2.2 in the environment: exists, valid, unique, columns."""
    with connections[env.alias].cursor() as cursor:
        return index_statuses(cursor)


def invalid_indexes(cursor: Any) -> list[dict[str, Any]]:
    """Runbook §2.2's last check: every index of the database that is not valid."""
    cursor.execute(
        """
        SELECT i.indexrelid::regclass::text, i.indrelid::regclass::text, i.indisvalid, i.indisready
          FROM pg_index i
         WHERE NOT i.indisvalid
         ORDER BY 1
        """
    )
    return [{"index": r[0], "table": r[1], "valid": r[2], "ready": r[3]} for r in cursor.fetchall()]


class DedupIndexUnusable(JobRefused):
    """The dedup index cannot back ``ON CONFLICT``: missing, invalid, not unique, wrong columns."""

    def __init__(self, status: IndexStatus) -> None:
        self.status = status
        self.problems = status.problems
        super().__init__(
            _("The upsert cannot run: %(reasons)s") % {"reasons": " ".join(status.reasons)}
            + " "
            + _("Run the index check and index creation on the Reconciliation page.")
        )


def require_dedup_index(cursor_or_env: Any) -> IndexStatus:
    """Raise DedupIndexUnusable naming the reason unless ``idx_invoice_lines_dedup`` is a
    valid, unique index on exactly the dedup key of ``public.invoice_lines``.

    Pass the psycopg (or Django) cursor of the upsert's own transaction to check inside
    it, or an Environment to check on its Django connection.
    """
    if isinstance(cursor_or_env, Environment):
        with connections[cursor_or_env.alias].cursor() as cursor:
            status = index_statuses(cursor, (DEDUP_INDEX,))[DEDUP_INDEX.name]
    else:
        status = index_statuses(cursor_or_env, (DEDUP_INDEX,))[DEDUP_INDEX.name]
    if not status.ok:
        raise DedupIndexUnusable(status)
    return status


# --- Jobs -------------------------------------------------------------------------------------


def index_check_request(*, actor: Actor, env: Environment) -> Any:
    return job_request(actor=actor, kind=INDEX_CHECK_KIND, environment=env.key)


def index_create_request(*, actor: Actor, env: Environment) -> Any:
    """Queue index creation (an approver's in protected environments); one at a time per
    environment: two concurrent builds of the same index would fail each other."""
    return job_request(
        actor=actor, kind=INDEX_CREATE_KIND, environment=env.key, claims=[f"invoice-line-indexes:{env.key}"]
    )


def index_check_execute(ctx: JobContext) -> dict[str, Any]:
    """Read-only: the two indexes' state, and every invalid index of the database."""
    assert ctx.env is not None
    try:
        with connections[ctx.env.alias].cursor() as cursor:
            statuses = index_statuses(cursor)
            others = invalid_indexes(cursor)
    finally:
        connections[ctx.env.alias].close()
    for status in statuses.values():
        ctx.log(status.name + ": " + (_("valid") if status.ok else " ".join(status.reasons)))
    return {
        "ok": all(s.ok for s in statuses.values()),
        "indexes": [s.as_dict() for s in statuses.values()],
        "invalid_indexes": others,
    }


class IndexBuildFailed(Exception):
    """An index could not be made valid; the message says what was done and why."""


def _create_statement(want: ExpectedIndex) -> sql.Composed:
    return sql.SQL("CREATE {unique}INDEX CONCURRENTLY {index} ON {table} ({columns})").format(
        unique=sql.SQL("UNIQUE " if want.unique else ""),
        index=sql.Identifier(want.name),
        table=sql.Identifier(TABLE_SCHEMA, TABLE_NAME),
        columns=sql.SQL(", ").join(sql.Identifier(c) for c in want.columns),
    )


def _drop_statement(want: ExpectedIndex) -> sql.Composed:
    # No IF EXISTS: we only drop what we have just seen, and want to hear if it vanished.
    return sql.SQL("DROP INDEX CONCURRENTLY {index}").format(index=sql.Identifier(TABLE_SCHEMA, want.name))


def _build_in_progress(conn: psycopg.Connection[Any], status: IndexStatus) -> int | None:
    """The pid of a session building this index right now (it is invalid until it ends)."""
    row = conn.execute(
        "SELECT pid FROM pg_stat_progress_create_index WHERE index_relid = %s LIMIT 1", [status.oid]
    ).fetchone()
    return int(row[0]) if row else None


def _audit(ctx: JobContext, action: str, want: ExpectedIndex, **outcome: Any) -> None:
    assert ctx.env is not None
    audit_record(
        actor=SYSTEM_WORKER,
        action=action,
        environment=ctx.env.key,
        object_type="index",
        object_id=want.name,
        params={"job_id": ctx.job_id, "table": TABLE},
        outcome=outcome,
    )


def _make_valid(ctx: JobContext, conn: psycopg.Connection[Any], want: ExpectedIndex) -> dict[str, Any]:
    """Make one expected index valid; returns what was done, raises IndexBuildFailed."""
    status = index_statuses(conn.cursor(), (want,))[want.name]
    outcome: dict[str, Any] = {"name": want.name, "before": status.as_dict(), "dropped_invalid": False}
    if status.ok:
        ctx.log(_("%(name)s is valid: nothing to do.") % {"name": want.name})
        return {**outcome, "action": "none"}
    if status.exists and (WRONG_TABLE in status.problems or INVALID not in status.problems):
        # A valid index under our name with another definition may be someone's on purpose.
        raise IndexBuildFailed(
            " ".join(status.reasons)
            + " "
            + _("It is valid, so it is left alone: a DBA must decide whether to drop it.")
        )
    if status.exists:
        builder = _build_in_progress(conn, status)
        if builder is not None:
            raise IndexBuildFailed(
                _("%(name)s is being built right now by session %(pid)s; wait for it and check again.")
                % {"name": want.name, "pid": builder}
            )
        ctx.log(
            _("%(name)s is INVALID (left by a failed CONCURRENTLY build): dropping it to build it again.")
            % {"name": want.name},
            level="warning",
        )
        conn.execute(_drop_statement(want))
        _audit(ctx, "index.dropped_invalid", want, definition=status.definition, reason="invalid")
        outcome["dropped_invalid"] = True
    ctx.log(_("Building %(name)s CONCURRENTLY.") % {"name": want.name})
    started = time.monotonic()
    try:
        conn.execute(_create_statement(want))
    except psycopg.Error as exc:
        _build_failed(ctx, conn, want, exc, outcome)
    duration_ms = round((time.monotonic() - started) * 1000)
    after = index_statuses(conn.cursor(), (want,))[want.name]
    if not after.ok:  # pragma: no cover - PostgreSQL reported success; say so if it lied
        raise IndexBuildFailed(" ".join(after.reasons))
    _audit(
        ctx,
        "index.created",
        want,
        definition=after.definition,
        rebuilt_after_invalid=outcome["dropped_invalid"],
        duration_ms=duration_ms,
    )
    ctx.log(_("%(name)s built and valid in %(ms)s ms.") % {"name": want.name, "ms": duration_ms})
    return {
        **outcome,
        "action": "rebuilt" if outcome["dropped_invalid"] else "created",
        "after": after.as_dict(),
        "duration_ms": duration_ms,
    }


def _build_failed(
    ctx: JobContext,
    conn: psycopg.Connection[Any],
    want: ExpectedIndex,
    exc: psycopg.Error,
    outcome: dict[str, Any],
) -> None:
    """A CONCURRENTLY build failed: drop the invalid index it leaves, then raise saying why."""
    leftover = index_statuses(conn.cursor(), (want,))[want.name]
    dropped = False
    if leftover.exists and INVALID in leftover.problems and WRONG_TABLE not in leftover.problems:
        conn.execute(_drop_statement(want))
        dropped = True
    detail = describe_error(exc)
    if exc.diag.message_detail:
        detail += f" ({exc.diag.message_detail})"
    if isinstance(exc, psycopg.errors.UniqueViolation):
        message = _(
            "%(name)s cannot be built UNIQUE: invoice_lines holds duplicate lines. Run the duplicate "
            "precheck (runbook §1.2) and resolve the groups it finds (§5.1), then create the index again."
        ) % {"name": want.name}
    else:
        message = _("Building %(name)s failed.") % {"name": want.name}
    if dropped:
        message += " " + _("The invalid index the failed build left behind was dropped.")
    _audit(
        ctx,
        "index.build_failed",
        want,
        error=detail,
        dropped_leftover=dropped,
        dropped_invalid_before=outcome["dropped_invalid"],
    )
    ctx.log(f"{message} {detail}", level="error")
    raise IndexBuildFailed(f"{message} {detail}") from exc


def index_create_execute(ctx: JobContext) -> dict[str, Any]:
    """Make both indexes valid, CONCURRENTLY, outside any transaction (runbook §2.2)."""
    assert ctx.env is not None
    outcomes: list[dict[str, Any]] = []
    failures: list[str] = []
    ctx.progress(0, len(EXPECTED_INDEXES))
    with environment_connect(ctx.env, autocommit=True) as conn:
        conn.execute(
            sql.SQL("SET statement_timeout = {}").format(sql.Literal(INDEX_BUILD_STATEMENT_TIMEOUT_MS))
        )
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(INDEX_BUILD_LOCK_TIMEOUT_MS)))
        for n, want in enumerate(EXPECTED_INDEXES, start=1):
            ctx.check_cancel()
            try:
                outcomes.append(_make_valid(ctx, conn, want))
            except IndexBuildFailed as exc:
                failures.append(str(exc))
                outcomes.append({"name": want.name, "action": "failed", "error": str(exc)})
            ctx.progress(n, len(EXPECTED_INDEXES), want.name)
        statuses = index_statuses(conn.cursor())
    if failures:
        # The job fails with every reason; what was built stays built (each build commits).
        done = [o["name"] for o in outcomes if o["action"] in ("created", "rebuilt")]
        prefix = _("Built: %(names)s. ") % {"names": ", ".join(done)} if done else ""
        raise IndexBuildFailed(prefix + " ".join(failures))
    return {
        "ok": all(s.ok for s in statuses.values()),
        "indexes": outcomes,
        "after": [s.as_dict() for s in statuses.values()],
    }
