"""Who holds this lock? One query, every environment at once.

Ops are asked "why can't I edit customer 4711?". The answer is a row of ``lock.locks``:
in which environment, held by which run (or by whom, when ``billing_id`` is NULL), whether
that run is stuck, and how to release it. A query may be an entity id, a lock key, a
billing number or a run id; every reading is tried at once, each on an index the contract
promises:

* ``lock_key = ANY(...)`` (the platform's index on ``lock_key``): the query itself, and for
  an entity id the keys it would have under each entity type. How a lock key is built from
  its entity type and id is learned from the data, never assumed: a few rows per entity type
  give the text before and after the entity id in ``lock_key``. When some entity type's rows
  agree on no such format, the entity id is matched with ``entity_id = %s`` instead, a scan
  (the contract promises no index on ``entity_id``).
* ``billing_number = %s`` (unique) or ``id = %s``: a run, whose locks (150,000 and more) are
  summarised by entity type and system/user lock, never listed.

Each environment is read on a connection of its own, read only, within the overview's
statement timeout; every value of the query is a bound parameter.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from django.core.cache import cache
from psycopg.errors import QueryCanceled

from billing_ops.environments import Environment
from billing_ops.selectors import describe_error, run_per_environment
from locks.selectors import aware, lock_table_shape, overview_connection, overview_wait_s, run_problem

# Lock rows listed per environment; the total is always given.
LOCK_ROWS_LIMIT = 100
QUERY_MAX_CHARS = 200
# Rows per entity type the lock-key format is learned from (all must agree).
FORMAT_SAMPLE_ROWS = 3
# Learning reads every entity type of lock.locks (~150 ms on a million rows); a few minutes'
# staleness only matters for an entity type that first appears meanwhile.
FORMAT_CACHE_S = 300
RUN_ID_RE = re.compile(r"[0-9]{1,18}")  # fits a bigint

# How a row or run matched the query (stable codes: the command's JSON uses them).
MATCH_LOCK_KEY = "lock_key"
MATCH_ENTITY_ID = "entity_id"
MATCH_BILLING_NUMBER = "billing_number"
MATCH_RUN_ID = "run_id"


# --- The lock-key format -------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFormat:
    """lock_key = prefix + entity_id + suffix, for one entity type."""

    prefix: str
    suffix: str

    def key(self, entity_id: str) -> str:
        return f"{self.prefix}{entity_id}{self.suffix}"


@dataclass(frozen=True)
class LockKeyFormats:
    by_type: dict[str, KeyFormat]
    unformatted: list[str]  # entity types whose rows agree on no format

    @property
    def usable(self) -> bool:
        """Can every entity id be turned into lock keys? (Else: match entity_id.)"""
        return bool(self.by_type) and not self.unformatted

    def keys_for(self, entity_id: str) -> list[str]:
        return [fmt.key(entity_id) for fmt in self.by_type.values()]

    def examples(self) -> list[str]:
        return [f"{t} → {f.key('<id>')}" for t, f in sorted(self.by_type.items())]


def key_format_from(samples: list[tuple[str, str]]) -> KeyFormat | None:
    """The (prefix, suffix) around the entity id that every sample (entity_id, lock_key)
    shares; the rightmost one if several do; None if none."""
    common: set[tuple[str, str]] | None = None
    for entity_id, lock_key in samples:
        found: set[tuple[str, str]] = set()
        if entity_id:
            start = lock_key.find(entity_id)
            while start >= 0:
                found.add((lock_key[:start], lock_key[start + len(entity_id) :]))
                start = lock_key.find(entity_id, start + 1)
        common = found if common is None else common & found
    if not common:
        return None
    prefix, suffix = max(common, key=lambda c: len(c[0]))
    return KeyFormat(prefix, suffix)


LEARN_SQL = """
SELECT t.entity_type, s.entity_id, s.lock_key
FROM (SELECT DISTINCT entity_type FROM lock.locks) t
CROSS JOIN LATERAL (
    SELECT l.entity_id, l.lock_key FROM lock.locks l WHERE l.entity_type = t.entity_type LIMIT %s
) s
"""


def lock_key_formats_learn(cursor: Any) -> LockKeyFormats:
    cursor.execute(LEARN_SQL, [FORMAT_SAMPLE_ROWS])
    samples: dict[str, list[tuple[str, str]]] = {}
    for entity_type, entity_id, lock_key in cursor.fetchall():
        samples.setdefault(entity_type, []).append((entity_id, lock_key))
    by_type: dict[str, KeyFormat] = {}
    unformatted: list[str] = []
    for entity_type, rows in sorted(samples.items()):
        fmt = key_format_from(rows)
        if fmt is None:
            unformatted.append(entity_type)
        else:
            by_type[entity_type] = fmt
    return LockKeyFormats(by_type, unformatted)


def lock_key_formats(env: Environment, cursor: Any) -> LockKeyFormats:
    cache_key = f"locks:lock-key-formats:{env.key}"
    formats = cache.get(cache_key)
    if formats is None:
        formats = lock_key_formats_learn(cursor)
        cache.set(cache_key, formats, FORMAT_CACHE_S)
    return formats


# --- Results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HoldingRun:
    id: int
    billing_number: str
    status: str
    process_stage: str
    create_date: datetime | None
    modify_date: datetime | None
    problem: str  # why it is stuck (locks.selectors.run_problem); empty when it is not

    @property
    def stuck(self) -> bool:
        return bool(self.problem)


@dataclass(frozen=True)
class FoundLock:
    id: str
    lock_key: str
    entity_type: str
    entity_id: str
    system_lock: bool
    created: datetime | None
    billing_id: int | None
    run: HoldingRun | None  # None: no run (billing_id NULL), or its row is gone
    holder: str | None  # the platform's holder column, where it has one
    matched: str


@dataclass(frozen=True)
class LockCount:
    entity_type: str
    system_lock: bool
    count: int


@dataclass(frozen=True)
class FoundRun:
    run: HoldingRun
    matched: str
    groups: list[LockCount]

    @property
    def total(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def system(self) -> int:
        return sum(g.count for g in self.groups if g.system_lock)

    @property
    def user(self) -> int:
        return self.total - self.system


@dataclass(frozen=True)
class EnvironmentLookup:
    env: Environment
    locks: list[FoundLock] = field(default_factory=list)
    lock_total: int = 0
    runs: list[FoundRun] = field(default_factory=list)
    formats: LockKeyFormats | None = None
    holder_column: str | None = None
    duration_ms: float = 0.0
    error: str = ""
    timed_out: bool = False

    @property
    def reachable(self) -> bool:
        return not self.error

    @property
    def found(self) -> bool:
        return bool(self.locks or self.runs)

    @property
    def stuck_holders(self) -> list[HoldingRun]:
        """The stuck runs holding the locks found, once each: what a release would be for."""
        runs = {lock.run.id: lock.run for lock in self.locks if lock.run and lock.run.stuck}
        return list(runs.values())

    @property
    def worth_a_card(self) -> bool:
        """Something to show: results, an error, or the note on the entity_id scan."""
        return self.found or not self.reachable or self.by_entity_id_scan

    @property
    def by_entity_id_scan(self) -> bool:
        """The entity id was matched by scanning entity_id because some entity type's rows
        agree on no lock-key format (an empty lock.locks has nothing to learn or to scan)."""
        return self.formats is not None and bool(self.formats.unformatted)


@dataclass(frozen=True)
class LockLookup:
    query: str
    environments: list[EnvironmentLookup]

    @property
    def found(self) -> bool:
        return any(e.found for e in self.environments)

    @property
    def unreachable(self) -> list[EnvironmentLookup]:
        return [e for e in self.environments if not e.reachable]

    @property
    def shown(self) -> list[EnvironmentLookup]:
        """Environments with something to show: results, an error, or a note on the scan."""
        return [e for e in self.environments if e.worth_a_card]

    @property
    def empty(self) -> list[EnvironmentLookup]:
        """Environments that answered and hold nothing of it (listed on one line)."""
        return [e for e in self.environments if not e.worth_a_card]


def lookup_query_clean(query: str) -> str:
    """The query as searched: trimmed; empty when it cannot match (too long, or NUL, which
    PostgreSQL text cannot hold)."""
    query = query.strip()
    if len(query) > QUERY_MAX_CHARS or "\x00" in query:
        return ""
    return query


# --- Queries ---------------------------------------------------------------------------------


LOCKS_SQL = """
SELECT l.id, l.lock_key, l.entity_type, l.entity_id, l.system_lock, {created} AS created, {holder} AS holder,
       l.billing_id, b.id, b.billing_number, b.status::text, b.process_stage, b.create_date, b.modify_date,
       count(*) OVER () AS total
