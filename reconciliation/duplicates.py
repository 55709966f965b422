"""Duplicate invoice lines: the runbook's precheck (§1.2) and its resolution (§5.1).

**Precheck** (read-only job): the §1.2 query's logic, grouping by ``invoice_id``,
``unit_id``, ``line_type`` and the runbook's expression over ``description``
(``regexp_replace(lower(trim(description)), '\\s+', ' ', 'g')``) — not the stored
``normalized_description`` column, which the platform may have filled differently and
which is exactly what the unique index cannot see past. The job keeps the counts and the
first ``PRECHECK_GROUPS_SHOWN`` groups (most duplicated first) with their ids newest first
and every row's values, and says how many groups were left out.

**Resolve** (a job that needs an approver everywhere): keep the newest line of each group
(``created_at``, then ``id``, descending: the runbook's order with a tie-break), delete the
rest, for exactly the groups a precheck job showed. The request names the precheck job
and the digest of its groups, so the approver approves those groups; at run time, in one
transaction with ``statement_timeout`` and ``lock_timeout``, the groups' current rows are
locked (``FOR UPDATE``) and compared with the precheck's, value for value. Anything
different — a line added to a group, changed, deleted, or a different newest line — and
nothing is deleted: the job asks for a new precheck. The deleted rows (id and every
value) are kept on the job and in the dashboard's audit trail; the precheck runs again
afterwards and its result is kept with them.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import psycopg
from django.core.exceptions import ValidationError
from django.db import DatabaseError, connections, transaction
from django.utils.translation import gettext as _

from audit.services import SYSTEM_WORKER, audit_record
from billing_ops import access
from billing_ops.environments import Environment
from billing_ops.models import Job, JobStatus
from billing_ops.services import Actor, JobContext, JobRefused, job_request

PRECHECK_KIND = "duplicate_precheck"
RESOLVE_KIND = "duplicate_resolve"

# Groups kept on a precheck job (and so the most one resolve deletes from).
PRECHECK_GROUPS_SHOWN = 500
# The precheck groups the whole table: minutes on a big one.
PRECHECK_STATEMENT_TIMEOUT_MS = 600_000
# The resolve finds its groups by key (a scan when the dedup index is missing) ...
RESOLVE_STATEMENT_TIMEOUT_MS = 600_000
# ... and waits this long for a row another session holds before giving up.
RESOLVE_LOCK_TIMEOUT_MS = 5_000

# The runbook's normalization (§1.2), over the raw description.
NORMALIZED = r"regexp_replace(lower(trim({t}.description)), '\s+', ' ', 'g')"
# A line's every column as text (exact numerics, UTC times), whatever columns the platform has.
ROW_VALUES = "(SELECT jsonb_object_agg(e.key, e.value #>> '{{}}') FROM jsonb_each(to_jsonb({t})) AS e)::text"

PRECHECK_SQL = f"""
WITH groups AS (
    SELECT il.invoice_id, il.unit_id, il.line_type,
           {NORMALIZED.format(t="il")} AS normalized,
           count(*) AS cnt,
           array_agg(il.id ORDER BY il.created_at DESC, il.id DESC) AS ids
      FROM public.invoice_lines il
     GROUP BY il.invoice_id, il.unit_id, il.line_type, {NORMALIZED.format(t="il")}
    HAVING count(*) > 1
)
SELECT invoice_id::text, unit_id::text, line_type::text, normalized, cnt, ids::text[],
       count(*) OVER (), sum(cnt) OVER ()
  FROM groups
 ORDER BY cnt DESC, invoice_id, unit_id, line_type, normalized
 LIMIT %s
"""

ROWS_BY_ID_SQL = f"""
SELECT il.id::text, {ROW_VALUES.format(t="il")}
  FROM public.invoice_lines il
 WHERE il.id = ANY(%s::uuid[])
"""

# The current lines of given groups (by key), newest first; the resolve locks them.
ROWS_BY_KEY_SQL = f"""
SELECT k.n, il.id::text, {ROW_VALUES.format(t="il")}
  FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])
       WITH ORDINALITY AS k(invoice_id, unit_id, line_type, normalized, n)
  JOIN public.invoice_lines il
    ON il.invoice_id = k.invoice_id AND il.unit_id = k.unit_id AND il.line_type = k.line_type
   AND {NORMALIZED.format(t="il")} = k.normalized
 ORDER BY k.n, il.created_at DESC, il.id DESC
