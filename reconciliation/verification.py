"""Post-upsert verification (runbook §4) of one run in one environment; read-only.

Runs the runbook's queries as the runbook prints them — §4.1's line total and count of
duplicate groups (which must be 0), §4.2's audit rows per operation, with the run id bound
as a parameter instead of the runbook's literal — in one READ ONLY, REPEATABLE READ
transaction, so that the answers describe one moment. Then it compares the audit rows per
operation with what the dashboard recorded for the run (``UpsertRun``, the real run:
inserted, updated). A run the dashboard did not make (one of the old node script's) has no
record: its audit counts are reported and the result says there is nothing to compare them
against.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
from django.utils.translation import gettext as _

from billing_ops.environments import Environment, environment_connect
from billing_ops.formats import grouped
from billing_ops.models import Job
from billing_ops.services import Actor, JobContext, job_request
from reconciliation.models import UpsertRun, UpsertRunStatus

# Runbook §4.1, verbatim.
RUNBOOK_TOTAL_LINES_SQL = "SELECT COUNT(*) AS total_lines FROM invoice_lines;"
RUNBOOK_DUPLICATE_GROUPS_SQL = """SELECT COUNT(*) FROM (
  SELECT invoice_id, unit_id, line_type,
         normalized_description
  FROM invoice_lines
  GROUP BY 1, 2, 3, 4
  HAVING COUNT(*) > 1
) sub;"""
# Runbook §4.2, verbatim but for the run id: a bound parameter, never spliced in.
RUNBOOK_AUDIT_TRAIL_SQL = """SELECT action,
       (new_data->>'operation') AS op,
       (new_data->>'run_id') AS run_id,
       COUNT(*) AS cnt
FROM audit_logs
WHERE action = 'upsert_missing_lines'
  AND new_data->>'run_id' = %s
GROUP BY 1, 2, 3;"""

# Counting tens of millions of lines takes longer than an ordinary statement may.
VERIFY_STATEMENT_TIMEOUT_MS = 15 * 60 * 1000
# ... but waiting behind someone's ACCESS EXCLUSIVE lock is not worth more than this.
VERIFY_LOCK_TIMEOUT_MS = 10_000
OPERATIONS = ("insert", "update")
RUN_ID_MAX_LENGTH = 200


def runbook_queries_run(env: Environment, run_id: str, *, between: Any = None) -> dict[str, Any]:
    """The three answers of runbook §4 for ``run_id``, from one snapshot."""
    with environment_connect(env) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            conn.execute(f"SET LOCAL statement_timeout = {VERIFY_STATEMENT_TIMEOUT_MS:d}")
            conn.execute(f"SET LOCAL lock_timeout = {VERIFY_LOCK_TIMEOUT_MS:d}")
            total = conn.execute(RUNBOOK_TOTAL_LINES_SQL).fetchone()[0]
            if between:
                between()
            duplicates = conn.execute(RUNBOOK_DUPLICATE_GROUPS_SQL).fetchone()[0]
            if between:
                between()
            audit = conn.execute(RUNBOOK_AUDIT_TRAIL_SQL, [run_id]).fetchall()
    return {
        "total_lines": int(total),
        "duplicate_groups": int(duplicates),
        "audit_rows": [
            {"action": action, "op": op, "run_id": rid, "cnt": int(cnt)}
            for action, op, rid, cnt in sorted(audit, key=lambda r: (r[1] is None, r[1] or ""))
        ],
    }


def _run_record(run: UpsertRun) -> dict[str, Any]:
    return {
        "id": run.pk,
        "status": run.status,
        "inserted": run.inserted,
        "updated": run.updated,
        "unchanged": run.unchanged,
        "duplicates": run.duplicates,
        "job_id": run.job_id,
        "requested_by": run.requested_by.get_username() if run.requested_by else "",
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
    }


def upsert_verification(env: Environment, run_id: str, *, between: Any = None) -> dict[str, Any]:
    """Runbook §4 for one run, compared with the dashboard's record of it."""
    started = time.monotonic()
    answers = runbook_queries_run(env, run_id, between=between)
    checks: list[dict[str, Any]] = [
        {
            "name": "total_lines",
            "status": "info",
            "expected": None,
            "actual": answers["total_lines"],
            "message": _("%(n)s lines in invoice_lines.") % {"n": grouped(answers["total_lines"])},
        },
        {
            "name": "duplicate_groups",
            "status": "pass" if answers["duplicate_groups"] == 0 else "fail",
            "expected": 0,
            "actual": answers["duplicate_groups"],
            "message": (
                _("No duplicate groups.")
                if answers["duplicate_groups"] == 0
                else _("%(n)s groups of lines share a dedup key (runbook §5.1 resolves them).")
                % {"n": answers["duplicate_groups"]}
            ),
        },
    ]
    counts = {op: 0 for op in OPERATIONS}
    others: dict[str, int] = {}
    for row in answers["audit_rows"]:
        if row["op"] in counts:
            counts[row["op"]] += row["cnt"]
        else:
            others[str(row["op"])] = others.get(str(row["op"]), 0) + row["cnt"]

    run = (
        UpsertRun.objects.select_related("requested_by")
        .filter(environment=env.key, run_id=run_id, dry_run=False)
        .first()
    )
    compared = False
    if run is None:
        dry_runs = UpsertRun.objects.filter(environment=env.key, run_id=run_id, dry_run=True).count()
        note = (
            _(
                "Only dry runs of %(run)s are recorded, and a dry run commits nothing: "
                "nothing to compare against."
            )
            if dry_runs
            else _(
                "The dashboard has no record of a run %(run)s here (a run of the old script?): "
                "nothing to compare the audit counts against."
            )
        ) % {"run": run_id}
        for op in OPERATIONS:
            checks.append(
                {
                    "name": f"audit_{op}",
                    "status": "info",
                    "expected": None,
                    "actual": counts[op],
                    "message": note,
                }
            )
    else:
        compared = run.status != UpsertRunStatus.RUNNING
        for op in OPERATIONS:
            checks.append(_audit_check(run, op, counts[op]))
    if others:
        checks.append(
            {
                "name": "audit_other",
                "status": "fail",
                "expected": 0,
                "actual": sum(others.values()),
                "message": _("Audit rows of this run with an operation other than insert or update: %(ops)s.")
                % {"ops": ", ".join(f"{op} ({n})" for op, n in sorted(others.items()))},
            }
        )
    failed = [c for c in checks if c["status"] == "fail"]
    return {
        "run_id": run_id,
        "environment": env.key,
        "passed": not failed,
        "message": (
            _("Verification passed")
            if not failed
            else _("Verification failed: %(n)s check(s) failed") % {"n": len(failed)}
        ),
        "compared": compared,
        "run": _run_record(run) if run else None,
        "audit_counts": counts,
        "checks": checks,
        **answers,
        "queries": {
            "total_lines": RUNBOOK_TOTAL_LINES_SQL,
            "duplicate_groups": RUNBOOK_DUPLICATE_GROUPS_SQL,
            "audit_trail": RUNBOOK_AUDIT_TRAIL_SQL,
        },
        "duration_ms": round((time.monotonic() - started) * 1000),
    }


