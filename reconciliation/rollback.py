"""Rolling back an upsert run (runbook §6.2), four-eyes, as one transaction.

The runbook deletes the lines a run inserted and leaves restoring the lines it updated to
"manual review". Here both are one reviewed, approved step, worked out from the run's own
audit rows (``action = 'upsert_missing_lines'`` and ``new_data ->> 'run_id'``, as §4.2
finds them; runs of the old script are rolled back the same way):

* per line (``record_id``), the run's first row says what the line was before the run
  (``insert``: it did not exist; ``update``: its ``old_data``) and its last row what the
  run left (``new_data``): a run that inserted and then updated a line (the old script
  could, in two batches) is undone to "did not exist";
* a line still exactly as the run left it is **deleted** (the run inserted it) or
  **restored** to its ``old_data`` (the run updated it);
* anything else is a **conflict**, listed and skipped, never overwritten: the line was
  changed since (by anyone), deleted since, or its audit rows cannot say what to put back.

1. **Preview** (``rollback_preview``): computed from the environment as it is now, with a
   sha256 digest over every line's action and current values.
2. **Request** (``rollback_request``, operators): the digest and the counts go into the
   job's parameters, with the reason; a ``RunRollback`` row holds the run (one requested
   or done rollback per run, enforced by the database) and a job claim keeps a second
   request off while one is pending.
3. **Approval** (another approver, always): ``rollback_approval_check`` computes the
   preview again; if its digest differs, the data changed since the request and approving
   is refused: the operator requests a new preview.
4. **Run** (``rollback_execute``): one transaction with timeouts. The run's lines are
   locked (``FOR UPDATE``), the plan is computed once more and must have the approved
   digest; then the deletes and restores, and one chained ``audit_logs`` row per line
   changed (action ``rollback_missing_lines``, ``new_data.operation`` ``delete`` or
   ``restore``, ``new_data.run_id`` the rolled-back run, ``old_data`` the line before the
   rollback). Any failure rolls everything back. The stakeholders are told (runbook §6.3).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
import psycopg.rows
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from audit.services import SYSTEM_WORKER, audit_record
from billing_ops import access
from billing_ops.environments import Environment, environment_connect, get_environment
from billing_ops.models import Job, JobStatus
from billing_ops.notifications import notify_stakeholders
from billing_ops.services import Actor, JobContext, JobRefused, job_request, user_of
from reconciliation.auditlog import AuditObject, append_audit_rows
from reconciliation.duplicates import pin_session
from reconciliation.models import RollbackStatus, RunRollback, UpsertRun, UpsertRunStatus
from reconciliation.upsert import UPSERT_ACTION, UpsertRefused, check_run_id

ROLLBACK_KIND = "upsert_rollback"
ROLLBACK_ACTION = "rollback_missing_lines"
PREVIEW_LINES_PER_PAGE = 100
CONFLICTS_KEPT = 200  # conflicts listed on the job's result; the rest are counted
STATEMENT_TIMEOUT_MS = 600_000
LOCK_TIMEOUT_MS = 5_000
PREVIEW_STATEMENT_TIMEOUT_MS = 60_000
REASON_MAX_CHARS = 1000

LINE_VALUES = ("invoice_id", "unit_id", "line_type", "description", "quantity", "amount")
_NUMBER = r"'^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$'"
_UUID = r"'^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$'"


def _num(expr: str) -> str:
    return f"(CASE WHEN ({expr}) ~ {_NUMBER} THEN ({expr})::numeric END)"


def _same_as(data: str) -> str:
    """The line ``l`` holds exactly the values of the JSON ``data`` (numbers compared as numbers)."""
    texts = [f"l.{c} = {data} ->> '{c}'" for c in ("invoice_id", "unit_id", "line_type", "description")]
    numbers = [f"l.{c} = {_num(f'{data} ->> {_quoted(c)}')}" for c in ("quantity", "amount")]
    return f"coalesce({' AND '.join(texts + numbers)}, false)"


def _quoted(name: str) -> str:
    return f"'{name}'"


def _complete(data: str) -> str:
    """``data`` holds a whole line: every value, numbers that are numbers."""
    keys = ", ".join(f"'{c}'" for c in LINE_VALUES)
    numbers = " AND ".join(f"({data} ->> '{c}') ~ {_NUMBER}" for c in ("quantity", "amount"))
    return f"coalesce({data} ?& ARRAY[{keys}] AND {numbers}, false)"


# One row per line the run touched: what it was, what the run left, what it is now, and
# what the rollback will do. Values as text (numeric::text), the session in UTC.
PLAN_SQL = f"""
WITH ops AS (
    SELECT record_id, created_at, id, old_data, new_data, new_data ->> 'operation' AS op
      FROM public.audit_logs
     WHERE action = '{UPSERT_ACTION}' AND new_data ->> 'run_id' = %(run_id)s
), per_line AS (
    SELECT record_id,
           (array_agg(op ORDER BY created_at, id))[1] AS first_op,
           (array_agg(old_data ORDER BY created_at, id))[1] AS before,
           (array_agg(new_data ORDER BY created_at DESC, id DESC))[1] AS after,
           count(*) AS ops
      FROM ops GROUP BY record_id
), judged AS (
    SELECT p.record_id, p.first_op, p.ops, p.before, p.after,
           l.id AS line_id, l.invoice_id, l.unit_id, l.line_type, l.description,
           l.quantity::text AS quantity, l.amount::text AS amount,
           CASE
             WHEN p.record_id !~ {_UUID} THEN 'not_a_line'
             WHEN p.first_op NOT IN ('insert', 'update') OR p.first_op IS NULL THEN 'unknown_operation'
             WHEN p.first_op = 'update' AND NOT {_complete("p.before")} THEN 'no_old_values'
             WHEN l.id IS NULL THEN 'deleted_since'
             WHEN NOT {_same_as("p.after")} THEN 'changed_since'
           END AS conflict
      FROM per_line p
      LEFT JOIN public.invoice_lines l
        ON l.id = CASE WHEN p.record_id ~ {_UUID} THEN p.record_id::uuid END
)
SELECT j.*,
       CASE WHEN conflict IS NOT NULL THEN 'skip' WHEN first_op = 'insert' THEN 'delete' ELSE 'restore' END
         AS action
  FROM judged j
