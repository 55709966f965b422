"""Releasing stuck locks: preview, request, batched delete, resume, restore.

This is what the lock-release analysis recommends (``deleteByBillingId`` and
``deleteSystemLocksByBillingId``, unlock on the error path, a scheduled cleanup), done so
that an ops team can trust it with production:

1. **Preview** (``release_plan_prepare``): the lock rows of the chosen eligible runs are
   copied, as they are at that moment, into the dashboard's own database (COPY from the
   environment straight into ``LockReleaseItem``, with each row's ctid), with a sha256
   digest over them; from the same snapshot, its xmin horizon and the lock table's file
   node. Locks with NULL ``billing_id`` are never part of a plan.
2. **Request** (``release_request``): a job whose parameters carry the plan and its digest,
   so that an approver approves exactly these rows. Each run is claimed (``JobClaim``): one
   cleanup per environment and run at a time; a second request is refused naming the job.
3. **Delete** (``lock_release_execute``, on a worker): run by run, batch by batch, each
   batch one short transaction with ``lock_timeout``. A batch is the ctids of up to
   ``BATCH_SIZE_ROWS`` planned rows: the tuples at those ctids are deleted by one TID scan
   if each is still the very tuple the preview read (same table file, the run's, inserted
   before the preview's snapshot; the run still eligible, checked ``FOR SHARE`` in the
   same statement), and the delete is kept only if it took the whole batch. Otherwise it
   is rolled back and the batch is compared row by row with the plan: only rows still
   exactly as previewed are deleted; rows that appeared since were never in the plan;
   rows that changed are left alone and reported. Progress is per batch; a cancel takes
   effect between batches; a session advisory lock per run keeps any other process using
   this code off the same run.
4. **Resume**: a batch is marked ``deleting`` before its transaction and ``done`` after;
   after a worker died, the job (re-queued by the sweeper, or run again) continues with
   the batches not ``done``. A batch left ``deleting`` is deleted again: what is still
   there goes now, what is gone was taken by the interrupted attempt (the only writer that
   held the run) and is counted once, as released.
5. **Restore** (``restore_request``, approvers): puts the released rows back exactly as
   they were previewed, in one transaction, skipping ids that exist again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connections, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from psycopg import sql

from billing_ops import access
from billing_ops.environments import Environment, environment_connect, get_environment
from billing_ops.formats import grouped
from billing_ops.models import Job, JobStatus
from billing_ops.selectors import billing_status_labels
from billing_ops.services import Actor, JobContext, JobRefused, job_request
from locks.models import (
    LockReleaseBatch,
    LockReleasePlan,
    ReleaseBatchStatus,
    ReleasePlanStatus,
)
from locks.selectors import (
    COMPLETED,
    IN_PROGRESS_ACCOUNTING,
    aware,
    error_path_statuses,
    lock_table_shape,
)

RELEASE_KIND = "lock_release"
RESTORE_KIND = "lock_restore"
# Rows per batch: each batch is one short transaction holding the row locks of this many
# locks (readers never wait on them; a platform writer of one of those rows would).
BATCH_SIZE_ROWS = 20_000
# A batch waits at most this long for a row lock the platform holds, then backs off.
LOCK_TIMEOUT_MS = 2_000
LOCK_TIMEOUT_RETRIES = 5
LOCK_TIMEOUT_BACKOFF_S = 1.0
COPY_CHUNK_BYTES = 1 << 20
# Session advisory locks (namespace, run id): one releaser per run, across processes.
ADVISORY_NAMESPACE = 0x626F726C  # "borl"
# A preview nobody requested is only a draft; the plans page hides older ones.
DRAFT_PLAN_TTL = timedelta(hours=24)
PREVIEW_STATEMENT_TIMEOUT_MS = 120_000


class NoLongerEligible(Exception):
    """The run changed since the preview (e.g. it is running again): stop for this run."""


# --- Eligibility -----------------------------------------------------------------------------


def ineligibility_reason(
    env: Environment, *, status: str, modify_date: datetime | None, labels: list[str]
) -> str:
    """Empty when a run's locks may be released; otherwise why not."""
    if status == COMPLETED or status in error_path_statuses(labels):
        return ""
    if status == IN_PROGRESS_ACCOUNTING:
        modified = aware(env, modify_date)
        threshold = timedelta(minutes=settings.STALE_RUN_AFTER_MIN)
        if modified is not None and timezone.now() - modified > threshold:
            return ""
        return _(
            "it is IN_PROGRESS_ACCOUNTING and was modified within the last %(m)s minutes: still running"
        ) % {"m": settings.STALE_RUN_AFTER_MIN}
    return _("its status is %(status)s: only COMPLETED, failed or stale runs are cleaned up") % {
        "status": status
    }


def _runs(cursor: Any, run_ids: list[int]) -> dict[int, tuple[str, str, str, datetime]]:
    cursor.execute(
        "SELECT id, billing_number, status::text, process_stage, modify_date FROM billing.billings "
        "WHERE id = ANY(%s)",
        [run_ids],
    )
    return {row[0]: (row[1], row[2], row[3], row[4]) for row in cursor.fetchall()}


def eligible_run_ids(env: Environment) -> list[int]:
    """Every run that holds locks and may be cleaned up now (the scheduled cleanup's set)."""
    with connections[env.alias].cursor() as cursor:
        labels = billing_status_labels(cursor)
        cursor.execute(
            "SELECT b.id, b.status::text, b.modify_date FROM billing.billings b "
            "WHERE b.status::text = ANY(%s) "
            "AND EXISTS (SELECT 1 FROM lock.locks l WHERE l.billing_id = b.id) "
            "ORDER BY b.id",
            [[COMPLETED, IN_PROGRESS_ACCOUNTING, *error_path_statuses(labels)]],
        )
        rows = cursor.fetchall()
    return [
        run_id
        for run_id, status, modified in rows
        if not ineligibility_reason(env, status=status, modify_date=modified, labels=labels)
    ]


