"""Reads of the stuck-lock monitor: the seed report, made live.

The seed analysis (`billing-run-lock-analysis.md`) asked one question of each environment:
which billing runs are COMPLETED yet still hold rows in ``lock.locks``? Its query is
``STUCK_RUNS_SQL`` below, verbatim but for ``process_stage``; every figure here must equal
what that query (or a plain count) returns against the same database.

Scale (BRIEF §4): a million lock rows, a run holding 150,000+, tens of thousands of runs,
and no index on ``lock.locks(billing_id)`` that we can count on. So each page asks one
set-based query that reads ``lock.locks`` once, statuses are compared as text (labels we
have never seen must not break anything), and optional columns (``create_date`` on locks,
a holder column) are looked up in the catalog rather than assumed.

Platform timestamps are ``timestamp without time zone`` in the environment's configured
zone (``time_zone`` in the environments file); they are made aware here, once.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import connections
from django.utils import timezone
from django.utils.translation import gettext as _

from billing_ops.environments import Environment, environment_connect
from billing_ops.formats import grouped
from billing_ops.selectors import billing_status_labels

COMPLETED = "COMPLETED"
IN_PROGRESS_ACCOUNTING = "IN_PROGRESS_ACCOUNTING"
# The stage a run starts in; a COMPLETED run still in it was never "made real".
INITIAL_PROCESS_STAGE = "DRAFT"
# The error path of BillingRunStartAccountingService sets GENERATED; any label of the
# enum that reads like a failure counts too (read from the database, never listed here).
ERROR_PATH_STATUS = "GENERATED"
FAILURE_LABEL_RE = re.compile(r"FAIL|ERROR|ABORT|CANCEL|REJECT", re.IGNORECASE)
# Optional lock columns naming who holds a lock that belongs to no run, first match wins.
HOLDER_COLUMNS = ("locked_by", "holder", "username", "user_name", "user_id", "created_by")
PROCEDURE_DELETE_RE = re.compile(r"\bDELETE\s+FROM\s+(ONLY\s+)?\"?lock\"?\s*\.\s*\"?locks\"?", re.IGNORECASE)
SQL_COMMENT_RE = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)

# The seed report's query, as the analyst ran it (plus process_stage, which the overview shows).
STUCK_RUNS_SQL = """
SELECT
    b.id AS billing_run_id,
    b.billing_number,
    b.status::text AS status,
    b.process_stage,
    b.create_date,
    b.modify_date,
    COUNT(l.id) AS lock_count,
    STRING_AGG(DISTINCT l.entity_type, ', ' ORDER BY l.entity_type) AS locked_entity_types
FROM billing.billings b
INNER JOIN lock.locks l ON l.billing_id = b.id
WHERE b.status::text = 'COMPLETED'
GROUP BY b.id, b.billing_number, b.status, b.process_stage, b.create_date, b.modify_date
ORDER BY b.id DESC
"""


# --- Catalog --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockTableShape:
    """What the environment's lock.locks actually has beyond the contract's columns."""

    has_create_date: bool
    holder_column: str | None
    billing_id_indexed: bool

    def holder_sql(self, table: str = "") -> str:
        """The holder column as text, or NULL where there is none (a name from HOLDER_COLUMNS)."""
        prefix = f"{table}." if table else ""
        return f'{prefix}"{self.holder_column}"::text' if self.holder_column else "NULL::text"

    def create_date_sql(self, table: str = "") -> str:
        """create_date, or NULL where the platform's lock.locks has none."""
        prefix = f"{table}." if table else ""
        return f"{prefix}create_date" if self.has_create_date else "NULL::timestamp"