"""


class DuplicatesChanged(JobRefused):
    """The groups are no longer what the precheck showed: nothing was deleted."""


def pin_session(cursor: Any, *, statement_timeout_ms: int, lock_timeout_ms: int | None = None) -> None:
    """Transaction-local settings: timeouts, and the text of values (UTC, ISO) so that the
    precheck and the resolve read a row's values identically."""
    cursor.execute(
        "SELECT set_config('statement_timeout', %s, true), set_config('TimeZone', 'UTC', true),"
        " set_config('DateStyle', 'ISO', true), set_config('extra_float_digits', '1', true)",
        [str(statement_timeout_ms)],
    )
    if lock_timeout_ms is not None:
        cursor.execute("SELECT set_config('lock_timeout', %s, true)", [str(lock_timeout_ms)])


def groups_digest(groups: list[dict[str, Any]]) -> str:
    canonical = json.dumps(groups, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def duplicate_groups(cursor: Any, *, limit: int) -> dict[str, Any]:
    """Runbook §1.2 on the cursor's transaction: counts, and the first ``limit`` groups with
    their lines' ids (newest first) and values."""
    cursor.execute(PRECHECK_SQL, [limit])
    found = cursor.fetchall()
    groups_total = int(found[0][6]) if found else 0
    rows_in_groups = int(found[0][7]) if found else 0
    ids = [line_id for row in found for line_id in row[5]]
    values: dict[str, dict[str, Any]] = {}
    if ids:
        cursor.execute(ROWS_BY_ID_SQL, [ids])
        values = {line_id: json.loads(text) for line_id, text in cursor.fetchall()}
    groups = [
        {
            "invoice_id": invoice_id,
            "unit_id": unit_id,
            "line_type": line_type,
            "normalized": normalized,
            "count": int(count),
            "ids": list(group_ids),
            "keep": group_ids[0],
            "rows": [values[i] for i in group_ids],
        }
        for invoice_id, unit_id, line_type, normalized, count, group_ids, _total, _rows in found
    ]
    return {
        "groups_total": groups_total,
        "rows_in_groups": rows_in_groups,
        # Keeping the newest of each group deletes this many lines in all.
        "rows_to_delete": rows_in_groups - groups_total,
        "groups_shown": len(groups),
        "groups_left_out": groups_total - len(groups),
        "rows_to_delete_shown": sum(g["count"] - 1 for g in groups),
        "groups": groups,
        "groups_digest": groups_digest(groups),
    }


def duplicate_precheck(env: Environment, *, limit: int | None = None) -> dict[str, Any]:
    """The precheck in one read-only snapshot of the environment."""
    started = time.monotonic()
    with transaction.atomic(using=env.alias), connections[env.alias].cursor() as cursor:
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        pin_session(cursor, statement_timeout_ms=PRECHECK_STATEMENT_TIMEOUT_MS)
        result = duplicate_groups(cursor, limit=PRECHECK_GROUPS_SHOWN if limit is None else limit)
    result["duration_ms"] = round((time.monotonic() - started) * 1000)
    return result


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("groups", "groups_digest")}


# --- Jobs -------------------------------------------------------------------------------------


def duplicate_precheck_request(*, actor: Actor, env: Environment) -> Job:
    return job_request(actor=actor, kind=PRECHECK_KIND, environment=env.key)


def duplicate_precheck_execute(ctx: JobContext) -> dict[str, Any]:
    assert ctx.env is not None
    ctx.progress(0, 1, _("Grouping invoice lines"))
    try:
        result = duplicate_precheck(ctx.env)
    finally:
        connections[ctx.env.alias].close()
    ctx.log(
        _(
            "%(groups)s duplicate groups holding %(rows)s lines (%(extra)s would be deleted); "
            "%(shown)s kept here."
        )
        % {
            "groups": result["groups_total"],
            "rows": result["rows_in_groups"],
            "extra": result["rows_to_delete"],
            "shown": result["groups_shown"],
        },
        level="warning" if result["groups_total"] else "info",
    )
    ctx.progress(1, 1)
    return result