# --- Preview ---------------------------------------------------------------------------------


def release_plan_prepare(
    *, actor: Actor | None, env: Environment, run_ids: list[int], system_only: bool, scheduled: bool = False
) -> LockReleasePlan:
    """Fix the exact lock rows a cleanup of these runs would delete, and their digest.

    Runs that are not eligible are left out and listed with the reason; if none is
    eligible, or they hold no (system) locks, nothing is created and ValidationError says why.
    """
    if not scheduled:
        access.require_operator(actor)
    run_ids = sorted({int(r) for r in run_ids})
    if not run_ids:
        raise ValidationError(_("Choose at least one billing run."))
    with connections[env.alias].cursor() as cursor:
        labels = billing_status_labels(cursor)
        runs = _runs(cursor, run_ids)
        shape = lock_table_shape(cursor)
    refused: dict[str, str] = {}
    eligible: list[int] = []
    for run_id in run_ids:
        if run_id not in runs:
            refused[str(run_id)] = _("no such billing run")
            continue
        _number, status, _stage, modified = runs[run_id]
        reason = ineligibility_reason(env, status=status, modify_date=modified, labels=labels)
        if reason:
            refused[str(run_id)] = reason
        else:
            eligible.append(run_id)
    if not eligible:
        raise ValidationError(
            [_("Run %(id)s: %(reason)s") % {"id": k, "reason": v} for k, v in refused.items()]
            or _("No eligible run.")
        )

    with transaction.atomic():
        plan = LockReleasePlan.objects.create(
            environment=env.key,
            created_by=actor if actor is not None and actor.is_authenticated else None,  # type: ignore[misc]
            system_only=system_only,
            scheduled=scheduled,
            run_ids=eligible,
            digest="",
            has_create_date=shape.has_create_date,
        )
        plan.xmin_horizon, plan.table_filenode = _copy_locks_into_plan(
            env, plan, eligible, system_only=system_only, has_create_date=shape.has_create_date
        )
        with connections["default"].cursor() as cursor:
            cursor.execute(
                """
                INSERT INTO locks_lockreleasebatch
                    (plan_id, billing_id, batch_no, size, tids, by_entity_type,
                     status, deleted_count, gone_ids, note)
                SELECT i.plan_id, i.billing_id, i.batch_no, count(*),
                       array_agg(('(' || i.block || ',' || i.line || ')')::tid
                                 ORDER BY i.block, i.line)::text,
                       (SELECT jsonb_object_agg(t.entity_type, t.n) FROM (
                            SELECT j.entity_type, count(*) AS n FROM locks_lockreleaseitem j
                            WHERE j.plan_id = i.plan_id AND j.billing_id = i.billing_id
                              AND j.batch_no = i.batch_no
                            GROUP BY j.entity_type) t),
                       %s, 0, '[]'::jsonb, ''
                FROM locks_lockreleaseitem i WHERE i.plan_id = %s
                GROUP BY i.plan_id, i.billing_id, i.batch_no
                """,
                [ReleaseBatchStatus.PENDING, plan.pk],
            )
            cursor.execute(
                "SELECT billing_id, entity_type, system_lock, count(*) FROM locks_lockreleaseitem "
                "WHERE plan_id = %s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                [plan.pk],
            )
            counts = cursor.fetchall()
        plan.digest = plan_digest(plan.pk)
        plan.lock_count = sum(row[3] for row in counts)
        if plan.lock_count == 0:
            raise ValidationError(
                _("The chosen runs hold no system locks.")
                if system_only
                else _("The chosen runs hold no locks.")
            )
        plan.summary = _summary(runs, eligible, counts, refused)
        plan.save(update_fields=["digest", "lock_count", "summary", "xmin_horizon", "table_filenode"])
    return plan