def lock_table_shape(cursor: Any) -> LockTableShape:
    cursor.execute(
        """
        SELECT a.attname
        FROM pg_attribute a
        WHERE a.attrelid = 'lock.locks'::regclass AND a.attnum > 0 AND NOT a.attisdropped
        """
    )
    columns = {row[0] for row in cursor.fetchall()}
    cursor.execute(
        """
        SELECT EXISTS (
            SELECT 1 FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = 'lock.locks'::regclass AND a.attname = 'billing_id' AND i.indisvalid
        )
        """
    )
    return LockTableShape(
        has_create_date="create_date" in columns,
        holder_column=next((c for c in HOLDER_COLUMNS if c in columns), None),
        billing_id_indexed=bool(cursor.fetchone()[0]),
    )


def error_path_statuses(labels: list[str]) -> list[str]:
    """GENERATED and every label of the environment's enum that reads like a failure."""
    return [label for label in labels if label == ERROR_PATH_STATUS or FAILURE_LABEL_RE.search(label)]


@dataclass(frozen=True)
class ProcedureHealth:
    exists: bool
    deletes_locks: bool
    definition: str = ""

    @property
    def verdict(self) -> str:
        if not self.exists:
            return _("missing")
        return _("deletes locks") if self.deletes_locks else _("does not delete locks")


def procedure_health_from(cursor: Any) -> ProcedureHealth:
    """Does billing_run.make_billing_run_real exist, and does its body delete the locks?"""
    cursor.execute(
        """
        SELECT pg_get_functiondef(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'billing_run' AND p.proname = 'make_billing_run_real'
        ORDER BY p.oid
        LIMIT 1
        """
    )
    row = cursor.fetchone()
    if row is None:
        return ProcedureHealth(exists=False, deletes_locks=False)
    definition = row[0]
    body = SQL_COMMENT_RE.sub(" ", definition)  # a commented-out DELETE deletes nothing
    return ProcedureHealth(
        exists=True, deletes_locks=bool(PROCEDURE_DELETE_RE.search(body)), definition=definition
    )


def procedure_health(env: Environment) -> ProcedureHealth:
    with connections[env.alias].cursor() as cursor:
        return procedure_health_from(cursor)


# --- Time ---------------------------------------------------------------------------------


def aware(env: Environment, value: datetime | None) -> datetime | None:
    """A platform timestamp (naive, in the environment's zone) as an aware datetime."""
    if value is None or timezone.is_aware(value):
        return value
    return value.replace(tzinfo=ZoneInfo(env.time_zone))


# --- The overview's figures ---------------------------------------------------------------------


@dataclass(frozen=True)
class LockFigures:
    total_runs: int
    completed_runs: int
    completed_with_locks: int
    total_locks: int
    locks_without_billing: int
    stuck_locks: int  # locks held by COMPLETED runs
    stale_runs: int
    stale_runs_locks: int
    error_path_runs_with_locks: int
    unreal_completed_runs: int  # COMPLETED, process stage never advanced
    oldest_stuck_lock_at: datetime | None  # oldest lock of a COMPLETED run (or that run's modify date)
    procedure: ProcedureHealth
    shape: LockTableShape
    statuses: list[str]
    duration_ms: float

    def oldest_stuck_age(self, now: datetime | None = None) -> timedelta | None:
        if self.oldest_stuck_lock_at is None:
            return None
        return (now or timezone.now()) - self.oldest_stuck_lock_at


