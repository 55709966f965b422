"""Read-only queries of reconciliation: upsert runs and the audit rows they wrote."""

from __future__ import annotations

import json
from typing import Any

from django.db import connections
from django.db.models import OuterRef, QuerySet, Subquery

from billing_ops.environments import Environment
from reconciliation.models import RollbackStatus, RunRollback, UpsertRun
from reconciliation.upsert import UPSERT_ACTION

AUDIT_ROWS_PER_PAGE = 100


def run_audit_counts(env: Environment, run_id: str) -> dict[str, int]:
    """Runbook §4.2: the run's audit rows per operation."""
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            """
            SELECT new_data ->> 'operation', count(*) FROM public.audit_logs
             WHERE action = %s AND new_data ->> 'run_id' = %s GROUP BY 1
            """,
            [UPSERT_ACTION, run_id],
        )
        return {op or "": n for op, n in cursor.fetchall()}


def run_audit_rows(env: Environment, run_id: str, *, page: int) -> tuple[list[dict[str, Any]], bool]:
    """One page of the run's audit rows in chain order, and whether more follow."""
    offset = (max(page, 1) - 1) * AUDIT_ROWS_PER_PAGE
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            """
            SELECT id, record_id, new_data ->> 'operation', old_data, new_data, hash, previous_hash,
                   created_at
              FROM public.audit_logs
             WHERE action = %s AND new_data ->> 'run_id' = %s
             ORDER BY created_at, id
             LIMIT %s OFFSET %s
            """,
            [UPSERT_ACTION, run_id, AUDIT_ROWS_PER_PAGE + 1, offset],
        )
        columns = [
            "id",
            "record_id",
            "operation",
            "old_data",
            "new_data",
            "hash",
            "previous_hash",
            "created_at",
        ]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:  # Django's cursor leaves jsonb as text
        for key in ("old_data", "new_data"):
            if isinstance(row[key], str):
                row[key] = json.loads(row[key])
    return rows[:AUDIT_ROWS_PER_PAGE], len(rows) > AUDIT_ROWS_PER_PAGE


def with_rollbacks(runs: QuerySet[UpsertRun]) -> QuerySet[UpsertRun]:
    """Runs with their rollback, if one was requested or done: ``rollback_status`` and
    ``rollback_job_id`` (None without one)."""
    rollbacks = RunRollback.objects.filter(
        environment=OuterRef("environment"),
        run_id=OuterRef("run_id"),
        status__in=[RollbackStatus.REQUESTED, RollbackStatus.SUCCEEDED],
    )
    return runs.annotate(
        rollback_status=Subquery(rollbacks.values("status")[:1]),
        rollback_job_id=Subquery(rollbacks.values("job_id")[:1]),
    )