def _copy_locks_into_plan(
    env: Environment, plan: LockReleasePlan, run_ids: list[int], *, system_only: bool, has_create_date: bool
) -> tuple[int, int | None]:
    """Stream the runs' lock rows from the environment into the plan with two COPYs.

    Returns, from the same snapshot as the rows, that snapshot's xmin (as a 32-bit xid)
    and the lock table's file node: see FAST_DELETE_SQL."""
    # Batches are runs of BATCH_SIZE_ROWS of a run's rows in ctid order: the job finds a
    # batch's rows again by a TID scan of their ctids, block by block.
    source = sql.SQL(
        """
        COPY (
            SELECT {plan_id}, l.billing_id,
                   ((row_number() OVER (PARTITION BY l.billing_id ORDER BY l.ctid)) - 1) / {batch},
                   l.id, l.lock_key, l.entity_type, l.entity_id, l.system_lock, {create_date},
                   (l.ctid::text::point)[0]::bigint, (l.ctid::text::point)[1]::int
            FROM lock.locks l
            WHERE l.billing_id = ANY({runs}) {system_only}
        ) TO STDOUT
        """
    ).format(
        plan_id=sql.Literal(plan.pk),
        batch=sql.Literal(BATCH_SIZE_ROWS),
        # The platform's naive timestamps, made absolute in the environment's zone.
        create_date=sql.SQL("l.create_date AT TIME ZONE {tz}").format(tz=sql.Literal(env.time_zone))
        if has_create_date
        else sql.SQL("NULL::timestamptz"),
        runs=sql.Literal(run_ids),
        system_only=sql.SQL("AND l.system_lock") if system_only else sql.SQL(""),
    )
    target = (
        "COPY locks_lockreleaseitem (plan_id, billing_id, batch_no, lock_id, lock_key, entity_type, "
        "entity_id, system_lock, create_date, block, line) FROM STDIN"
    )
    with environment_connect(env, autocommit=True) as src_conn:
        src_conn.execute(f"SET statement_timeout = {PREVIEW_STATEMENT_TIMEOUT_MS:d}")
        # Both sides speak text COPY; the environment's timestamptz text carries its offset.
        src_conn.execute("SET TimeZone = 'UTC'")
        # One snapshot for the rows, the horizon and the file node.
        src_conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        src_conn.read_only = True
        with src_conn.transaction():
            horizon, filenode = src_conn.execute(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint % 4294967296, "
                "pg_relation_filenode('lock.locks'::regclass)"
            ).fetchone()
            with (
                connections["default"].cursor() as dst_cursor,
                src_conn.cursor().copy(source) as src,
                dst_cursor.cursor.copy(target) as dst,
            ):
                buffer = bytearray()
                for data in src:  # one row at a time from libpq; sent on in larger pieces
                    buffer += data
                    if len(buffer) >= COPY_CHUNK_BYTES:
                        dst.write(buffer)
                        buffer.clear()
                dst.write(buffer)
    return int(horizon), filenode


# The plan's rows in a fixed order, as COPY text: hashed for the digest, and streamed into
# the environment by the job, which checks the digest on the very bytes it loads.
PLAN_ROWS_COPY = (
    "COPY (SELECT billing_id, batch_no, lock_id, lock_key, entity_type, entity_id, system_lock "
    'FROM locks_lockreleaseitem WHERE plan_id = {plan} ORDER BY billing_id, lock_id COLLATE "C") TO STDOUT'
)


def plan_digest(plan_id: int) -> str:
    """sha256 over the plan's rows in a fixed order: what an approval refers to."""
    return _copy_digest(PLAN_ROWS_COPY.format(plan=int(plan_id)))


def batches_digest(plan_id: int) -> str:
    """sha256 over the plan's batches (their ctids and counts) and the snapshot facts the
    fast path trusts: the job's parameters carry it, so the tuples a job deletes by ctid
    are the approved ones."""
    digest = hashlib.sha256()
    plan = LockReleasePlan.objects.values_list("xmin_horizon", "table_filenode").get(pk=plan_id)
    digest.update(("\t".join(str(v) for v in plan) + "\n").encode())
    for row in (
        LockReleaseBatch.objects.filter(plan_id=plan_id)
        .order_by("billing_id", "batch_no")
        .values_list("billing_id", "batch_no", "size", "by_entity_type", "tids")
    ):
        *head, by_type, tids = row
        fields = [*head, json.dumps(by_type, sort_keys=True), tids]
        digest.update(("\t".join(str(v) for v in fields) + "\n").encode())
    return digest.hexdigest()


def _copy_digest(copy_sql: str) -> str:
    digest = hashlib.sha256()
    buffer = bytearray()
    with connections["default"].cursor() as cursor, cursor.cursor.copy(copy_sql) as rows:
        for data in rows:
            buffer += data
            if len(buffer) >= COPY_CHUNK_BYTES:
                digest.update(buffer)
                buffer.clear()
    digest.update(buffer)
    return digest.hexdigest()


def _summary(
    runs: dict[int, tuple[str, str, str, datetime]],
    eligible: list[int],
    counts: list[tuple[int, str, bool, int]],
    refused: dict[str, str],
) -> dict[str, Any]:
    per_run: dict[int, dict[str, Any]] = {}
    for run_id in eligible:
        number, status, stage, _modified = runs[run_id]
        per_run[run_id] = {
            "billing_number": number,
            "status": status,
            "process_stage": stage,
            "locks": 0,
            "system": 0,
            "user": 0,
            "by_entity_type": {},
        }
    by_type: dict[str, int] = defaultdict(int)
    for run_id, entity_type, system_lock, count in counts:
        entry = per_run[run_id]
        entry["locks"] += count
        entry["system" if system_lock else "user"] += count
        entry["by_entity_type"][entity_type] = entry["by_entity_type"].get(entity_type, 0) + count
        by_type[entity_type] += count
    return {
        "runs": {str(k): v for k, v in per_run.items() if v["locks"]},
        "empty_runs": [str(k) for k, v in per_run.items() if not v["locks"]],
        "refused": refused,
        "by_entity_type": dict(sorted(by_type.items())),
    }


# --- Request ---------------------------------------------------------------------------------


def run_claim_key(env_key: str, run_id: int | str) -> str:
    return f"{RELEASE_KIND}:{env_key}:run:{run_id}"


def schedule_claim_key(env_key: str) -> str:
    return f"{RELEASE_KIND}:{env_key}:schedule"