def _precheck_job(env_key: str, precheck_job_id: Any) -> Job:
    try:
        job_id = int(precheck_job_id)
    except (TypeError, ValueError):
        raise ValidationError(_("Choose a duplicate precheck job.")) from None
    job = Job.objects.filter(pk=job_id, kind=PRECHECK_KIND, environment=env_key).first()
    if job is None:
        raise ValidationError(
            _("There is no duplicate precheck #%(id)s in this environment.") % {"id": job_id}
        )
    if job.status != JobStatus.SUCCEEDED or not isinstance(job.result, dict):
        raise ValidationError(
            _("Duplicate precheck #%(id)s did not succeed; run a new one.") % {"id": job.pk}
        )
    return job


def duplicate_resolve_request(*, actor: Actor, env: Environment, precheck_job_id: Any) -> Job:
    """Request deleting the duplicates a precheck job showed (keep newest); an approver
    must approve it in every environment. One resolve per environment at a time."""
    access.require_operator(actor)
    precheck = _precheck_job(env.key, precheck_job_id)
    assert isinstance(precheck.result, dict)
    groups = precheck.result.get("groups") or []
    if not groups:
        raise ValidationError(
            _("Duplicate precheck #%(id)s found no duplicates: nothing to resolve.") % {"id": precheck.pk}
        )
    return job_request(
        actor=actor,
        kind=RESOLVE_KIND,
        environment=env.key,
        params={
            "precheck_job_id": precheck.pk,
            "groups_digest": groups_digest(groups),
            "groups": len(groups),
            "rows_to_delete": sum(len(g["ids"]) - 1 for g in groups),
        },
        claims=[f"invoice-line-duplicates:{env.key}"],
    )


def _current_groups(
    cursor: Any, groups: list[dict[str, Any]], *, lock: bool
) -> dict[int, list[dict[str, Any]]]:
    """Each group's lines as they are now (newest first), by the group's position."""
    cursor.execute(
        ROWS_BY_KEY_SQL + (" FOR UPDATE OF il" if lock else ""),
        [
            [g["invoice_id"] for g in groups],
            [g["unit_id"] for g in groups],
            [g["line_type"] for g in groups],
            [g["normalized"] for g in groups],
        ],
    )
    current: dict[int, list[dict[str, Any]]] = {}
    for n, _line_id, text in cursor.fetchall():
        current.setdefault(int(n) - 1, []).append(json.loads(text))
    return current


def _changes(groups: list[dict[str, Any]], current: dict[int, list[dict[str, Any]]]) -> list[str]:
    changed: list[str] = []
    for n, group in enumerate(groups):
        now = current.get(n, [])
        if now == group["rows"]:
            continue
        label = f"{group['invoice_id']}/{group['unit_id']}/{group['line_type']}/{group['normalized']!r}"
        now_ids = [row.get("id") for row in now]
        if now_ids != group["ids"]:
            changed.append(
                _("%(group)s: lines %(then)s then, %(now)s now")
                % {"group": label, "then": group["ids"], "now": now_ids}
            )
        else:
            changed.append(_("%(group)s: a line's values changed") % {"group": label})
    return changed


def _verified_precheck(ctx: JobContext) -> Job:
    assert ctx.env is not None
    try:
        precheck = _precheck_job(ctx.env.key, ctx.params.get("precheck_job_id"))
    except ValidationError as exc:
        raise JobRefused(" ".join(exc.messages)) from None
    assert isinstance(precheck.result, dict)
    groups = precheck.result.get("groups") or []
    if groups_digest(groups) != ctx.params.get("groups_digest"):
        raise JobRefused(
            _("The groups of precheck #%(id)s are not the ones this request was approved for; refusing.")
            % {"id": precheck.pk}
        )
    return precheck