"""

# The digest the approval is tied to: every line's action and current values, in order.
DIGEST_SQL = """
SELECT count(*) FILTER (WHERE action = 'delete'),
       count(*) FILTER (WHERE action = 'restore'),
       count(*) FILTER (WHERE action = 'skip'),
       encode(sha256(convert_to(coalesce(string_agg(md5(concat_ws(E'\\x1f',
           record_id, action, conflict, line_id::text, invoice_id, unit_id, line_type, description,
           quantity, amount, before::text, after::text)), '' ORDER BY record_id COLLATE "C"), ''),
       'UTF8')), 'hex')
  FROM rollback_plan
"""


class RollbackRefused(JobRefused):
    """The rollback must not run (nothing was changed)."""


@dataclass
class RollbackPreview:
    run_id: str
    delete: int = 0
    restore: int = 0
    skip: int = 0
    digest: str = ""
    conflicts_by_kind: dict[str, int] = field(default_factory=dict)
    lines: list[dict[str, Any]] = field(default_factory=list)
    page: int = 1
    has_more: bool = False

    @property
    def total(self) -> int:
        return self.delete + self.restore + self.skip

    def counts(self) -> dict[str, int]:
        return {"delete": self.delete, "restore": self.restore, "skip": self.skip}


CONFLICT_LABELS = {
    "deleted_since": gettext_lazy("deleted since the run"),
    "changed_since": gettext_lazy("changed since the run"),
    "no_old_values": gettext_lazy("its audit row holds no previous values to restore"),
    "unknown_operation": gettext_lazy("its audit row names no insert or update"),
    "not_a_line": gettext_lazy("its record id is not a line id"),
}


def _plan(cur: Any, run_id: str) -> tuple[int, int, int, str]:
    """Fill the temporary ``rollback_plan`` for the run; returns (delete, restore, skip, digest)."""
    cur.execute("DROP TABLE IF EXISTS rollback_plan")
    cur.execute(f"CREATE TEMPORARY TABLE rollback_plan ON COMMIT DROP AS {PLAN_SQL}", {"run_id": run_id})
    cur.execute("CREATE INDEX ON rollback_plan (line_id)")
    cur.execute("ANALYZE rollback_plan")
    cur.execute(DIGEST_SQL)
    delete, restore, skip, digest = cur.fetchone()
    return int(delete), int(restore), int(skip), str(digest)


def _line(row: dict[str, Any]) -> dict[str, Any]:
    """A preview line as the pages and the job result show it."""
    now = {c: row[c] for c in LINE_VALUES} if row["line_id"] is not None else None
    restore_to = (
        {c: (row["before"] or {}).get(c) for c in LINE_VALUES} if row["action"] == "restore" else None
    )
    after = row["after"] or {}
    return {
        "record_id": row["record_id"],
        "action": row["action"],
        "conflict": row["conflict"] or "",
        "conflict_label": CONFLICT_LABELS.get(row["conflict"] or "", ""),
        "operation": row["first_op"] or "",
        "operations": int(row["ops"]),
        "run_left": {c: after.get(c) for c in LINE_VALUES},
        "now": now,
        "restore_to": restore_to,
    }


def valid_run_id(run_id: str) -> str:
    try:
        return check_run_id(run_id)
    except UpsertRefused as exc:
        raise ValidationError(str(exc)) from None


def rollback_preview(env: Environment, run_id: str, *, page: int = 1) -> RollbackPreview:
    """What a rollback of the run would do now: counts, digest, and one page of lines
    (conflicts first), read in one snapshot of the environment."""
    valid_run_id(run_id)
    with environment_connect(env, application_name="billing-ops rollback preview") as conn:
        return preview_on(conn, run_id, page=page)


def preview_on(conn: Any, run_id: str, *, page: int = 1) -> RollbackPreview:
    """``rollback_preview`` on a psycopg connection (not in a transaction); changes nothing."""
    preview = RollbackPreview(run_id=run_id, page=max(page, 1))
    with conn.transaction(force_rollback=True), conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        # One snapshot for the counts, the digest and the page. Not READ ONLY: the plan
        # is a temporary table; force_rollback keeps the transaction from writing anything.
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        pin_session(cur, statement_timeout_ms=PREVIEW_STATEMENT_TIMEOUT_MS)
        with conn.cursor() as plain:
            preview.delete, preview.restore, preview.skip, preview.digest = _plan(plain, run_id)
            plain.execute(
                "SELECT conflict, count(*) FROM rollback_plan"
                " WHERE conflict IS NOT NULL GROUP BY 1 ORDER BY 1"
            )
            preview.conflicts_by_kind = {kind: int(n) for kind, n in plain.fetchall()}
        cur.execute(
            """
            SELECT * FROM rollback_plan
             ORDER BY action = 'skip' DESC, action, record_id COLLATE "C"
             LIMIT %s OFFSET %s
            """,
            [PREVIEW_LINES_PER_PAGE + 1, (preview.page - 1) * PREVIEW_LINES_PER_PAGE],
        )
        rows = cur.fetchall()
    preview.has_more = len(rows) > PREVIEW_LINES_PER_PAGE
    preview.lines = [_line(row) for row in rows[:PREVIEW_LINES_PER_PAGE]]
    return preview


# --- Request and approval ------------------------------------------------------------------


def rollback_claim_key(env_key: str, run_id: str) -> str:
    return f"rollback:{env_key}:{run_id}"


def _refuse_if_not_rollbackable(env: Environment, run_id: str) -> None:
    done = RunRollback.objects.filter(
        environment=env.key, run_id=run_id, status__in=[RollbackStatus.REQUESTED, RollbackStatus.SUCCEEDED]
    ).first()
    if done is not None:
        raise ValidationError(
            _("Run %(run)s already has a rollback (job #%(job)s, %(status)s); a run is rolled back once.")
            % {"run": run_id, "job": done.job_id, "status": done.status}
        )
    unfinished = UpsertRun.objects.filter(
        environment=env.key,
        run_id=run_id,
        dry_run=False,
        status__in=[UpsertRunStatus.PENDING, UpsertRunStatus.RUNNING],
    ).first()
    if unfinished is not None:
        raise ValidationError(
            _("Run %(run)s has not finished (job #%(job)s); roll it back once it has.")
            % {"run": run_id, "job": unfinished.job_id}
        )


def rollback_request(
    *, actor: Actor, env: Environment, run_id: str, digest: str, reason: str, confirmation: str = ""
) -> Job:
    """Request the rollback of a run as previewed (``digest``); an approver must approve it."""
    access.require_operator(actor)
    valid_run_id(run_id)
    reason = " ".join(reason.split())[:REASON_MAX_CHARS]
    if not reason:
        raise ValidationError(_("Say why the run is rolled back: the reason goes to the stakeholders."))
    if env.confirm_name and confirmation.strip() != env.label:
        raise ValidationError(_("Type the environment's name, %(label)s, to confirm.") % {"label": env.label})
    _refuse_if_not_rollbackable(env, run_id)
    preview = rollback_preview(env, run_id)
    if preview.total == 0:
        raise ValidationError(
            _("Run %(run)s has no audit rows in %(env)s: there is nothing to roll back.")
            % {"run": run_id, "env": env.label}
        )
    if preview.digest != digest:
        raise ValidationError(
            _("The data changed since your preview; look at the new preview and request again.")
        )
    if preview.delete + preview.restore == 0:
        raise ValidationError(
            _("Every line of run %(run)s conflicts: a rollback would change nothing.") % {"run": run_id}
        )
    try:
        with transaction.atomic():
            job = job_request(
                actor=actor,
                kind=ROLLBACK_KIND,
                environment=env.key,
                params={
                    "run_id": run_id,
                    "reason": reason,
                    "preview_digest": preview.digest,
                    "delete": preview.delete,
                    "restore": preview.restore,
                    "skip": preview.skip,
                },
                claims=[rollback_claim_key(env.key, run_id)],
            )
            RunRollback.objects.create(
                environment=env.key,
                run_id=run_id,
                job=job,
                requested_by=user_of(actor),
                reason=reason,
                preview_digest=preview.digest,
                planned_delete=preview.delete,
                planned_restore=preview.restore,
                planned_conflicts=preview.skip,
            )
    except IntegrityError:
        raise ValidationError(
            _("Run %(run)s already has a rollback; a run is rolled back once.") % {"run": run_id}
        ) from None
    return job


def rollback_approval_check(job: Job) -> None:
    """An approval is for the preview the request was made from: if the data changed since,
    the request cannot be approved (refuse it; the operator previews again)."""
    env = get_environment(job.environment)
    current = rollback_preview(env, job.params["run_id"])
    if current.digest != job.params.get("preview_digest"):
        raise ValidationError(
            _(
                "The data changed since this rollback was previewed (now: %(delete)s to delete, "
                "%(restore)s to restore, %(skip)s conflicts). Refuse it; the operator must preview again."
            )
            % current.counts()
        )


# --- Running -------------------------------------------------------------------------------------


# A rollback's audit row: new_data is the operation and the run's tags, with the line's
# restored values for a restore (a delete's values are NULL: left out); old_data the line
# as the rollback found it.
_OLD_DATA = AuditObject(columns=LINE_VALUES)
_NEW_VALUES = ", ".join(f"a.{c} AS new_{c}" for c in LINE_VALUES)  # NULL for a delete
_OLD_VALUES = ", ".join(f"p.{c} AS old_{c}" for c in LINE_VALUES)
_AUDIT_ROWS = f"""
    SELECT a.k, a.id AS record_id, a.operation AS new_operation, {_NEW_VALUES}, {_OLD_VALUES}
      FROM rollback_applied a JOIN rollback_plan p ON p.line_id = a.id
     WHERE a.k > %(low)s AND a.k <= %(high)s