def release_request(
    *, actor: Actor, plan_id: int, digest: str, confirmation: str = "", requester_check: Any = None
) -> Job:
    """Turn a preview into a job (queued, or awaiting an approver in a protected environment)."""
    with transaction.atomic():
        plan = LockReleasePlan.objects.select_for_update().get(pk=plan_id)
        env = get_environment(plan.environment)
        if plan.status != ReleasePlanStatus.DRAFT:
            raise ValidationError(_("This preview was already requested; preview again."))
        if not plan.scheduled and plan.created_by_id != getattr(actor, "pk", None):
            raise PermissionDenied(_("Request a release from your own preview."))
        if digest != plan.digest:
            raise ValidationError(_("The preview changed since you read it; preview again."))
        if env.confirm_name and not plan.scheduled and confirmation.strip() != env.label:
            raise ValidationError(
                _("Type the environment's name, %(name)s, to confirm a release in it.") % {"name": env.label}
            )
        claims = [run_claim_key(env.key, run_id) for run_id in plan.summary.get("runs", {})]
        if plan.scheduled:
            claims.append(schedule_claim_key(env.key))
        job = job_request(
            actor=actor,
            kind=RELEASE_KIND,
            environment=env.key,
            params={
                "plan_id": plan.pk,
                "plan_digest": plan.digest,
                "batches_digest": batches_digest(plan.pk),
                "system_only": plan.system_only,
                "runs": sorted(int(r) for r in plan.summary.get("runs", {})),
                "lock_count": plan.lock_count,
                "scheduled": plan.scheduled,
            },
            claims=claims,
            requester_check=requester_check,
        )
        plan.status = ReleasePlanStatus.REQUESTED
        plan.save(update_fields=["status"])
    return job


# --- The delete ------------------------------------------------------------------------------

# The run, locked FOR SHARE for the batch's transaction, only while it is still eligible
# (the SQL form of ineligibility_reason): no row, nothing deleted.
ELIGIBLE_RUN_CTE = """
WITH run AS (
    SELECT b.id FROM billing.billings b
    WHERE b.id = %(run)s
      AND (b.status::text = ANY(%(eligible)s)
           OR (b.status::text = 'IN_PROGRESS_ACCOUNTING'
               AND b.modify_date < (now() AT TIME ZONE %(tz)s) - %(stale)s))
    FOR SHARE
)"""

# The exact path, for a batch the fast path rolled back: the run is locked FOR SHARE and
# must still be eligible (else nothing is deleted), and only rows still exactly as
# previewed go. The batch's rows come
# from release_rows, a temporary table the job loads once from the plan.
DELETE_BATCH_SQL = (
    ELIGIBLE_RUN_CTE
    + """
DELETE FROM lock.locks l
USING run, release_rows p
WHERE p.billing_id = %(run)s AND p.batch_no = %(batch)s
  AND l.id = p.id
  AND l.billing_id = run.id
  AND l.lock_key = p.lock_key AND l.entity_type = p.entity_type
  AND l.entity_id = p.entity_id AND l.system_lock = p.system_lock
RETURNING l.id, l.entity_type
"""
)

# Planned rows of a batch that were not deleted, and whether each is still there (changed).
NOT_DELETED_SQL = """
SELECT p.id, EXISTS (SELECT 1 FROM lock.locks l WHERE l.id = p.id)
FROM release_rows p
WHERE p.billing_id = %(run)s AND p.batch_no = %(batch)s AND NOT (p.id = ANY(%(deleted)s))
"""


# The fast path: delete the tuples at the batch's ctids (a TID scan of exactly those), if
# each is still the very tuple the preview read: the run's, in the same table file (a
# VACUUM FULL, CLUSTER or rewrite moves tuples and changes the file node), and inserted by
# a transaction that ended before the preview's snapshot was taken (its xmin precedes the
# snapshot's xmin, by age(), which counts across xid wraparound). A tuple updated or
# inserted since has a newer xmin, so it is not deleted. When the statement deleted
# exactly the batch's size, the batch went exactly as previewed; otherwise the job rolls
# it back and compares row by row (DELETE_BATCH_SQL). The run must still be eligible
# (ELIGIBLE_RUN_CTE) or nothing is deleted. A partitioned lock table has no file node of
# its own (NULL): every batch then takes the row-by-row path. The ctids come through a
# scalar subquery so that the planner neither parses the 20,000 of them while planning nor,
# estimating that many rows, prefers to read the whole table.
FAST_DELETE_SQL = (
    ELIGIBLE_RUN_CTE
    + """
DELETE FROM lock.locks l
WHERE l.ctid = ANY((SELECT %(tids)s::tid[])::tid[])
  AND l.billing_id = (SELECT id FROM run) {system_only}
  AND pg_relation_filenode('lock.locks'::regclass) = %(filenode)s
  AND age(l.xmin) > (SELECT age(%(horizon)s::text::xid))
"""
)


class _NotAsPreviewed(Exception):
    """The fast path deleted other than exactly the batch: its transaction is rolled back."""


@dataclass
class _Progress:
    planned: int
    done: int  # released or found gone, over every attempt
    by_run: dict[str, dict[str, Any]]
    by_type: dict[str, int]
    plan: LockReleasePlan
    expected_digest: str
    plan_loaded: bool = False