FROM lock.locks l
LEFT JOIN billing.billings b ON b.id = l.billing_id
WHERE {where}
ORDER BY l.entity_type, l.lock_key, l.id
LIMIT %(limit)s
"""

RUNS_SQL = """
SELECT b.id, b.billing_number, b.status::text, b.process_stage, b.create_date, b.modify_date
FROM billing.billings b
WHERE b.billing_number = %(query)s OR b.id = %(run_id)s
ORDER BY b.id
"""

RUN_LOCK_COUNTS_SQL = """
SELECT billing_id, entity_type, system_lock, count(*)
FROM lock.locks
WHERE billing_id = ANY(%s)
GROUP BY 1, 2, 3
ORDER BY 2, 3 DESC
"""


def _run(env: Environment, row: Any, *, lock_count: int) -> HoldingRun:
    run = HoldingRun(row[0], row[1], row[2], row[3], aware(env, row[4]), aware(env, row[5]), problem="")
    return replace(run, problem=run_problem(env, run, lock_count))


def lock_lookup_in(env: Environment, query: str) -> EnvironmentLookup:
    """Every lock and run in one environment that the query names."""
    started = time.monotonic()
    query = lookup_query_clean(query)
    if not query:
        return EnvironmentLookup(env)
    run_id = int(query) if RUN_ID_RE.fullmatch(query) else None
    with overview_connection(env) as conn:
        conn.execute("SET default_transaction_read_only = on")
        with conn.cursor() as cursor:
            shape = lock_table_shape(cursor)
            formats = lock_key_formats(env, cursor)
            params: dict[str, Any] = {"query": query, "limit": LOCK_ROWS_LIMIT}
            if formats.usable:
                where = "l.lock_key = ANY(%(keys)s)"
                params["keys"] = [query, *formats.keys_for(query)]
            else:
                where = "(l.lock_key = %(query)s OR l.entity_id = %(query)s)"
            created, holder = shape.create_date_sql("l"), shape.holder_sql("l")
            cursor.execute(LOCKS_SQL.format(created=created, holder=holder, where=where), params)
            rows = cursor.fetchall()
            locks = [
                FoundLock(
                    id=r[0],
                    lock_key=r[1],
                    entity_type=r[2],
                    entity_id=r[3],
                    system_lock=r[4],
                    created=aware(env, r[5]),
                    holder=r[6],
                    billing_id=r[7],
                    run=_run(env, r[8:14], lock_count=1) if r[8] is not None else None,
                    matched=MATCH_LOCK_KEY if r[1] == query else MATCH_ENTITY_ID,
                )
                for r in rows
            ]
            cursor.execute(RUNS_SQL, {"query": query, "run_id": run_id})
            run_rows = cursor.fetchall()
            counts: dict[int, list[LockCount]] = {r[0]: [] for r in run_rows}
            if run_rows:
                # One pass over lock.locks for all of them (no index on billing_id promised).
                cursor.execute(RUN_LOCK_COUNTS_SQL, [list(counts)])
                for billing_id, entity_type, system_lock, count in cursor.fetchall():
                    counts[billing_id].append(LockCount(entity_type, system_lock, count))
    found_runs = [
        FoundRun(
            run=_run(env, r, lock_count=sum(g.count for g in counts[r[0]])),
            matched=MATCH_BILLING_NUMBER if r[1] == query else MATCH_RUN_ID,
            groups=counts[r[0]],
        )
        for r in run_rows
    ]
    return EnvironmentLookup(
        env,
        locks=locks,
        lock_total=rows[0][14] if rows else 0,
        runs=found_runs,
        formats=formats,
        holder_column=shape.holder_column,
        duration_ms=round((time.monotonic() - started) * 1000, 1),
    )


def lock_lookup(query: str, envs: list[Environment]) -> LockLookup:
    """The query in every environment, concurrently, each bounded as the overview is; an
    environment that fails or does not answer in time is listed with its error."""
    results = run_per_environment(lambda env: lock_lookup_in(env, query), envs, timeout_s=overview_wait_s())
    return LockLookup(
        query=lookup_query_clean(query),
        environments=[
            result
            if isinstance(result, EnvironmentLookup)
            else EnvironmentLookup(
                env, error=describe_error(result), timed_out=isinstance(result, (TimeoutError, QueryCanceled))
            )
            for env, result in zip(envs, results.values(), strict=True)
        ],
    )
