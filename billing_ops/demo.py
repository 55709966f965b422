"""The demo data: every environment built to tell the story of the seed documents.

A demo is only convincing if it shows the problem the analysts found, at the size they
found it: Test with run 1620 (BILLING202512220055) still holding 1,291 locks after it
COMPLETED, Dev with 178 such runs and a million lock rows, the clean environments next to
them, and Production with runs that hold locks *legitimately* because they are still
running. Test and Dev also get the broken ``make_billing_run_real`` (no ``DELETE FROM
lock.locks``) that the lock-release analysis names as the cause.

Rules the code below keeps:

* Only environments marked ``demo = true`` are touched, and the contract schema is dropped
  and rebuilt through ``billing_ops.contract``, which refuses anything else.
* One transaction per environment; a marker (a comment on schema ``billing``) is written
  last, so a half-built environment never looks seeded and a second run is a no-op.
* Same data every time: ids, numbers and dates come from a seeded ``random.Random`` and
  fixed dates. The one exception is the runs that are *running right now* (and the stale
  ones "days old"): their dates are relative to the seed time, or the dashboard could not
  tell running from stuck.
* Fast: runs go in with COPY, locks and invoice lines with set-based ``INSERT ... SELECT
  generate_series``; nothing row by row through the ORM.
* Platform timestamps are ``timestamp without time zone``; the demo writes UTC wall time.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import connections, transaction

from audit.chain import HASH_SCHEME, entry_hash
from billing_ops.contract import contract_schema_apply, contract_schema_drop
from billing_ops.environments import Environment
from billing_ops.services import roles_ensure

# Bump when the data changes shape: an environment carrying another marker is rebuilt.
SEED_MARKER = "billing-ops demo seed v1"
# Two seed_demo processes (e.g. two `make run`) must not build the same database at once.
SEED_ADVISORY_LOCK_KEY = 0x62696C6C6F707331  # "billops1"
# The environment connections carry the dashboard's 30 s statement timeout; building Dev
# takes longer than any single dashboard query should, so the seed sets its own.
SEED_STATEMENT_TIMEOUT_MS = 300_000
# Dropping a schema waits for every reader of it: fail clearly instead of hanging behind
# a long dashboard query.
SEED_LOCK_TIMEOUT_MS = 15_000
SEED_MAINTENANCE_WORK_MEM = "256MB"

ENTITY_TYPES = (
    "points-of-delivery",
    "data-by-profiles",
    "data-by-scales",
    "customers",
    "energy-product-contracts",
    "price-components",
    "groups-of-price-components",
    "vat-rates",
    "currencies",
    "energy-products",
    "price-parameters",
)
# A run locks far more points of delivery and metering data than reference data; each
# type appears this many times in the list a lock's type is drawn from.
ENTITY_TYPE_WEIGHTS = {
    "points-of-delivery": 8,
    "data-by-profiles": 6,
    "data-by-scales": 5,
    "customers": 4,
    "energy-product-contracts": 4,
    "price-components": 3,
    "groups-of-price-components": 2,
    "vat-rates": 1,
    "currencies": 1,
    "energy-products": 2,
    "price-parameters": 2,
}
WEIGHTED_ENTITY_TYPES = tuple(t for t in ENTITY_TYPES for _ in range(ENTITY_TYPE_WEIGHTS[t]))
# Coprime with len(WEIGHTED_ENTITY_TYPES), so consecutive locks walk through every type.
ENTITY_TYPE_STRIDE = 7
USER_LOCK_ENTITY_TYPES = ("customers", "energy-product-contracts")
# Entity ids are unique per environment: no entity is locked twice.
ENTITY_ID_BASE = 100_000

# Platform history is fixed so the data is the same on every seed.
HISTORY_END = datetime(2026, 1, 15, 18, 0, tzinfo=UTC)
# The unlock bug reached Dev and Test with a deployment in autumn 2025.
UNLOCK_BUG_SINCE = datetime(2025, 9, 1, tzinfo=UTC)

INVOICE_LINE_TYPES = ("ENERGY", "NETWORK", "CAPACITY", "TAX", "FEE")
INVOICE_MONTHS = 12
INVOICE_NUMBER_BASE = 1_000_000
UPSERT_ACTION = "upsert_missing_lines"
OTHER_WRITER_ACTION = "invoice_adjusted"
AUDIT_HISTORY_START = datetime(2025, 11, 3, 8, 0, tzinfo=UTC)
AUDIT_HISTORY_END = datetime(2026, 2, 6, 17, 0, tzinfo=UTC)
UPSERT_RUN_AT = datetime(2026, 1, 12, 9, 30, tzinfo=UTC)
# Rows of one upsert run are written this far apart; another writer slips in between.
UPSERT_ROW_SPACING_US = 1_700
INTERLEAVED_OTHER_ROWS = 2

# The brief's figures (BRIEF.md §2.2).
TEST_STUCK_RUN_ID = 1620
TEST_STUCK_RUN_NUMBER = "BILLING202512220055"
TEST_STUCK_RUN_LOCKS = 1_291
TEST_OTHER_STUCK_LOCKS = (23, 17, 13, 9, 5)  # 67: 1,358 in all with run 1620
TEST_USER_LOCKS = 20
DEV_WORST_RUNS = (("BILLING202511200006", 156_651), ("BILLING202512020002", 44_431))
DEV_SMALL_STUCK_RUNS = 176
DEV_SMALL_STUCK_MAX_LOCKS = 20
DEV_MIXED_LOCK_RUNS = 6
DEV_RUNNING_RUNS = 40
DEV_TOTAL_LOCKS = 1_000_000
DEV_STALE_RUNS = ((timedelta(days=6), 2_350), (timedelta(days=3), 780))
DEV_GENERATED_WITH_LOCKS = (420, 96, 12)
DEV_GENERATED_USER_LOCKS = 30  # on the first of them
DEV_DRAFT_STAGE_SHARE = 0.06  # of the small stuck runs: the procedure raised, stage still DRAFT
DEV_USER_LOCKS = 12

DEMO_USERS: dict[str, tuple[str, ...]] = {
    "viewer": ("Viewer",),
    "operator": ("Operator",),
    "approver": ("Approver",),
    "operator2": ("Operator",),
    # Both roles on one account shows that holding both still does not let anyone
    # approve their own request.
    "admin": ("Operator", "Approver"),
}
DEMO_USERS_FILE_NAME = "demo-users.json"
DEMO_PASSWORD_BYTES = 9


# --- The plan: what an environment holds ----------------------------------------------------


@dataclass(slots=True)
class DemoRun:
    id: int
    create_date: datetime
    modify_date: datetime
    status: str = "COMPLETED"
    process_stage: str = "ACCOUNTING"
    billing_number: str = ""  # empty: numbered per day, like the platform does
    lock_count: int = 0
    user_lock_count: int = 0  # the run's first N locks are user locks (system_lock false)


@dataclass(frozen=True)
class LooseLocks:
    """Locks with no billing run (billing_id NULL): user or other system locks."""

    count: int
    created_from: datetime
    created_to: datetime
    entity_types: tuple[str, ...] = USER_LOCK_ENTITY_TYPES
    system_lock: bool = False


@dataclass
class DemoPlan:
    runs: list[DemoRun]
    loose_locks: list[LooseLocks] = field(default_factory=list)
    invoice_lines: int = 2_000
    upsert_run_id: str = "seed-20260112-fix1"
    upsert_inserts: int = 30
    upsert_updates: int = 2
    other_audit_rows: int = 20
    # Test and Dev reproduce the bug: make_billing_run_real without the DELETE.
    unlock_bug: bool = False


@dataclass(frozen=True)
class SeedResult:
    env: Environment
    outcome: str  # "seeded", "already seeded" or "skipped"
    elapsed_s: float
    runs: int = 0
    locks: int = 0
    stuck_runs: int = 0  # COMPLETED runs that still hold locks
    invoice_lines: int = 0
    audit_rows: int = 0
    message: str = ""


def _rng(label: str) -> random.Random:
    # Seeded, hence the same demo every time; nothing here is a secret.
    return random.Random(f"billing-ops demo: {label}")  # noqa: S311


def _history(
    rng: random.Random, *, first_id: int, count: int, end: datetime, step: timedelta
) -> list[DemoRun]:
    """Past runs, one about every `step` up to `end`, ids rising with time; most COMPLETED."""
    statuses = ("COMPLETED", "GENERATED", "CANCELLED", "FAILED", "DRAFT")
    weights = (90, 4, 2.5, 2, 1.5)
    jitter_s = int(step.total_seconds() / 3)
    runs = []
    for n in range(count):
        created = end - step * (count - 1 - n) + timedelta(seconds=rng.randint(-jitter_s, jitter_s))
        status = rng.choices(statuses, weights)[0]
        runs.append(
            DemoRun(
                id=first_id + n,
                create_date=created,
                modify_date=created + timedelta(seconds=rng.randint(20, 1_800)),
                status=status,
                process_stage="ACCOUNTING" if status == "COMPLETED" else "DRAFT",
            )
        )
    return runs


def _run_at(runs: list[DemoRun], when: datetime) -> DemoRun:
    """The history run created closest to `when`."""
    return min(runs, key=lambda run: abs(run.create_date - when))


def _completed_since(runs: list[DemoRun], since: datetime) -> list[DemoRun]:
    return [r for r in runs if r.status == "COMPLETED" and not r.lock_count and r.create_date >= since]


def _running(rng: random.Random, *, first_id: int, now: datetime, lock_counts: list[int]) -> list[DemoRun]:
    """Runs in accounting right now: they hold locks legitimately (recent modify_date)."""
    runs = []
    for n, locks in enumerate(lock_counts):
        started = now - timedelta(minutes=rng.randint(30, 180), seconds=rng.randint(0, 59))
        runs.append(
            DemoRun(
                id=first_id + n,
                create_date=started,
                modify_date=now - timedelta(minutes=rng.randint(1, 12), seconds=rng.randint(0, 59)),
                status="IN_PROGRESS_ACCOUNTING",
                process_stage="DRAFT",
                lock_count=locks,
            )
        )
    # ids rise with create_date, as the platform's sequence would have it
    for run, run_id in zip(
        sorted(runs, key=lambda r: r.create_date), range(first_id, first_id + len(runs)), strict=True
    ):
        run.id = run_id
    return runs


def _split(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` split into `parts` uneven positive shares (deterministic via `rng`)."""
    weights = [rng.randint(5, 35) for _ in range(parts)]
    shares = [total * w // sum(weights) for w in weights]
    shares[-1] += total - sum(shares)
    return shares


def _user_locks(count: int, start: datetime, end: datetime) -> LooseLocks:
    return LooseLocks(count=count, created_from=start, created_to=end)


def plan_test(now: datetime) -> DemoPlan:
    rng = _rng("test")
    stuck_at = datetime(2025, 12, 22, 11, 2, 8, tzinfo=UTC)
    # Every 10 hours, with run 1620 landing on its real date.
    step = timedelta(hours=10)
    first_id, count = 1_401, 300
    end = stuck_at + step * (first_id + count - 1 - TEST_STUCK_RUN_ID)
    runs = _history(rng, first_id=first_id, count=count, end=end, step=step)
    stuck = next(r for r in runs if r.id == TEST_STUCK_RUN_ID)
    # COMPLETED was saved, then make_billing_run_real failed: the stage is still DRAFT.
    stuck.status, stuck.process_stage, stuck.billing_number = "COMPLETED", "DRAFT", TEST_STUCK_RUN_NUMBER
    stuck.create_date, stuck.modify_date = stuck_at, stuck_at + timedelta(seconds=20)
    stuck.lock_count = TEST_STUCK_RUN_LOCKS
    others = sorted(
        rng.sample(_completed_since(runs, datetime(2025, 12, 1, tzinfo=UTC)), 5), key=lambda r: r.id
    )
    for run, locks in zip(others, TEST_OTHER_STUCK_LOCKS, strict=True):
        run.lock_count = locks
    return DemoPlan(
        runs=runs,
        loose_locks=[_user_locks(TEST_USER_LOCKS, datetime(2025, 12, 1, tzinfo=UTC), HISTORY_END)],
        invoice_lines=3_000,
        upsert_run_id="seed-20260112-test-fix3",
        upsert_inserts=40,
        upsert_updates=3,
        other_audit_rows=25,
        unlock_bug=True,
    )


def plan_dev(now: datetime) -> DemoPlan:
    rng = _rng("dev")
    first_id, count = 20_001, 20_000
    runs = _history(rng, first_id=first_id, count=count, end=HISTORY_END, step=timedelta(minutes=26))
    worst_days = (datetime(2025, 11, 20, 5, 40, tzinfo=UTC), datetime(2025, 12, 2, 1, 15, tzinfo=UTC))
    for (number, locks), when in zip(DEV_WORST_RUNS, worst_days, strict=True):
        run = _run_at(runs, when)
        run.status, run.process_stage, run.billing_number, run.lock_count = (
            "COMPLETED",
            "ACCOUNTING",
            number,
            locks,
        )
        run.create_date, run.modify_date = when, when + timedelta(minutes=47)
    small = sorted(
        rng.sample(_completed_since(runs, UNLOCK_BUG_SINCE), DEV_SMALL_STUCK_RUNS), key=lambda r: r.id
    )
    for run in small:
        run.lock_count = rng.randint(1, DEV_SMALL_STUCK_MAX_LOCKS)
        if rng.random() < DEV_DRAFT_STAGE_SHARE:
            run.process_stage = "DRAFT"  # the procedure raised: the run was never made real
    # Some runs hold user locks beside their system locks (for the system-locks-only unlock).
    for run in [r for r in small if r.lock_count >= 6][:DEV_MIXED_LOCK_RUNS]:
        run.user_lock_count = run.lock_count // 3
    # The error path sets GENERATED and releases nothing.
    failed = sorted(
        rng.sample(_completed_since(runs, UNLOCK_BUG_SINCE), len(DEV_GENERATED_WITH_LOCKS)),
        key=lambda r: r.id,
    )
    for run, locks in zip(failed, DEV_GENERATED_WITH_LOCKS, strict=True):
        run.status, run.process_stage, run.lock_count = "GENERATED", "DRAFT", locks
    failed[0].user_lock_count = DEV_GENERATED_USER_LOCKS
    # The accounting thread died: IN_PROGRESS_ACCOUNTING, but untouched for days.
    next_id = first_id + count
    for age, locks in DEV_STALE_RUNS:
        started = now - age - timedelta(minutes=rng.randint(10, 50))
        runs.append(
            DemoRun(
                id=next_id,
                create_date=started,
                modify_date=now - age,
                status="IN_PROGRESS_ACCOUNTING",
                process_stage="DRAFT",
                lock_count=locks,
            )
        )
        next_id += 1
    held = sum(r.lock_count for r in runs) + DEV_USER_LOCKS
    runs += _running(
        rng, first_id=next_id, now=now, lock_counts=_split(DEV_TOTAL_LOCKS - held, DEV_RUNNING_RUNS, rng)
    )
    return DemoPlan(
        runs=runs,
        loose_locks=[_user_locks(DEV_USER_LOCKS, datetime(2025, 10, 1, tzinfo=UTC), HISTORY_END)],
        invoice_lines=50_000,
        upsert_run_id="seed-20260112-dev-fix42",
        upsert_inserts=120,
        upsert_updates=8,
        other_audit_rows=60,
        unlock_bug=True,
    )


def plan_dev2(now: datetime) -> DemoPlan:
    rng = _rng("dev2")
    runs = _history(rng, first_id=5_001, count=4_000, end=HISTORY_END, step=timedelta(minutes=60))
    return DemoPlan(
        runs=runs,
        loose_locks=[_user_locks(4, datetime(2025, 12, 1, tzinfo=UTC), HISTORY_END)],
        upsert_run_id="seed-20260112-dev2-fix1",
    )


def plan_preprod(now: datetime) -> DemoPlan:
    rng = _rng("preprod")
    runs = _history(rng, first_id=7_001, count=6_000, end=HISTORY_END, step=timedelta(minutes=45))
    runs += _running(rng, first_id=13_001, now=now, lock_counts=[2_600, 940])
    return DemoPlan(
        runs=runs,
        loose_locks=[_user_locks(3, datetime(2025, 12, 1, tzinfo=UTC), HISTORY_END)],
        invoice_lines=4_000,
        upsert_run_id="seed-20260112-preprod-fix1",
    )


def plan_prod(now: datetime) -> DemoPlan:
    rng = _rng("prod")
    runs = _history(rng, first_id=100_001, count=25_000, end=HISTORY_END, step=timedelta(minutes=20))
    runs += _running(rng, first_id=125_001, now=now, lock_counts=[12_400, 4_750, 830])
    return DemoPlan(
        runs=runs,
        loose_locks=[_user_locks(5, datetime(2025, 11, 1, tzinfo=UTC), HISTORY_END)],
        invoice_lines=10_000,
        upsert_run_id="seed-20260112-prod-fix1",
        upsert_inserts=60,
        upsert_updates=4,
        other_audit_rows=40,
    )


def plan_clean(now: datetime, *, key: str) -> DemoPlan:
    """Any other demo environment a deployment adds: healthy, nothing stuck."""
    rng = _rng(key)
    return DemoPlan(
        runs=_history(rng, first_id=1, count=2_000, end=HISTORY_END, step=timedelta(hours=2)),
        upsert_run_id=f"seed-20260112-{key}-fix1",
    )


DEMO_PLANS: dict[str, Callable[[datetime], DemoPlan]] = {
    "test": plan_test,
    "dev": plan_dev,
    "dev2": plan_dev2,
    "preprod": plan_preprod,
    "prod": plan_prod,
}


def demo_plan(env: Environment, *, now: datetime) -> DemoPlan:
    builder = DEMO_PLANS.get(env.key)
    plan = builder(now) if builder else plan_clean(now, key=env.key)
    _number_runs(plan.runs)
    return plan


def _number_runs(runs: list[DemoRun]) -> None:
    """BILLING<yyyymmdd><nnnn>: a per-day counter, stepping around the numbers fixed above."""
    taken = {r.billing_number for r in runs if r.billing_number}
    per_day: dict[str, int] = defaultdict(int)
    for run in sorted(runs, key=lambda r: (r.create_date, r.id)):
        if run.billing_number:
            continue
        day = run.create_date.strftime("%Y%m%d")
        while True:
            per_day[day] += 1
            number = f"BILLING{day}{per_day[day]:04d}"
            if number not in taken:
                break
        run.billing_number = number
        taken.add(number)


# --- Writing it -----------------------------------------------------------------------------


def _wall(value: datetime) -> datetime:
    """UTC wall time for the platform's `timestamp without time zone` columns."""
    return value.astimezone(UTC).replace(tzinfo=None)


def _demo_uuid(env_key: str, kind: str, n: int) -> uuid.UUID:
    # The same formula as the SQL below: md5(env || ':' || kind || ':' || n)::uuid.
    return uuid.UUID(hashlib.md5(f"{env_key}:{kind}:{n}".encode(), usedforsecurity=False).hexdigest())


@contextmanager
def _indexes_rebuilt_after(cursor: Any, table: str) -> Iterator[None]:
    """Drop `table`'s indexes (and the constraints they back) and build them again after.

    Maintaining a b-tree on a random text key (the md5-derived lock ids) row by row costs
    far more than building it once at the end: for Dev's million locks about 10 s against
    6 s on a 2-core machine. The definitions are read back from the catalog, so the
    contract schema file stays the only place they are written down.
    """
    cursor.execute(
        """
        SELECT quote_ident(ic.relname), pg_get_indexdef(i.indexrelid), quote_ident(c.conname), c.contype
          FROM pg_index i
          JOIN pg_class ic ON ic.oid = i.indexrelid
          LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
         WHERE i.indrelid = %s::regclass
        """,
        [table],
    )
    indexes = cursor.fetchall()
    for name, _definition, constraint, kind in indexes:
        if constraint and kind not in ("p", "u"):
            raise RuntimeError(f"{table}: cannot rebuild constraint {constraint} of kind {kind!r}")
        if constraint:
            cursor.execute(f"ALTER TABLE {table} DROP CONSTRAINT {constraint}")
        else:
            cursor.execute(f"DROP INDEX {table.split('.')[0]}.{name}")
    yield
    for name, definition, constraint, kind in indexes:
        cursor.execute(definition)
        if constraint:
            key = "PRIMARY KEY" if kind == "p" else "UNIQUE"
            cursor.execute(f"ALTER TABLE {table} ADD CONSTRAINT {constraint} {key} USING INDEX {name}")


def _insert_runs(cursor: Any, runs: list[DemoRun]) -> None:
    columns = "id, billing_number, status, process_stage, create_date, modify_date"
    with cursor.copy(f"COPY billing.billings ({columns}) FROM STDIN") as copy:
        for r in runs:
            copy.write_row(
                (
                    r.id,
                    r.billing_number,
                    r.status,
                    r.process_stage,
                    _wall(r.create_date),
                    _wall(r.modify_date),
                )
            )


def _insert_locks(cursor: Any, env: Environment, plan: DemoPlan) -> None:
    """All of an environment's locks in one INSERT ... SELECT, one row of `plan` per holder."""
    billing_ids: list[int | None] = []
    counts: list[int] = []
    user_counts: list[int] = []
    types: list[str] = []
    starts: list[datetime] = []
    ends: list[datetime] = []
    for run in plan.runs:
        if run.lock_count:
            billing_ids.append(run.id)
            counts.append(run.lock_count)
            user_counts.append(run.user_lock_count)
            types.append(",".join(WEIGHTED_ENTITY_TYPES))
            starts.append(_wall(run.create_date))
            ends.append(_wall(run.modify_date))
    for loose in plan.loose_locks:
        billing_ids.append(None)
        counts.append(loose.count)
        user_counts.append(0 if loose.system_lock else loose.count)
        types.append(",".join(loose.entity_types))
        starts.append(_wall(loose.created_from))
        ends.append(_wall(loose.created_to))
    cursor.execute(
        """
        INSERT INTO lock.locks (id, lock_key, entity_type, entity_id, billing_id, system_lock, create_date)
        SELECT md5(%(env)s || ':lock:' || s.ordinal)::uuid::text,
               s.entity_type || ':' || s.entity_id, s.entity_type, s.entity_id, s.billing_id,
               s.i > s.user_locks,
               -- spread over the holder's life, between the run's create and modify dates
               date_trunc('milliseconds', s.created_from
                   + (s.created_to - s.created_from) * ((s.i - 1)::float8 / greatest(s.n - 1, 1)))
          FROM (
                SELECT p.billing_id, p.n, p.user_locks, p.created_from, p.created_to, i,
                       p.first_ordinal + i AS ordinal,
                       p.types[1 + ((p.first_ordinal + i) * %(stride)s) %% cardinality(p.types)]
                           AS entity_type,
                       (%(id_base)s + p.first_ordinal + i)::text AS entity_id
                  FROM (
                        SELECT plan.*, string_to_array(plan.types_csv, ',') AS types,
                               sum(plan.n) OVER (ORDER BY plan.ord) - plan.n AS first_ordinal
                          FROM unnest(%(billing_ids)s::bigint[], %(counts)s::int[], %(user_counts)s::int[],
                                      %(types)s::text[], %(starts)s::timestamp[], %(ends)s::timestamp[])
                               WITH ORDINALITY
                               AS plan(billing_id, n, user_locks, types_csv, created_from, created_to, ord)
                       ) p
                 CROSS JOIN LATERAL generate_series(1, p.n) AS i
               ) s
        """,
        {
            "env": env.key,
            "stride": ENTITY_TYPE_STRIDE,
            "id_base": ENTITY_ID_BASE,
            "billing_ids": billing_ids,
            "counts": counts,
            "user_counts": user_counts,
            "types": types,
            "starts": starts,
            "ends": ends,
        },
    )


def _insert_invoice_lines(cursor: Any, env: Environment, count: int) -> None:
    """Five lines per invoice, one of each line type, so the dedup key holds by construction.

    Descriptions come in the spellings people type (upper case, padding, doubled spaces)
    so that normalized_description visibly differs from them.
    """
    invoices = -(-count // len(INVOICE_LINE_TYPES))
    units = max(1, -(-invoices // INVOICE_MONTHS))
    cursor.execute(
        r"""
        INSERT INTO public.invoice_lines (id, invoice_id, unit_id, line_type, description,
                                          normalized_description, quantity, amount, created_at)
        SELECT id, invoice_id, unit_id, line_type, description,
               regexp_replace(lower(trim(description)), '\s+', ' ', 'g'),
               quantity, round(quantity * unit_price, 2), created_at
          FROM (
                SELECT md5(%(env)s || ':line:' || n)::uuid AS id,
                       'INV-' || lpad((%(invoice_base)s + n / 5)::text, 8, '0') AS invoice_id,
                       'UNIT-' || lpad((1 + (n / 5) %% %(units)s)::text, 6, '0') AS unit_id,
                       (ARRAY['ENERGY', 'NETWORK', 'CAPACITY', 'TAX', 'FEE'])[1 + n %% 5] AS line_type,
                       CASE (n / 5) %% 4
                            WHEN 0 THEN base || ' ' || period
                            WHEN 1 THEN upper(base) || ' ' || period
                            WHEN 2 THEN '  ' || base || '  ' || period || ' '
                            ELSE replace(base, ' ', '   ') || E'\t' || period
                       END AS description,
                       round(1 + ((n * 7919) %% 100000) / 100.0, 3) AS quantity,
                       (ARRAY[0.1840, 0.0625, 1.9000, 0.0210, 2.5000])[1 + n %% 5] AS unit_price,
                       -- invoiced early the month after; UTC whatever the session's TimeZone
                       (month + interval '1 month 6 hours' + (n %% 3600) * interval '1 second')
                           AT TIME ZONE 'UTC' AS created_at
                  FROM (
                        SELECT n, month, to_char(month, 'Mon YYYY') AS period,
                               (ARRAY['Active energy consumption', 'Network usage fee', 'Capacity charge',
                                      'Excise tax', 'Meter service fee'])[1 + n %% 5] AS base
                          FROM generate_series(0, %(count)s - 1) AS n
                         CROSS JOIN LATERAL (
                               SELECT timestamp '2025-01-01'
                                      + ((n / 5) / %(units)s %% %(months)s) * interval '1 month' AS month
                               ) m
                       ) g
               ) l
        """,
        {
            "env": env.key,
            "invoice_base": INVOICE_NUMBER_BASE,
            "units": units,
            "months": INVOICE_MONTHS,
            "count": count,
        },
    )


@dataclass(frozen=True)
class _AuditRow:
    action: str
    record_id: str
    old_data: dict[str, Any] | None
    new_data: dict[str, Any]
    created_at: datetime
    ours: bool


def _line_values(row: tuple[Any, ...]) -> dict[str, str]:
    # Values as the columns' text (audit.chain: every value a JSON string).
    invoice_id, unit_id, line_type, description, quantity, amount = row
    return {
        "invoice_id": invoice_id,
        "unit_id": unit_id,
        "line_type": line_type,
        "description": description,
        "quantity": quantity,
        "amount": amount,
    }


def _insert_audit_trail(cursor: Any, env: Environment, plan: DemoPlan, rng: random.Random) -> None:
    """One past upsert run and another writer's rows around (and inside) it, chained."""
    total = plan.invoice_lines
    inserted = [_demo_uuid(env.key, "line", n) for n in range(total - plan.upsert_inserts, total)]
    # Earlier ENERGY lines (every fifth line) that the run corrected.
    updated = [_demo_uuid(env.key, "line", 5 * (37 * k + 11)) for k in range(plan.upsert_updates)]
    if set(inserted) & set(updated) or len(updated) + len(inserted) > total:
        raise ValueError(f"{env.key}: too few invoice lines for the demo upsert run")
    cursor.execute(
        """
        SELECT id::text, invoice_id, unit_id, line_type, description, quantity::text, amount::text
          FROM public.invoice_lines WHERE id = ANY(%s::uuid[])
        """,
        [[str(u) for u in inserted + updated]],
    )
    lines = {row[0]: row[1:] for row in cursor.fetchall()}

    rows: list[_AuditRow] = []
    base = {"run_id": plan.upsert_run_id, "hash_scheme": HASH_SCHEME}
    for k, line_id in enumerate(updated):
        new = _line_values(lines[str(line_id)])
        old = dict(new)
        old["quantity"] = f"{Decimal(new['quantity']) - Decimal('1.5'):.6f}"
        old["amount"] = f"{Decimal(new['amount']) - Decimal('0.28'):.2f}"
        at = UPSERT_RUN_AT + timedelta(microseconds=UPSERT_ROW_SPACING_US * k)
        new_data = {**base, "operation": "update", **new}
        rows.append(_AuditRow(UPSERT_ACTION, str(line_id), old, new_data, at, ours=True))
    for k, line_id in enumerate(inserted, start=len(updated)):
        new = _line_values(lines[str(line_id)])
        at = UPSERT_RUN_AT + timedelta(microseconds=UPSERT_ROW_SPACING_US * k)
        new_data = {**base, "operation": "insert", **new}
        rows.append(_AuditRow(UPSERT_ACTION, str(line_id), None, new_data, at, ours=True))
    run_rows = len(rows)

    cursor.execute(
        "SELECT DISTINCT invoice_id FROM public.invoice_lines ORDER BY 1 LIMIT %s", [plan.other_audit_rows]
    )
    invoices = [row[0] for row in cursor.fetchall()]
    span = (AUDIT_HISTORY_END - AUDIT_HISTORY_START) / max(plan.other_audit_rows, 1)
    other_times = [
        AUDIT_HISTORY_START + span * k + timedelta(seconds=rng.randint(0, int(span.total_seconds() / 2)))
        for k in range(plan.other_audit_rows - INTERLEAVED_OTHER_ROWS)
    ]
    # A concurrent writer appending while the upsert ran: the chain must still link.
    other_times += [
        UPSERT_RUN_AT + timedelta(microseconds=UPSERT_ROW_SPACING_US * (run_rows * (k + 1) // 3) + 850)
        for k in range(INTERLEAVED_OTHER_ROWS)
    ]
    for at, invoice_id in zip(other_times, invoices, strict=True):
        old_amount = rng.randint(2_000, 90_000) / 100
        rows.append(
            _AuditRow(
                OTHER_WRITER_ACTION,
                invoice_id,
                {"amount": old_amount},
                {"amount": round(old_amount - rng.randint(1, 900) / 100, 2), "reason": "tariff correction"},
                at,
                ours=False,
            )
        )

    rows.sort(key=lambda r: r.created_at)
    if len({r.created_at for r in rows}) != len(rows):
        raise RuntimeError("demo audit rows share a created_at: the chain order would be ambiguous")
    previous: str | None = None
    columns = "action, record_id, old_data, new_data, hash, previous_hash, created_at"
    with cursor.copy(f"COPY public.audit_logs ({columns}) FROM STDIN") as copy:
        for r in rows:
            if r.ours:
                digest = entry_hash(
                    action=r.action,
                    record_id=r.record_id,
                    old_data=r.old_data,
                    new_data=r.new_data,
                    created_at=r.created_at,
                    previous_hash=previous,
                )
            else:
                # Another writer's own formula: unknown to us, checked for linkage only.
                digest = hashlib.sha256(
                    f"{previous or ''}|{r.action}|{r.record_id}|{r.created_at.isoformat()}".encode()
                ).hexdigest()
            copy.write_row(
                (r.action, r.record_id, _json(r.old_data), _json(r.new_data), digest, previous, r.created_at)
            )
            previous = digest
    # The lines the run inserted were created when it wrote them.
    cursor.execute(
        """
        UPDATE public.invoice_lines l SET created_at = a.created_at
          FROM public.audit_logs a
         WHERE a.action = %s AND a.new_data ->> 'run_id' = %s AND a.new_data ->> 'operation' = 'insert'
           AND l.id = a.record_id::uuid
        """,
        [UPSERT_ACTION, plan.upsert_run_id],
    )


def _json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


BUGGY_MAKE_BILLING_RUN_REAL = """
CREATE OR REPLACE PROCEDURE billing_run.make_billing_run_real(p_billing_id bigint)
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE billing.billings
       SET process_stage = 'ACCOUNTING', modify_date = now()
     WHERE id = p_billing_id;
END
$$;
"""


def _seed_marker(cursor: Any) -> str | None:
    cursor.execute("SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = 'billing'")
    row = cursor.fetchone()
    return row[0] if row else None


def _counts(cursor: Any) -> dict[str, Any]:
    cursor.execute(
        """
        SELECT (SELECT count(*) FROM billing.billings),
               (SELECT count(*) FROM lock.locks),
               (SELECT count(*) FROM billing.billings b
                 WHERE b.status::text = 'COMPLETED'
                   AND EXISTS (SELECT 1 FROM lock.locks l WHERE l.billing_id = b.id)),
               (SELECT count(*) FROM public.invoice_lines),
               (SELECT count(*) FROM public.audit_logs)
        """
    )
    runs, locks, stuck, lines, audit = cursor.fetchone()
    return {"runs": runs, "locks": locks, "stuck_runs": stuck, "invoice_lines": lines, "audit_rows": audit}


def seed_environment(env: Environment, *, reset: bool = False, now: datetime | None = None) -> SeedResult:
    """(Re)build one demo environment's database; a no-op when it already holds this seed."""
    started = time.monotonic()
    if not env.demo:
        return SeedResult(env, "skipped", 0.0, message="not marked demo = true in the environments file")
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    with transaction.atomic(using=env.alias), connections[env.alias].cursor() as cursor:
        cursor.execute("SET LOCAL statement_timeout = %s", [SEED_STATEMENT_TIMEOUT_MS])
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [SEED_ADVISORY_LOCK_KEY])
        if not reset and _seed_marker(cursor) == SEED_MARKER:
            counts = _counts(cursor)
            return SeedResult(env, "already seeded", time.monotonic() - started, **counts)
        cursor.execute("SET LOCAL lock_timeout = %s", [SEED_LOCK_TIMEOUT_MS])
        cursor.execute("SET LOCAL maintenance_work_mem = %s", [SEED_MAINTENANCE_WORK_MEM])
        contract_schema_drop(env)
        contract_schema_apply(env)
        plan = demo_plan(env, now=now)
        if plan.unlock_bug:
            cursor.execute(BUGGY_MAKE_BILLING_RUN_REAL)
        _insert_runs(cursor, plan.runs)
        with _indexes_rebuilt_after(cursor, "lock.locks"):
            _insert_locks(cursor, env, plan)
        _insert_invoice_lines(cursor, env, plan.invoice_lines)
        _insert_audit_trail(cursor, env, plan, _rng(f"{env.key} audit"))
        for table in ("billing.billings", "lock.locks", "public.invoice_lines", "public.audit_logs"):
            # Fresh tables have no statistics until autovacuum comes by; the dashboard's
            # first queries should not be planned blind.
            cursor.execute(f"ANALYZE {table}")
        cursor.execute(f"COMMENT ON SCHEMA billing IS '{SEED_MARKER}'")
        counts = _counts(cursor)
    return SeedResult(env, "seeded", time.monotonic() - started, **counts)


# --- Demo users ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoUsersResult:
    created: list[str]
    updated: list[str]
    path: Path


def _read_demo_passwords(path: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def demo_users_ensure(*, var_dir: Path | None = None) -> DemoUsersResult:
    """Create the demo logins with their roles; their passwords live in var/demo-users.json.

    Passwords are generated once and reused, so a restart does not log everyone out of
    their notes; a user whose password no longer matches the file is reset to it.
    """
    path = Path(var_dir or settings.VAR_DIR) / DEMO_USERS_FILE_NAME
    stored = _read_demo_passwords(path)
    accounts = {}
    for role in DEMO_USERS:
        entry = stored.get(role)
        password = entry.get("password") if isinstance(entry, dict) else None
        password = password or secrets.token_urlsafe(DEMO_PASSWORD_BYTES)
        accounts[role] = {"username": role, "password": password}
    if accounts != stored:
        _write_private_json(path, accounts)
    elif path.stat().st_mode & 0o077:
        path.chmod(0o600)

    user_model = get_user_model()
    created, updated = [], []
    with transaction.atomic():
        roles_ensure()  # migration 0002 made them, unless the tables were flushed since
        for role, group_names in DEMO_USERS.items():
            account = accounts[role]
            user, was_created = user_model.objects.get_or_create(username=account["username"])
            changed = was_created
            if was_created or not user.check_password(account["password"]):
                user.set_password(account["password"])
                changed = True
            if not user.is_active:
                user.is_active = True
                changed = True
            if changed:
                user.save()
            groups = list(Group.objects.filter(name__in=group_names))
            if {g.name for g in user.groups.all()} != set(group_names):
                user.groups.set(groups)
                changed = True
            if was_created:
                created.append(role)
            elif changed:
                updated.append(role)
    return DemoUsersResult(created=created, updated=updated, path=path)


# --- Sample reconciliation run folders ----------------------------------------------------------

# A run folder for the artifact validation (runbook §1.3) whose lines fit the demo's invoice
# lines: some match existing ones in other spellings, the rest are new.
SAMPLE_RUN_FOLDERS_DIR = Path(settings.BASE_DIR) / "samples" / "reconciliations"


def reconciliation_samples_ensure(*, target: Path | None = None) -> list[str]:
    """Copy the repository's sample run folders into the reconciliations directory, each
    only when no folder of that name is there (an operator's folder is never overwritten).
    Returns the names copied."""
    import shutil

    target = Path(target or settings.RECONCILIATIONS_DIR)
    copied: list[str] = []
    for sample in sorted(p for p in SAMPLE_RUN_FOLDERS_DIR.iterdir() if p.is_dir()):
        destination = target / sample.name
        if destination.exists() or destination.is_symlink():
            continue
        partial = target / f".{sample.name}.copying"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(sample, partial)
        # Complete or absent: a reader never lists a half-copied folder.
        partial.rename(destination)
        copied.append(sample.name)
    return copied