def lock_release_execute(ctx: JobContext) -> dict[str, Any]:
    """The job: delete the plan's rows, batch by batch, resuming where a previous attempt
    stopped. Returns the counts by run and entity type."""
    env = ctx.env
    assert env is not None
    plan = LockReleasePlan.objects.get(pk=ctx.params["plan_id"])
    if plan.digest != ctx.params["plan_digest"] or batches_digest(plan.pk) != ctx.params.get(
        "batches_digest"
    ):
        raise JobRefused(_("The plan's rows do not match the approved preview; nothing was deleted."))
    started = time.monotonic()
    released_before = _released_count(plan.pk)
    progress = _Progress(
        planned=plan.lock_count,
        done=released_before + _gone_count(plan.pk),
        by_run={},
        by_type=defaultdict(int),
        plan=plan,
        expected_digest=ctx.params["plan_digest"],
    )
    ctx.progress(progress.done, plan.lock_count, _("Starting"))
    if released_before:
        ctx.log(
            _("Resuming: %(n)s locks were released by an earlier attempt.") % {"n": grouped(released_before)}
        )
    with environment_connect(env, autocommit=True) as conn:
        labels = billing_status_labels(conn.cursor())
        for run_id in ctx.params["runs"]:
            _release_run(ctx, conn, env, plan, int(run_id), labels, progress)
    if released_before:  # counts of earlier attempts come from the records
        result = release_result(plan)
    else:
        result = {
            "plan_id": plan.pk,
            "planned": plan.lock_count,
            "released": sum(progress.by_type.values()),
            "gone": _gone_count(plan.pk),
            "runs": progress.by_run,
            "skipped_runs": _skipped_runs(plan),
            "by_entity_type": dict(sorted(progress.by_type.items())),
        }
    result["duration_s"] = round(time.monotonic() - started, 2)
    return result


def _load_plan(conn: psycopg.Connection[Any], plan: LockReleasePlan, *, expected_digest: str) -> None:
    """Copy the plan's rows into a temporary table of this session, hashing them on the
    way: a plan altered since its approval is refused before anything is deleted."""
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS release_rows (billing_id bigint, batch_no int, id text, "
        "lock_key text, entity_type text, entity_id text, system_lock boolean)"
    )
    conn.execute("TRUNCATE release_rows")
    digest = hashlib.sha256()
    buffer = bytearray()
    with (
        connections["default"].cursor() as cursor,
        cursor.cursor.copy(PLAN_ROWS_COPY.format(plan=int(plan.pk))) as rows,
        conn.cursor().copy("COPY release_rows FROM STDIN") as target,
    ):
        for data in rows:  # one row at a time from libpq; sent on in larger pieces
            buffer += data
            if len(buffer) >= COPY_CHUNK_BYTES:
                digest.update(buffer)
                target.write(buffer)
                buffer.clear()
        digest.update(buffer)
        target.write(buffer)
    if digest.hexdigest() != expected_digest:
        conn.execute("TRUNCATE release_rows")
        raise JobRefused(_("The plan's rows do not match the approved preview; nothing was deleted."))
    conn.execute("CREATE INDEX IF NOT EXISTS release_rows_batch ON release_rows (billing_id, batch_no)")
    conn.execute("ANALYZE release_rows")


def _release_run(
    ctx: JobContext,
    conn: psycopg.Connection[Any],
    env: Environment,
    plan: LockReleasePlan,
    run_id: int,
    labels: list[str],
    progress: _Progress,
) -> None:
    batches = list(
        LockReleaseBatch.objects.filter(plan=plan, billing_id=run_id)
        .exclude(status__in=[ReleaseBatchStatus.DONE, ReleaseBatchStatus.SKIPPED])
        .order_by("batch_no")
    )
    if not batches:
        return
    got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", [ADVISORY_NAMESPACE, run_id]).fetchone()
    if not got or not got[0]:
        raise JobRefused(
            _("Another process is releasing the locks of run %(run)s right now; try again when it is done.")
            % {"run": run_id}
        )
    try:
        for batch in batches:
            ctx.check_cancel()
            try:
                _release_batch(ctx, conn, env, batch, labels, progress)
            except NoLongerEligible as exc:
                LockReleaseBatch.objects.filter(
                    plan=plan,
                    billing_id=run_id,
                    status__in=[ReleaseBatchStatus.PENDING, ReleaseBatchStatus.DELETING],
                ).update(status=ReleaseBatchStatus.SKIPPED, note=str(exc), done_at=timezone.now())
                ctx.log(
                    _("Run %(run)s: stopped, %(reason)s.") % {"run": run_id, "reason": exc}, level="warning"
                )
                return
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", [ADVISORY_NAMESPACE, run_id])


def _eligibility_params(env: Environment, run_id: int, labels: list[str]) -> dict[str, Any]:
    """The parameters of ELIGIBLE_RUN_CTE for one run."""
    return {
        "run": run_id,
        "eligible": [COMPLETED, *error_path_statuses(labels)],
        "tz": env.time_zone,
        "stale": timedelta(minutes=settings.STALE_RUN_AFTER_MIN),
    }


def fast_delete_batch(
    conn: psycopg.Connection[Any],
    env: Environment,
    plan: LockReleasePlan,
    batch: LockReleaseBatch,
    labels: list[str],
) -> int:
    """FAST_DELETE_SQL for one batch, in the caller's transaction: how many tuples it deleted."""
    params = {
        **_eligibility_params(env, batch.billing_id, labels),
        "tids": batch.tids,
        "filenode": plan.table_filenode,
        "horizon": str(plan.xmin_horizon),
    }
    statement = FAST_DELETE_SQL.format(system_only="AND l.system_lock" if plan.system_only else "")
    return conn.execute(statement, params).rowcount