FIGURES_SQL = """
WITH per_run AS (
    SELECT l.billing_id, count(*) AS locks, {oldest_lock} AS oldest_lock
    FROM lock.locks l
    GROUP BY l.billing_id
),
held AS (
    SELECT b.id, b.status::text AS status, b.process_stage, b.modify_date, r.locks, r.oldest_lock
    FROM per_run r JOIN billing.billings b ON b.id = r.billing_id
)
SELECT
    (SELECT count(*) FROM billing.billings) AS total_runs,
    (SELECT count(*) FROM billing.billings WHERE status::text = 'COMPLETED') AS completed_runs,
    (SELECT count(*) FROM held WHERE status = 'COMPLETED') AS completed_with_locks,
    (SELECT coalesce(sum(locks), 0) FROM per_run) AS total_locks,
    (SELECT coalesce(sum(locks), 0) FROM per_run WHERE billing_id IS NULL) AS locks_without_billing,
    (SELECT coalesce(sum(locks), 0) FROM held WHERE status = 'COMPLETED') AS stuck_locks,
    (SELECT count(*) FROM billing.billings
      WHERE status::text = 'IN_PROGRESS_ACCOUNTING'
        AND modify_date < (now() AT TIME ZONE %(tz)s) - %(stale)s) AS stale_runs,
    (SELECT coalesce(sum(locks), 0) FROM held
      WHERE status = 'IN_PROGRESS_ACCOUNTING'
        AND modify_date < (now() AT TIME ZONE %(tz)s) - %(stale)s) AS stale_runs_locks,
    (SELECT count(*) FROM held WHERE status = ANY(%(error_statuses)s)) AS error_path_runs_with_locks,
    (SELECT count(*) FROM billing.billings
      WHERE status::text = 'COMPLETED' AND process_stage = %(initial_stage)s) AS unreal_completed_runs,
    (SELECT min(coalesce(oldest_lock, modify_date)) FROM held WHERE status = 'COMPLETED') AS oldest_stuck
"""


def lock_figures_from(env: Environment, cursor: Any) -> LockFigures:
    """All of the overview's figures for one environment, reading lock.locks once."""
    started = time.monotonic()
    shape = lock_table_shape(cursor)
    statuses = billing_status_labels(cursor)
    procedure = procedure_health_from(cursor)
    oldest_lock = f"min({shape.create_date_sql('l')})"
    sql = FIGURES_SQL.format(oldest_lock=oldest_lock)
    cursor.execute(
        sql,
        {
            "tz": env.time_zone,
            "stale": timedelta(minutes=settings.STALE_RUN_AFTER_MIN),
            "error_statuses": error_path_statuses(statuses),
            "initial_stage": INITIAL_PROCESS_STAGE,
        },
    )
    row = cursor.fetchone()
    return LockFigures(
        total_runs=row[0],
        completed_runs=row[1],
        completed_with_locks=row[2],
        total_locks=int(row[3]),
        locks_without_billing=int(row[4]),
        stuck_locks=int(row[5]),
        stale_runs=row[6],
        stale_runs_locks=int(row[7]),
        error_path_runs_with_locks=row[8],
        unreal_completed_runs=row[9],
        oldest_stuck_lock_at=aware(env, row[10]),
        procedure=procedure,
        shape=shape,
        statuses=statuses,
        duration_ms=round((time.monotonic() - started) * 1000, 1),
    )