def duplicate_resolve_execute(ctx: JobContext) -> dict[str, Any]:
    """Delete all but the newest line of each group the precheck showed, if they are still
    exactly as shown; one transaction; then run the precheck again."""
    assert ctx.env is not None
    env = ctx.env
    precheck = _verified_precheck(ctx)
    assert isinstance(precheck.result, dict)
    groups: list[dict[str, Any]] = precheck.result["groups"]
    deleted_rows = [row for g in groups for row in g["rows"][1:]]
    delete_ids = [row["id"] for row in deleted_rows]
    ctx.progress(0, 3, _("Checking the groups against precheck #%(id)s") % {"id": precheck.pk})
    started = time.monotonic()
    try:
        with transaction.atomic(using=env.alias), connections[env.alias].cursor() as cursor:
            pin_session(
                cursor,
                statement_timeout_ms=RESOLVE_STATEMENT_TIMEOUT_MS,
                lock_timeout_ms=RESOLVE_LOCK_TIMEOUT_MS,
            )
            changed = _changes(groups, _current_groups(cursor, groups, lock=True))
            if changed:
                raise DuplicatesChanged(
                    _(
                        "The data changed since precheck #%(id)s; nothing was deleted. Run a new duplicate "
                        "precheck and resolve from it. Changed: %(changed)s"
                    )
                    % {"id": precheck.pk, "changed": "; ".join(changed[:10])}
                )
            ctx.progress(1, 3, _("Deleting %(n)s lines") % {"n": len(delete_ids)})
            cursor.execute("DELETE FROM public.invoice_lines WHERE id = ANY(%s::uuid[])", [delete_ids])
            if cursor.rowcount != len(delete_ids):  # pragma: no cover - the rows are locked
                raise DuplicatesChanged(
                    _("Deleted %(n)s lines instead of %(m)s; rolled back.")
                    % {"n": cursor.rowcount, "m": len(delete_ids)}
                )
            left = [g for g in _current_groups(cursor, groups, lock=False).values() if len(g) > 1]
            if left:  # a line of one of these groups appeared meanwhile: not what was approved
                raise DuplicatesChanged(
                    _(
                        "%(n)s of the groups still hold duplicates after the delete; rolled back. "
                        "Run a new precheck."
                    )
                    % {"n": len(left)}
                )
    except DatabaseError as exc:
        if isinstance(exc.__cause__, psycopg.errors.LockNotAvailable):
            raise JobRefused(
                _(
                    "A line of these groups is locked by another session (waited %(ms)s ms); nothing was "
                    "deleted. See Blocking sessions on the Reconciliation page, then request again."
                )
                % {"ms": RESOLVE_LOCK_TIMEOUT_MS}
            ) from exc
        raise
    finally:
        connections[env.alias].close()
    duration_ms = round((time.monotonic() - started) * 1000)
    ctx.log(
        _("Deleted %(n)s lines of %(g)s groups, keeping the newest of each (%(ms)s ms).")
        % {"n": len(delete_ids), "g": len(groups), "ms": duration_ms}
    )
    audit_record(
        actor=SYSTEM_WORKER,
        action="invoice_lines.duplicates_deleted",
        environment=env.key,
        object_type="job",
        object_id=ctx.job_id,
        params={
            "precheck_job_id": precheck.pk,
            "groups_digest": ctx.params.get("groups_digest", ""),
            "requested_by_id": ctx.requested_by_id,
            "approved_by_id": ctx.approved_by_id,
        },
        outcome={
            "groups": len(groups),
            "deleted": len(delete_ids),
            "kept": [g["keep"] for g in groups],
            "deleted_rows": deleted_rows,
        },
    )
    ctx.progress(2, 3, _("Running the precheck again"))
    try:
        after = _summary(duplicate_precheck(env))
    except DatabaseError as exc:  # the delete is committed; say the check could not run
        after = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
    finally:
        connections[env.alias].close()
    if after.get("groups_total"):
        ctx.log(
            _("The precheck still finds %(n)s duplicate groups (not among those resolved): run it again.")
            % {"n": after["groups_total"]},
            level="warning",
        )
    ctx.progress(3, 3)
    return {
        "precheck_job_id": precheck.pk,
        "groups": len(groups),
        "deleted": len(delete_ids),
        "kept": [g["keep"] for g in groups],
        "deleted_rows": deleted_rows,
        "duration_ms": duration_ms,
        "after": after,
        "clean": after.get("groups_total") == 0,
    }