def _release_batch(
    ctx: JobContext,
    conn: psycopg.Connection[Any],
    env: Environment,
    batch: LockReleaseBatch,
    labels: list[str],
    progress: _Progress,
) -> None:
    resuming = batch.status == ReleaseBatchStatus.DELETING
    LockReleaseBatch.objects.filter(pk=batch.pk).update(status=ReleaseBatchStatus.DELETING)
    params = {**_eligibility_params(env, batch.billing_id, labels), "batch": batch.batch_no}

    def fast() -> dict[str, int]:
        deleted = fast_delete_batch(conn, env, progress.plan, batch, labels)
        if deleted != batch.size:
            if deleted == 0:  # a run no longer eligible stops here, before the plan is loaded
                _check_still_eligible(conn, env, batch.billing_id, labels)
            raise _NotAsPreviewed  # rolls back whatever this statement deleted
        return dict(batch.by_entity_type)

    if progress.plan.xmin_horizon is not None:
        try:
            by_type = _with_lock_retries(ctx, batch, fast, conn)
            _record_batch(ctx, batch, by_type, [], resuming=resuming, progress=progress)
            return
        except _NotAsPreviewed:
            ctx.log(
                _(
                    "Run %(run)s, batch %(n)s: not every planned lock is still the one previewed; "
                    "comparing row by row."
                )
                % {"run": batch.billing_id, "n": batch.batch_no + 1}
            )
    # A planned tuple is gone or changed or newer than the preview's snapshot, or the table
    # was rewritten (or the plan predates these checks): compare row by row against the
    # plan, loaded once per job.
    if not progress.plan_loaded:
        _load_plan(conn, progress.plan, expected_digest=progress.expected_digest)
        progress.plan_loaded = True

    def exactly() -> tuple[list[Any], list[Any]]:
        # Estimating the join blind, the planner may rather read all of lock.locks than
        # look up one batch's ids by primary key; the batch is small.
        conn.execute("SET LOCAL enable_seqscan = off")
        rows = conn.execute(DELETE_BATCH_SQL, params).fetchall()
        missing: list[Any] = []
        if len(rows) < batch.size:  # find out why, in the same snapshot
            _check_still_eligible(conn, env, batch.billing_id, labels)
            missing = conn.execute(NOT_DELETED_SQL, {**params, "deleted": [r[0] for r in rows]}).fetchall()
        return rows, missing

    deleted_rows, not_deleted = _with_lock_retries(ctx, batch, exactly, conn)
    _record_batch(
        ctx,
        batch,
        dict(Counter(entity_type for _id, entity_type in deleted_rows)),
        not_deleted,
        resuming=resuming,
        progress=progress,
    )