def _audit_check(run: UpsertRun, op: str, actual: int) -> dict[str, Any]:
    reported = run.inserted if op == "insert" else run.updated
    if run.status == UpsertRunStatus.RUNNING:
        return {
            "name": f"audit_{op}",
            "status": "fail",
            "expected": None,
            "actual": actual,
            "message": _(
                "The run is still running: its audit rows are not committed yet; "
                "verify it when it has finished."
            ),
        }
    if run.status == UpsertRunStatus.FAILED:
        # All or nothing: a failed run committed no line and no audit row.
        expected, why = 0, _("the run failed and committed nothing")
    else:
        expected, why = reported, _("the run reported %(n)s") % {"n": reported}
    ok = actual == expected
    return {
        "name": f"audit_{op}",
        "status": "pass" if ok else "fail",
        "expected": expected,
        "actual": actual,
        "message": _("%(actual)s audit rows with operation %(op)s; %(why)s.")
        % {"actual": actual, "op": op, "why": why},
    }


def upsert_verify_request(*, actor: Actor, env: Environment, run_id: str) -> Job:
    """Queue the verification of a run (operators); any run id, recorded by us or not."""
    run_id = run_id.strip()
    if not run_id or len(run_id) > RUN_ID_MAX_LENGTH:
        raise ValueError(f"a run id is 1 to {RUN_ID_MAX_LENGTH} characters")
    return job_request(actor=actor, kind="upsert_verify", environment=env.key, params={"run_id": run_id})


def upsert_verify(ctx: JobContext) -> dict[str, Any]:
    """The ``upsert_verify`` job (read-only)."""
    assert ctx.env is not None
    run_id = str(ctx.params.get("run_id", "")).strip()
    if not run_id:
        raise ValueError("upsert_verify needs a run_id")
    ctx.progress(0, 3, _("Running the runbook's §4 queries"))
    steps = iter(range(1, 3))

    def between() -> None:
        ctx.check_cancel()
        ctx.progress(next(steps), 3)

    result = upsert_verification(ctx.env, run_id, between=between)
    for check in result["checks"]:
        ctx.log(
            f"{check['name']}: {check['message']}", level="error" if check["status"] == "fail" else "info"
        )
    ctx.log(result["message"], level="info" if result["passed"] else "error")
    ctx.progress(3, 3, result["message"])
    return result