@contextmanager
def overview_connection(env: Environment) -> Iterator[Any]:
    """A connection of its own (for a thread of run_per_environment), its statements bound
    by the overview's statement timeout: the overview's figures and the lock lookup."""
    with environment_connect(env, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = {int(settings.OVERVIEW_STATEMENT_TIMEOUT_MS):d}")
        yield conn


def lock_figures(env: Environment) -> LockFigures:
    """The figures within the overview's time budget."""
    with overview_connection(env) as conn, conn.cursor() as cursor:
        return lock_figures_from(env, cursor)


# --- Verdicts -----------------------------------------------------------------------------------


GREEN, AMBER, RED = "green", "amber", "red"


@dataclass(frozen=True)
class Verdict:
    colour: str
    reasons: list[str] = field(default_factory=list)


def verdict_for(figures: LockFigures | None, error: str = "") -> Verdict:
    """Red: unreachable, or finished runs still hold locks. Amber: something that will
    leak locks or may already be stuck. Green: nothing to do."""
    if figures is None:
        return Verdict(RED, [_("unreachable: %(error)s") % {"error": error} if error else _("unreachable")])
    red: list[str] = []
    amber: list[str] = []
    if figures.completed_with_locks:
        red.append(
            _("%(runs)s COMPLETED run(s) still hold %(locks)s lock(s)")
            % {"runs": grouped(figures.completed_with_locks), "locks": grouped(figures.stuck_locks)}
        )
    if figures.stale_runs:
        amber.append(
            _("%(runs)s IN_PROGRESS_ACCOUNTING run(s) unchanged for over %(min)s min")
            % {"runs": grouped(figures.stale_runs), "min": settings.STALE_RUN_AFTER_MIN}
        )
    if figures.error_path_runs_with_locks:
        amber.append(
            _("%(runs)s run(s) on the error path still hold locks")
            % {"runs": grouped(figures.error_path_runs_with_locks)}
        )
    if figures.unreal_completed_runs:
        amber.append(
            _("%(runs)s COMPLETED run(s) never left stage DRAFT")
            % {"runs": grouped(figures.unreal_completed_runs)}
        )
    if not figures.procedure.exists:
        amber.append(_("billing_run.make_billing_run_real is missing"))
    elif not figures.procedure.deletes_locks:
        amber.append(_("make_billing_run_real does not delete the run's locks"))
    if red:
        return Verdict(RED, red + amber)
    if amber:
        return Verdict(AMBER, amber)
    return Verdict(GREEN, [_("no finished run holds locks")])


@dataclass(frozen=True)
class EnvironmentStatus:
    env: Environment
    figures: LockFigures | None
    error: str = ""
    measured_at: datetime = field(default_factory=timezone.now)

    @property
    def reachable(self) -> bool:
        return self.figures is not None

    @property
    def verdict(self) -> Verdict:
        return verdict_for(self.figures, self.error)


def overview_wait_s() -> float:
    """How long a page that asks every environment (the overview, the lock lookup) waits
    for one: its connect timeout, the overview's statement timeout, and a second."""
    return settings.CONNECT_TIMEOUT_S + settings.OVERVIEW_STATEMENT_TIMEOUT_MS / 1000 + 1


# Figures measured lately by this process, by (environment key, URL): see environments_status.
_recent_figures: dict[tuple[str, str], EnvironmentStatus] = {}
_recent_figures_lock = threading.Lock()


def environments_status(envs: list[Environment], *, max_age_s: float = 0) -> list[EnvironmentStatus]:
    """Every environment's figures, concurrently; each bounded by its own timeouts.

    With ``max_age_s``, figures this process measured that recently are shown again instead
    of asking the environment: however many people have the overview open, an environment
    aggregates its lock.locks once per ``max_age_s`` per web process, not once per page view.
    Only figures are reused; an environment that failed is asked again next time."""
    from billing_ops.selectors import describe_error, run_per_environment

    now = timezone.now()
    with _recent_figures_lock:
        reused = {
            env.key: status
            for env in envs
            if (status := _recent_figures.get((env.key, env.url))) is not None
            and (now - status.measured_at).total_seconds() < max_age_s
        }
    asked = [env for env in envs if env.key not in reused]
    results = run_per_environment(lock_figures, asked, timeout_s=overview_wait_s())
    for env, result in zip(asked, results.values(), strict=True):
        if isinstance(result, LockFigures):
            reused[env.key] = EnvironmentStatus(env, result)
            if max_age_s > 0:
                with _recent_figures_lock:
                    _recent_figures[(env.key, env.url)] = reused[env.key]
        else:
            reused[env.key] = EnvironmentStatus(env, None, describe_error(result))
    return [reused[env.key] for env in envs]


# --- Runs and their locks -------------------------------------------------------------------


@dataclass(frozen=True)
class RunFilters:
    """Filters of the stuck-runs list; the lock filters restrict which locks are counted."""

    entity_type: str | None = None
    system_lock: bool | None = None
    min_locks: int | None = None
    created_from: date | None = None
    created_to: date | None = None


RUNS_WITH_LOCKS_SQL = """
SELECT
    b.id AS billing_run_id,
    b.billing_number,
    b.status::text AS status,
    b.process_stage,
    b.create_date,
    b.modify_date,
    COUNT(l.id) AS lock_count,
    STRING_AGG(DISTINCT l.entity_type, ', ' ORDER BY l.entity_type) AS locked_entity_types,
    COUNT(l.id) FILTER (WHERE l.system_lock) AS system_locks,
    {oldest_lock} AS oldest_lock
FROM billing.billings b
{join} lock.locks l ON l.billing_id = b.id {lock_filters}
WHERE {run_filters}
GROUP BY b.id, b.billing_number, b.status, b.process_stage, b.create_date, b.modify_date
{having}
ORDER BY b.id DESC
"""


def _runs_with_locks(
    env: Environment, *, run_where: str, params: dict[str, Any], filters: RunFilters, require_locks: bool
) -> list[dict[str, Any]]:
    lock_filters: list[str] = []
    run_filters = [run_where]
    params = dict(params)
    if filters.entity_type:
        lock_filters.append("l.entity_type = %(entity_type)s")
        params["entity_type"] = filters.entity_type
    if filters.system_lock is not None:
        lock_filters.append("l.system_lock = %(system_lock)s")
        params["system_lock"] = filters.system_lock
    if filters.created_from:
        run_filters.append("b.create_date >= %(created_from)s")
        params["created_from"] = filters.created_from
    if filters.created_to:
        run_filters.append("b.create_date < %(created_to)s")
        params["created_to"] = filters.created_to + timedelta(days=1)
    having = []
    if filters.min_locks:
        having.append("COUNT(l.id) >= %(min_locks)s")
        params["min_locks"] = filters.min_locks
    with connections[env.alias].cursor() as cursor:
        shape = lock_table_shape(cursor)
        oldest_lock = f"min({shape.create_date_sql('l')})"
        sql = RUNS_WITH_LOCKS_SQL.format(
            oldest_lock=oldest_lock,
            join="INNER JOIN" if require_locks else "LEFT JOIN",
            lock_filters=("AND " + " AND ".join(lock_filters)) if lock_filters else "",
            run_filters=" AND ".join(run_filters),
            having=("HAVING " + " AND ".join(having)) if having else "",
        )
        cursor.execute(sql, params)
        columns = [c.name for c in cursor.description]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:
        row["create_date"] = aware(env, row["create_date"])
        row["modify_date"] = aware(env, row["modify_date"])
        row["oldest_lock"] = aware(env, row["oldest_lock"])
        row["locked_entity_types"] = row["locked_entity_types"] or ""
    return rows


def stuck_runs(env: Environment, filters: RunFilters | None = None) -> list[dict[str, Any]]:
    """The seed report's runs: COMPLETED and holding locks (filters narrow it further)."""
    return _runs_with_locks(
        env,
        run_where="b.status::text = 'COMPLETED'",
        params={},
        filters=filters or RunFilters(),
        require_locks=True,
    )


def error_path_runs(env: Environment) -> list[dict[str, Any]]:
    """Runs whose accounting failed (GENERATED or a failure status) that still hold locks."""
    with connections[env.alias].cursor() as cursor:
        statuses = error_path_statuses(billing_status_labels(cursor))
    return _runs_with_locks(
        env,
        run_where="b.status::text = ANY(%(statuses)s)",
        params={"statuses": statuses},
        filters=RunFilters(),
        require_locks=True,
    )


def stale_runs(env: Environment) -> list[dict[str, Any]]:
    """IN_PROGRESS_ACCOUNTING runs not modified within the threshold: the thread likely died."""
    return _runs_with_locks(
        env,
        run_where="b.status::text = 'IN_PROGRESS_ACCOUNTING' AND b.modify_date < "
        "(now() AT TIME ZONE %(tz)s) - %(stale)s",
        params={"tz": env.time_zone, "stale": timedelta(minutes=settings.STALE_RUN_AFTER_MIN)},
        filters=RunFilters(),
        require_locks=False,
    )


def unreal_completed_runs(env: Environment) -> list[dict[str, Any]]:
    """COMPLETED runs still in their first process stage: never 'made real'."""
    return _runs_with_locks(
        env,
        run_where="b.status::text = 'COMPLETED' AND b.process_stage = %(stage)s",
        params={"stage": INITIAL_PROCESS_STAGE},
        filters=RunFilters(),
        require_locks=False,
    )


def locked_entity_types(env: Environment) -> list[str]:
    """Entity types present in the environment's locks (for the filter's choices)."""
    with connections[env.alias].cursor() as cursor:
        # A loose index scan would be faster, but this is one pass over a narrow column.
        cursor.execute("SELECT DISTINCT entity_type FROM lock.locks ORDER BY 1")
        return [row[0] for row in cursor.fetchall()]


@dataclass(frozen=True)
class LockGroup:
    entity_type: str
    system_lock: bool
    count: int
    oldest: datetime | None
    newest: datetime | None


@dataclass(frozen=True)
class RunLocks:
    groups: list[LockGroup]
    total: int
    system: int
    user: int
    oldest: datetime | None
    newest: datetime | None
    shape: LockTableShape


def run_locks_summary(env: Environment, run_id: int) -> RunLocks:
    """One run's locks grouped by entity type and system/user lock."""
    with connections[env.alias].cursor() as cursor:
        shape = lock_table_shape(cursor)
        dates = f"min({shape.create_date_sql()}), max({shape.create_date_sql()})"
        cursor.execute(
            f"SELECT entity_type, system_lock, count(*), {dates} FROM lock.locks "
            "WHERE billing_id = %s GROUP BY entity_type, system_lock ORDER BY entity_type, system_lock DESC",
            [run_id],
        )
        groups = [
            LockGroup(row[0], row[1], row[2], aware(env, row[3]), aware(env, row[4]))
            for row in cursor.fetchall()
        ]
    oldest = min((g.oldest for g in groups if g.oldest), default=None)
    newest = max((g.newest for g in groups if g.newest), default=None)
    return RunLocks(
        groups=groups,
        total=sum(g.count for g in groups),
        system=sum(g.count for g in groups if g.system_lock),
        user=sum(g.count for g in groups if not g.system_lock),
        oldest=oldest,
        newest=newest,
        shape=shape,
    )


def run_problem(env: Environment, run: Any, lock_count: int) -> str:
    """Why a run is listed: empty when it holds no locks or is legitimately running."""
    status = run.status
    if not lock_count:
        return ""
    if status == COMPLETED:
        return _("COMPLETED but still holds locks")
    if status == IN_PROGRESS_ACCOUNTING:
        modified = aware(env, run.modify_date)
        if modified and timezone.now() - modified > timedelta(minutes=settings.STALE_RUN_AFTER_MIN):
            return _("IN_PROGRESS_ACCOUNTING but unchanged for too long: its thread likely died")
        return ""
    if status == ERROR_PATH_STATUS or FAILURE_LABEL_RE.search(status):
        return _("accounting failed and the error path released no locks")
    return ""


@dataclass(frozen=True)
class OrphanLockGroup:
    entity_type: str
    system_lock: bool
    holder: str | None
    count: int
    oldest: datetime | None


def locks_without_run(env: Environment) -> tuple[list[OrphanLockGroup], LockTableShape]:
    """Locks with NULL billing_id, counted by entity type and holder (user or system lock,
    and the holder column where the platform has one)."""
    with connections[env.alias].cursor() as cursor:
        shape = lock_table_shape(cursor)
        holder = shape.holder_sql()
        oldest = f"min({shape.create_date_sql()})"
        cursor.execute(
            f"SELECT entity_type, system_lock, {holder} AS holder, count(*), {oldest} FROM lock.locks "
            "WHERE billing_id IS NULL GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 2, 3"
        )
        groups = [
            OrphanLockGroup(row[0], row[1], row[2], row[3], aware(env, row[4])) for row in cursor.fetchall()
        ]
    return groups, shape