def _with_lock_retries(
    ctx: JobContext, batch: LockReleaseBatch, work: Any, conn: psycopg.Connection[Any]
) -> Any:
    """Run ``work`` in one short transaction with lock_timeout; back off and retry when a
    platform writer holds a row lock we need."""
    for attempt in range(LOCK_TIMEOUT_RETRIES + 1):
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS:d}")
                return work()
        except psycopg.errors.LockNotAvailable:
            if attempt == LOCK_TIMEOUT_RETRIES:
                raise JobRefused(
                    _(
                        "Batch %(n)s of run %(run)s waited over %(ms)s ms for a lock %(tries)s times; "
                        "stopped there. That batch deleted nothing; the batches before it stay released. "
                        "Find the session holding locks on lock.locks, then preview again to release "
                        "the rest."
                    )
                    % {
                        "n": batch.batch_no + 1,
                        "run": batch.billing_id,
                        "ms": LOCK_TIMEOUT_MS,
                        "tries": LOCK_TIMEOUT_RETRIES + 1,
                    }
                ) from None
            ctx.log(
                _("Batch %(n)s of run %(run)s waited over %(ms)s ms for a lock; retrying.")
                % {"n": batch.batch_no + 1, "run": batch.billing_id, "ms": LOCK_TIMEOUT_MS},
                level="warning",
            )
            time.sleep(LOCK_TIMEOUT_BACKOFF_S * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _record_batch(
    ctx: JobContext,
    batch: LockReleaseBatch,
    deleted_by_type: dict[str, int],
    not_deleted: list[tuple[str, bool]],
    *,
    resuming: bool,
    progress: _Progress,
) -> None:
    note = ""
    released = sum(deleted_by_type.values())
    deleted_count = released
    if resuming:
        # Rows missing now were deleted by the interrupted attempt, which committed this
        # batch before it could record it (it held the run's advisory lock): count them
        # once, as released. Rows still there had changed and stay "gone" (left alone).
        earlier = [lock_id for lock_id, still_there in not_deleted if not still_there]
        gone = [lock_id for lock_id, still_there in not_deleted if still_there]
        deleted_count += len(earlier)
        note = _("resumed: %(n)s rows had been deleted by the interrupted attempt") % {"n": len(earlier)}
    else:
        gone = [lock_id for lock_id, _still in not_deleted]
    run_counts = progress.by_run.setdefault(str(batch.billing_id), {"released": 0, "by_entity_type": {}})
    for entity_type, n in deleted_by_type.items():
        progress.by_type[entity_type] += n
        run_counts["by_entity_type"][entity_type] = run_counts["by_entity_type"].get(entity_type, 0) + n
    run_counts["released"] += released
    progress.done += batch.size
    with transaction.atomic():  # the batch's record and the job's progress: one commit
        LockReleaseBatch.objects.filter(pk=batch.pk).update(
            status=ReleaseBatchStatus.DONE,
            deleted_count=deleted_count,
            gone_ids=gone,
            note=note,
            done_at=timezone.now(),
        )
        if gone:
            ctx.log(
                _("Run %(run)s, batch %(n)s: %(g)s planned locks were gone or had changed; left alone.")
                % {"run": batch.billing_id, "n": batch.batch_no + 1, "g": len(gone)},
                level="warning",
            )
        ctx.progress(
            progress.done,
            progress.planned,
            _("Run %(run)s: batch %(n)s done") % {"run": batch.billing_id, "n": batch.batch_no + 1},
        )


def _check_still_eligible(
    conn: psycopg.Connection[Any], env: Environment, run_id: int, labels: list[str]
) -> None:
    row = conn.execute(
        "SELECT status::text, modify_date FROM billing.billings WHERE id = %s", [run_id]
    ).fetchone()
    if row is None:
        raise NoLongerEligible(_("the billing run no longer exists"))
    reason = ineligibility_reason(env, status=row[0], modify_date=row[1], labels=labels)
    if reason:
        raise NoLongerEligible(reason)


def _skipped_runs(plan: LockReleasePlan) -> dict[str, str]:
    return {
        str(b.billing_id): b.note
        for b in LockReleaseBatch.objects.filter(plan=plan, status=ReleaseBatchStatus.SKIPPED)
    }


def _released_count(plan_id: int) -> int:
    return sum(LockReleaseBatch.objects.filter(plan_id=plan_id).values_list("deleted_count", flat=True))


def _gone_count(plan_id: int) -> int:
    return sum(
        len(g) for g in LockReleaseBatch.objects.filter(plan_id=plan_id).values_list("gone_ids", flat=True)
    )


def release_result(plan: LockReleasePlan) -> dict[str, Any]:
    """What a plan's job released, by run and entity type (from the batches' records)."""
    with connections["default"].cursor() as cursor:
        cursor.execute(
            """
            SELECT i.billing_id, i.entity_type, count(*)
            FROM locks_lockreleaseitem i
            JOIN locks_lockreleasebatch b
              ON b.plan_id = i.plan_id AND b.billing_id = i.billing_id AND b.batch_no = i.batch_no
            WHERE i.plan_id = %s AND b.status = 'done' AND NOT (b.gone_ids ? i.lock_id)
            GROUP BY 1, 2 ORDER BY 1, 2
            """,
            [plan.pk],
        )
        rows = cursor.fetchall()
    runs: dict[str, dict[str, Any]] = {}
    by_type: dict[str, int] = defaultdict(int)
    for run_id, entity_type, count in rows:
        entry = runs.setdefault(str(run_id), {"released": 0, "by_entity_type": {}})
        entry["released"] += count
        entry["by_entity_type"][entity_type] = count
        by_type[entity_type] += count
    skipped = _skipped_runs(plan)
    return {
        "plan_id": plan.pk,
        "planned": plan.lock_count,
        "released": sum(by_type.values()),
        "gone": _gone_count(plan.pk),
        "runs": runs,
        "skipped_runs": skipped,
        "by_entity_type": dict(sorted(by_type.items())),
    }


RELEASED_ROWS_SQL = """
    SELECT i.lock_id, i.lock_key, i.entity_type, i.entity_id, i.billing_id, i.system_lock, i.create_date
    FROM locks_lockreleaseitem i
    JOIN locks_lockreleasebatch b
      ON b.plan_id = i.plan_id AND b.billing_id = i.billing_id AND b.batch_no = i.batch_no
    WHERE i.plan_id = %s AND b.status = 'done' AND NOT (b.gone_ids ? i.lock_id)
"""


def released_rows_digest(plan_id: int) -> str:
    """sha256 over the rows a plan's job actually deleted (what a restore puts back), in
    the plan digest's form: when every planned row went, it is the plan's own digest."""
    batches = LockReleaseBatch.objects.filter(plan_id=plan_id)
    if not batches.exclude(status=ReleaseBatchStatus.DONE).exists() and _gone_count(plan_id) == 0:
        return LockReleasePlan.objects.get(pk=plan_id).digest
    released = (
        "COPY (SELECT i.billing_id, i.batch_no, i.lock_id, i.lock_key, i.entity_type, i.entity_id, "
        "i.system_lock "
        "FROM locks_lockreleaseitem i JOIN locks_lockreleasebatch b "
        "ON b.plan_id = i.plan_id AND b.billing_id = i.billing_id AND b.batch_no = i.batch_no "
        "WHERE i.plan_id = {plan} AND b.status = 'done' AND NOT (b.gone_ids ? i.lock_id) "
        'ORDER BY i.billing_id, i.lock_id COLLATE "C") TO STDOUT'
    )
    return _copy_digest(released.format(plan=int(plan_id)))


def _never_ran(job: Job) -> bool:
    """Refused, or cancelled before it started."""
    return job.status in (JobStatus.REFUSED, JobStatus.CANCELLED) and job.started_at is None


def release_settled(job: Job) -> None:
    """After a release job settled (any outcome): record what went in the audit trail (the
    rows themselves stay in the plan, restorable, under the digest recorded here) and tell
    the configured channels."""
    from audit.services import SYSTEM_WORKER, audit_record
    from billing_ops.notifications import notify

    if _never_ran(job):  # nothing went; the refusal or cancel is in the audit trail already
        return
    env = get_environment(job.environment)
    plan = LockReleasePlan.objects.filter(pk=job.params.get("plan_id")).first()
    result = job.result or (release_result(plan) if plan else {})
    who = job.requested_by.get_username() if job.requested_by else "?"
    approver = job.approved_by.get_username() if job.approved_by else "-"
    duration = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else 0
    subject = _("[Billing Ops] %(env)s: lock release #%(id)s %(status)s") % {
        "env": env.label,
        "id": job.pk,
        "status": job.status,
    }
    lines = [
        _("Environment: %(env)s") % {"env": env.label},
        _("Runs: %(runs)s") % {"runs": ", ".join(str(r) for r in job.params.get("runs", []))},
        _("Locks released: %(n)s of %(planned)s planned")
        % {"n": grouped(result.get("released", 0)), "planned": grouped(job.params.get("lock_count", 0))},
        _("Duration: %(s).1f s") % {"s": duration},
        _("Requested by %(who)s, approved by %(approver)s") % {"who": who, "approver": approver},
    ]
    if job.error:
        lines.append(_("Error: %(error)s") % {"error": job.error})
    if plan is not None:
        audit_record(
            actor=SYSTEM_WORKER,
            action="locks.released",
            environment=env.key,
            object_type="job",
            object_id=job.pk,
            params={
                "plan_id": plan.pk,
                "plan_digest": plan.digest,
                "runs": job.params.get("runs", []),
                "system_only": plan.system_only,
                "scheduled": plan.scheduled,
                "requested_by": who,
                "approved_by": approver,
            },
            outcome={
                "status": job.status,
                "released": result.get("released", 0),
                "gone": result.get("gone", 0),
                "by_entity_type": result.get("by_entity_type", {}),
                "released_rows_digest": released_rows_digest(plan.pk),
            },
        )
    notify(subject=subject, body="\n".join(lines), source=f"job:{job.pk}")


def restore_settled(job: Job) -> None:
    """After a restore settled: record it in the audit trail."""
    from audit.services import SYSTEM_WORKER, audit_record

    if _never_ran(job):
        return

    audit_record(
        actor=SYSTEM_WORKER,
        action="locks.restored",
        environment=job.environment,
        object_type="job",
        object_id=job.pk,
        params={
            "plan_id": job.params.get("plan_id"),
            "release_job_id": job.params.get("release_job_id"),
            "requested_by": job.requested_by.get_username() if job.requested_by else "",
        },
        outcome={"status": job.status, **(job.result or {})},
    )


# --- Restore ---------------------------------------------------------------------------------


def restore_request(*, actor: Actor, release_job_id: int) -> Job:
    """An approver puts back what a release job deleted (a mistaken cleanup)."""
    access.require_approver(actor)
    release_job = Job.objects.get(pk=release_job_id, kind=RELEASE_KIND)
    if release_job.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        raise ValidationError(_("Only a finished release can be restored."))
    plan = LockReleasePlan.objects.get(pk=release_job.params["plan_id"])
    if plan.restored_by_job_id:
        raise ValidationError(_("Already restored by job #%(id)s.") % {"id": plan.restored_by_job_id})
    released = _released_count(plan.pk)
    if not released:
        raise ValidationError(_("This release deleted nothing; there is nothing to restore."))
    return job_request(
        actor=actor,
        kind=RESTORE_KIND,
        environment=plan.environment,
        params={
            "plan_id": plan.pk,
            "release_job_id": release_job.pk,
            "plan_digest": plan.digest,
            "released": released,
        },
        claims=[f"{RESTORE_KIND}:plan:{plan.pk}"]
        + [run_claim_key(plan.environment, r) for r in plan.run_ids],
        requester_check=access.require_approver,
    )


# The contract's lock.locks columns a restore puts back (create_date too, where it exists).
RESTORED_COLUMNS = "id, lock_key, entity_type, entity_id, billing_id, system_lock"


def lock_restore_execute(ctx: JobContext) -> dict[str, Any]:
    """Insert the released rows back, all in one transaction; ids that exist again are skipped."""
    env = ctx.env
    assert env is not None
    plan = LockReleasePlan.objects.get(pk=ctx.params["plan_id"])
    if plan.restored_by_job_id:
        raise JobRefused(_("Already restored by job #%(id)s.") % {"id": plan.restored_by_job_id})
    if plan_digest(plan.pk) != ctx.params["plan_digest"]:
        raise JobRefused(_("The recorded lock rows changed since the release; refusing to restore them."))
    released_sql = sql.SQL("COPY ({rows}) TO STDOUT").format(
        rows=sql.SQL(RELEASED_ROWS_SQL.replace("%s", "{plan}")).format(plan=sql.Literal(plan.pk))
    )
    ctx.progress(0, ctx.params["released"], _("Restoring"))
    with environment_connect(env) as conn:  # one transaction: all rows back, or none
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute(
            "CREATE TEMP TABLE restore_locks (id text, lock_key text, entity_type text, entity_id text, "
            "billing_id bigint, system_lock boolean, create_date timestamptz) ON COMMIT DROP"
        )
        with (
            connections["default"].cursor() as src_cursor,
            src_cursor.cursor.copy(released_sql) as src,
            conn.cursor().copy("COPY restore_locks FROM STDIN") as dst,
        ):
            for data in src:
                dst.write(data)
        insert: sql.Composable
        if plan.has_create_date:
            insert = sql.SQL(
                f"INSERT INTO lock.locks ({RESTORED_COLUMNS}, create_date) "
                f"SELECT {RESTORED_COLUMNS}, create_date AT TIME ZONE {{tz}} FROM restore_locks "
                "ON CONFLICT (id) DO NOTHING RETURNING id"
            ).format(tz=sql.Literal(env.time_zone))
        else:
            insert = sql.SQL(
                f"INSERT INTO lock.locks ({RESTORED_COLUMNS}) SELECT {RESTORED_COLUMNS} FROM restore_locks "
                "ON CONFLICT (id) DO NOTHING RETURNING id"
            )
        restored = len(conn.execute(insert).fetchall())
        total = conn.execute("SELECT count(*) FROM restore_locks").fetchone()[0]
        ctx.check_cancel()
    LockReleasePlan.objects.filter(pk=plan.pk).update(restored_by_job_id=ctx.job_id)
    ctx.progress(total, total, _("Restored"))
    return {"plan_id": plan.pk, "restored": restored, "skipped_existing": total - restored, "released": total}