"""


def _new_data(run_id: str, job_id: int) -> AuditObject:
    return AuditObject(
        columns=("operation", *LINE_VALUES),
        constants={"run_id": run_id, "rollback_job": str(job_id)},
    )


_APPLY_SQL = """
CREATE TEMPORARY TABLE rollback_applied (k bigint, id uuid, operation text, invoice_id text, unit_id text,
                                         line_type text, description text, quantity text, amount text)
    ON COMMIT DROP;
CREATE TEMPORARY SEQUENCE rollback_k;
WITH gone AS (
    DELETE FROM public.invoice_lines l USING rollback_plan p
     WHERE p.action = 'delete' AND l.id = p.line_id
    RETURNING l.id, p.record_id
)
INSERT INTO rollback_applied (k, id, operation)
SELECT nextval('rollback_k'), id, 'delete' FROM (SELECT id FROM gone ORDER BY record_id COLLATE "C") g;
WITH back AS (
    UPDATE public.invoice_lines l
       SET invoice_id = p.before ->> 'invoice_id', unit_id = p.before ->> 'unit_id',
           line_type = p.before ->> 'line_type', description = p.before ->> 'description',
           normalized_description = regexp_replace(lower(trim(p.before ->> 'description')), '\\s+', ' ', 'g'),
           quantity = (p.before ->> 'quantity')::numeric, amount = (p.before ->> 'amount')::numeric
      FROM rollback_plan p
     WHERE p.action = 'restore' AND l.id = p.line_id
    RETURNING l.id, p.record_id, l.invoice_id, l.unit_id, l.line_type, l.description,
              l.quantity::text AS quantity, l.amount::text AS amount
)
INSERT INTO rollback_applied
SELECT nextval('rollback_k'), id, 'restore', invoice_id, unit_id, line_type, description, quantity, amount
  FROM (SELECT * FROM back ORDER BY record_id COLLATE "C") b;
"""


@dataclass
class RollbackOutcome:
    run_id: str
    deleted: int = 0
    restored: int = 0
    skipped: int = 0
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    audit_rows: int = 0
    audit_head: str | None = None
    duration_ms: int = 0

    def as_result(self) -> dict[str, Any]:
        return asdict(self)


def rollback_run(
    conn: Any, *, run_id: str, approved_digest: str, job_id: int, report: Any
) -> RollbackOutcome:
    """The rollback itself on ``conn`` (psycopg, not in a transaction): all or nothing."""
    started = time.monotonic()
    outcome = RollbackOutcome(run_id=run_id)
    with conn.transaction(), conn.cursor() as cur:
        pin_session(cur, statement_timeout_ms=STATEMENT_TIMEOUT_MS, lock_timeout_ms=LOCK_TIMEOUT_MS)
        cur.execute(
            "SELECT EXISTS (SELECT 1 FROM public.audit_logs"
            " WHERE action = %s AND new_data ->> 'run_id' = %s)",
            [ROLLBACK_ACTION, run_id],
        )
        if cur.fetchone()[0]:
            raise RollbackRefused(
                _("Run %(run)s was already rolled back; nothing was changed.") % {"run": run_id}
            )
        report.progress(0, 3, _("Locking the run's lines"))
        cur.execute(
            f"""
            SELECT count(*) FROM (
                SELECT 1 FROM public.invoice_lines
                 WHERE id IN (SELECT record_id::uuid FROM public.audit_logs
                               WHERE action = %s AND new_data ->> 'run_id' = %s AND record_id ~ {_UUID})
                   FOR UPDATE) locked
            """,
            [UPSERT_ACTION, run_id],
        )
        delete, restore, skip, digest = _plan(cur, run_id)
        if digest != approved_digest:
            raise RollbackRefused(
                _(
                    "The data changed since the approved preview (now: %(delete)s to delete, %(restore)s to "
                    "restore, %(skip)s conflicts); nothing was changed. Request the rollback again from a "
                    "new preview."
                )
                % {"delete": delete, "restore": restore, "skip": skip}
            )
        report.check_cancel()
        report.progress(1, 3, _("Deleting %(d)s lines, restoring %(r)s") % {"d": delete, "r": restore})
        cur.execute(_APPLY_SQL)
        cur.execute("SELECT count(*) FILTER (WHERE operation = 'delete'), count(*) FROM rollback_applied")
        outcome.deleted, applied = cur.fetchone()
        outcome.restored = applied - outcome.deleted
        outcome.skipped = skip
        if (outcome.deleted, outcome.restored) != (delete, restore):  # the lines are locked: cannot happen
            raise RollbackRefused(
                _("Changed %(d)s/%(r)s lines instead of %(pd)s/%(pr)s; rolled back.")
                % {"d": outcome.deleted, "r": outcome.restored, "pd": delete, "pr": restore}
            )
        cur.execute(
            "SELECT record_id, conflict, invoice_id, unit_id, line_type, description FROM rollback_plan"
            ' WHERE action = %s ORDER BY record_id COLLATE "C" LIMIT %s',
            ["skip", CONFLICTS_KEPT],
        )
        outcome.conflicts = [
            {
                "record_id": record_id,
                "conflict": conflict,
                "line": None if invoice_id is None else f"{invoice_id}/{unit_id}/{line_type}/{description}",
            }
            for record_id, conflict, invoice_id, unit_id, line_type, description in cur.fetchall()
        ]
        report.check_cancel()
        report.progress(2, 3, _("Writing the audit trail"))
        outcome.audit_rows, outcome.audit_head = append_audit_rows(
            cur,
            action=ROLLBACK_ACTION,
            rows_sql=_AUDIT_ROWS,
            rows=applied,
            params={},
            new_data=_new_data(run_id, job_id),
            old_data=_OLD_DATA,
        )
        report.check_cancel()
    outcome.duration_ms = round((time.monotonic() - started) * 1000)
    report.progress(3, 3, _("Done"))
    return outcome


def rollback_execute(ctx: JobContext) -> dict[str, Any]:
    """The job: roll the run back, record it, tell the stakeholders."""
    assert ctx.env is not None
    env = ctx.env
    run_id = ctx.params["run_id"]
    try:
        with environment_connect(env, application_name=f"billing-ops rollback job {ctx.job_id}") as conn:
            outcome = rollback_run(
                conn,
                run_id=run_id,
                approved_digest=ctx.params["preview_digest"],
                job_id=ctx.job_id,
                report=ctx,
            )
    except psycopg.errors.LockNotAvailable:
        raise RollbackRefused(
            _(
                "A line of run %(run)s is locked by another session (waited %(ms)s ms); nothing was changed. "
                "See Blocking sessions on the Reconciliation page, then request again."
            )
            % {"run": run_id, "ms": LOCK_TIMEOUT_MS}
        ) from None
    ctx.log(
        _(
            "Run %(run)s rolled back: %(d)s inserted lines deleted, %(r)s updated lines restored, "
            "%(s)s skipped as conflicts (%(ms)s ms)."
        )
        % {
            "run": run_id,
            "d": outcome.deleted,
            "r": outcome.restored,
            "s": outcome.skipped,
            "ms": outcome.duration_ms,
        }
    )
    with transaction.atomic():
        RunRollback.objects.filter(job_id=ctx.job_id).update(
            status=RollbackStatus.SUCCEEDED,
            deleted=outcome.deleted,
            restored=outcome.restored,
            skipped=outcome.skipped,
            finished_at=timezone.now(),
        )
        job = Job.objects.select_related("requested_by", "approved_by").get(pk=ctx.job_id)
        requester = job.requested_by.get_username() if job.requested_by else ""
        approver = job.approved_by.get_username() if job.approved_by else ""
        reason = ctx.params.get("reason", "")
        audit_record(
            actor=SYSTEM_WORKER,
            action="upsert.rolled_back",
            environment=env.key,
            object_type="job",
            object_id=ctx.job_id,
            params={
                "run_id": run_id,
                "reason": reason,
                "preview_digest": ctx.params["preview_digest"],
                "requested_by": requester,
                "approved_by": approver,
            },
            outcome={
                "deleted": outcome.deleted,
                "restored": outcome.restored,
                "skipped": outcome.skipped,
                "audit_rows": outcome.audit_rows,
                "audit_head": outcome.audit_head or "",
            },
        )
        _notify(env, ctx.job_id, outcome, reason=reason, requester=requester, approver=approver)
    return outcome.as_result()


def _notify(
    env: Environment, job_id: int, outcome: RollbackOutcome, *, reason: str, requester: str, approver: str
) -> None:
    """Runbook §6.3: the ops channel's line, and the email to the product owner and finance."""
    values = {"env": env.label, "run": outcome.run_id, "reason": reason}
    body = "\n".join(
        [
            _("Billing reconciliation rolled back."),
            "",
            _("Environment: %(env)s") % values,
            _("Run: %(run)s") % values,
            _("Reason: %(reason)s") % values,
            _("Inserted lines deleted: %(n)s") % {"n": outcome.deleted},
            _("Updated lines restored to their previous values: %(n)s") % {"n": outcome.restored},
            _("Lines skipped (changed or deleted since the run, left as they are): %(n)s")
            % {"n": outcome.skipped},
            _("Requested by %(who)s, approved by %(approver)s (job #%(id)s).")
            % {"who": requester, "approver": approver, "id": job_id},
        ]
    )
    notify_stakeholders(
        email_subject=_("Billing reconciliation rolled back: run %(run)s (%(env)s)") % values,
        email_body=body,
        ops_text=_("🔴 Rollback executed for run %(run)s. Reason: %(reason)s") % values,
        source=f"job:{job_id}",
    )


def rollback_settled(job: Job) -> None:
    """However the job ended, a rollback that did not succeed frees the run for a new request."""
    if job.status == JobStatus.SUCCEEDED:
        return
    RunRollback.objects.filter(job=job, status=RollbackStatus.REQUESTED).update(
        status=RollbackStatus.FAILED,
        error=(job.error or _("The job ended as %(status)s.") % {"status": job.status})[:4000],
        finished_at=timezone.now(),
    )
