"""The runbook's two indexes (§2.2): status from the catalogs, the upsert's guard, and
creation CONCURRENTLY, including the invalid index a failed build leaves behind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from django.db import connections, transaction

from audit.models import AuditEntry
from billing_ops import services
from billing_ops.environments import environment_connect
from billing_ops.models import Job, JobStatus
from reconciliation import duplicates, indexes
from reconciliation.indexes import DedupIndexUnusable, dedup_index_status, require_dedup_index
from tests.factories import make_invoice_line

pytestmark = [
    pytest.mark.django_db(databases="__all__", transaction=True),
    pytest.mark.usefixtures("inline_jobs"),
]

DEDUP = "idx_invoice_lines_dedup"
UNIT_MONTH = "idx_invoice_lines_unit_month"
T0 = datetime(2026, 2, 8, 9, 0, tzinfo=UTC)

# Runbook §2.2's check for failed CONCURRENTLY builds, verbatim.
RUNBOOK_INVALID_CHECK = """
SELECT indexrelid::regclass, indisvalid
FROM pg_index
WHERE NOT indisvalid;
"""


def sql(env, statement: str, params=None) -> list[tuple]:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def env(unprotected_env, clean_environments):
    """The unprotected environment; afterwards its invoice_lines is empty and has exactly
    the contract's two indexes again, whatever the test did to them."""
    yield unprotected_env
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute("TRUNCATE public.invoice_lines")
        cursor.execute(f"DROP INDEX IF EXISTS public.{DEDUP}")
        cursor.execute(f"DROP INDEX IF EXISTS public.{UNIT_MONTH}")
        cursor.execute(
            f"CREATE UNIQUE INDEX {DEDUP} ON public.invoice_lines"
            " (invoice_id, unit_id, line_type, normalized_description)"
        )
        cursor.execute(f"CREATE INDEX {UNIT_MONTH} ON public.invoice_lines (unit_id, invoice_id)")


def make_duplicates(env) -> list[str]:
    """Two lines with the same dedup key (possible only while the unique index is gone)."""
    return [
        make_invoice_line(env, description="Energy charge", created_at=T0),
        make_invoice_line(env, description="energy  CHARGE", created_at=T0 + timedelta(hours=1)),
    ]


def failed_concurrent_build(env) -> None:
    """The runbook's own statement, on a table with duplicates: it fails and leaves an
    invalid index behind."""
    with environment_connect(env, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {DEDUP} ON invoice_lines"
                " (invoice_id, unit_id, line_type, normalized_description)"
            )
        # ... and running it again "succeeds" without building anything: the trap.
        conn.execute(
            f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {DEDUP} ON invoice_lines"
            " (invoice_id, unit_id, line_type, normalized_description)"
        )


def run(job: Job) -> Job:
    services.job_execute(job_id=job.pk, worker="test")
    return Job.objects.get(pk=job.pk)


def test_the_contracts_indexes_are_valid(env) -> None:
    statuses = dedup_index_status(env)
    assert list(statuses) == [DEDUP, UNIT_MONTH]
    dedup, unit_month = statuses.values()
    assert dedup.ok and dedup.exists and dedup.valid and dedup.ready and dedup.unique
    assert dedup.columns == ("invoice_id", "unit_id", "line_type", "normalized_description")
    assert unit_month.ok and unit_month.columns == ("unit_id", "invoice_id") and not unit_month.unique
    assert require_dedup_index(env).ok


def test_a_missing_index_is_created_concurrently(env, operator) -> None:
    sql(env, f"DROP INDEX public.{UNIT_MONTH}")
    assert dedup_index_status(env)[UNIT_MONTH].problems == ("missing",)
    check = run(indexes.index_check_request(actor=operator, env=env))
    assert check.status == JobStatus.SUCCEEDED and check.result["ok"] is False
    job = run(indexes.index_create_request(actor=operator, env=env))
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert {o["name"]: o["action"] for o in job.result["indexes"]} == {DEDUP: "none", UNIT_MONTH: "created"}
    assert all(s.ok for s in dedup_index_status(env).values())
    entry = AuditEntry.objects.get(action="index.created")
    assert entry.object_id == UNIT_MONTH and entry.environment == env.key
    assert "CREATE INDEX idx_invoice_lines_unit_month" in entry.outcome["definition"]


def test_require_dedup_index_refuses_a_missing_index(env) -> None:
    sql(env, f"DROP INDEX public.{DEDUP}")
    with pytest.raises(DedupIndexUnusable, match="does not exist") as caught:
        require_dedup_index(env)
    assert caught.value.problems == ("missing",)
    # Inside the upsert's own transaction, on its own psycopg cursor, the transaction stays usable.
    with environment_connect(env) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT 1")
        with pytest.raises(DedupIndexUnusable):
            require_dedup_index(cursor)
        cursor.execute("SELECT count(*) FROM public.invoice_lines")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    # And on a Django cursor inside an atomic block.
    with (
        transaction.atomic(using=env.alias),
        connections[env.alias].cursor() as cursor,
        pytest.raises(DedupIndexUnusable),
    ):
        require_dedup_index(cursor)


def test_require_dedup_index_refuses_an_index_that_is_not_unique_or_on_other_columns(env) -> None:
    sql(env, f"DROP INDEX public.{DEDUP}")
    sql(env, f"CREATE INDEX {DEDUP} ON public.invoice_lines (invoice_id, unit_id)")
    with pytest.raises(DedupIndexUnusable) as caught:
        require_dedup_index(env)
    assert caught.value.problems == ("not_unique", "wrong_columns")
    assert "is not UNIQUE" in str(caught.value) and "is on (invoice_id, unit_id)" in str(caught.value)
    sql(env, f"DROP INDEX public.{DEDUP}")
    sql(
        env,
        f"CREATE UNIQUE INDEX {DEDUP} ON public.invoice_lines (invoice_id, unit_id, line_type, description)",
    )
    with pytest.raises(DedupIndexUnusable) as caught:
        require_dedup_index(env)
    assert caught.value.problems == ("wrong_columns",)
    sql(env, f"DROP INDEX public.{DEDUP}")
    sql(
        env,
        f"CREATE UNIQUE INDEX {DEDUP} ON public.invoice_lines"
        " (invoice_id, unit_id, line_type, normalized_description) WHERE line_type <> 'tax'",
    )
    with pytest.raises(DedupIndexUnusable) as caught:
        require_dedup_index(env)
    assert caught.value.problems == ("partial",)


def test_an_index_of_the_right_name_on_another_table_does_not_count(env) -> None:
    sql(env, f"DROP INDEX public.{DEDUP}")
    sql(env, "CREATE TABLE public.not_invoice_lines (LIKE public.invoice_lines)")
    try:
        sql(
            env,
            f"CREATE UNIQUE INDEX {DEDUP} ON public.not_invoice_lines"
            " (invoice_id, unit_id, line_type, normalized_description)",
        )
        with pytest.raises(DedupIndexUnusable) as caught:
            require_dedup_index(env)
        assert caught.value.problems == ("wrong_table",)
    finally:
        sql(env, "DROP TABLE public.not_invoice_lines")


def test_index_creation_leaves_a_valid_index_of_another_definition_alone(env, operator) -> None:
    sql(env, f"DROP INDEX public.{DEDUP}")
    sql(env, f"CREATE INDEX {DEDUP} ON public.invoice_lines (invoice_id, unit_id)")
    job = run(indexes.index_create_request(actor=operator, env=env))
    assert job.status == JobStatus.FAILED and "left alone" in job.error
    assert dedup_index_status(env)[DEDUP].columns == ("invoice_id", "unit_id")


def test_an_invalid_index_is_detected_dropped_and_rebuilt_once_the_duplicates_are_resolved(
    env, operator, approver
) -> None:
    sql(env, f"DROP INDEX public.{DEDUP}")
    older, newer = make_duplicates(env)
    failed_concurrent_build(env)

    # Detected: by the runbook's own check, by the status, and by the upsert's guard.
    assert (DEDUP, False) in [(str(r[0]), r[1]) for r in sql(env, RUNBOOK_INVALID_CHECK)]
    status = dedup_index_status(env)[DEDUP]
    assert status.exists and not status.valid and status.problems == ("invalid",)
    with pytest.raises(DedupIndexUnusable, match="INVALID"):
        require_dedup_index(env)
    check = run(indexes.index_check_request(actor=operator, env=env))
    assert check.result["ok"] is False
    assert DEDUP in [i["index"] for i in check.result["invalid_indexes"]]

    # While the duplicates are there, creation fails, points at the precheck and leaves no invalid index.
    job = run(indexes.index_create_request(actor=operator, env=env))
    assert job.status == JobStatus.FAILED
    assert "duplicate precheck" in job.error and "was dropped" in job.error
    assert dedup_index_status(env)[DEDUP].problems == ("missing",)
    assert sql(env, RUNBOOK_INVALID_CHECK) == []
    assert AuditEntry.objects.filter(action="index.dropped_invalid", object_id=DEDUP).count() == 1
    assert AuditEntry.objects.get(action="index.build_failed").outcome["dropped_leftover"] == "true"
    # The unit/month index was built all the same.
    assert dedup_index_status(env)[UNIT_MONTH].ok

    # Someone runs the runbook's statement again: invalid again. Resolve the duplicates ...
    failed_concurrent_build(env)
    precheck = run(duplicates.duplicate_precheck_request(actor=operator, env=env))
    resolve = duplicates.duplicate_resolve_request(actor=operator, env=env, precheck_job_id=precheck.pk)
    services.job_approve(actor=approver, job_id=resolve.pk, digest=resolve.params_digest)
    assert run(resolve).status == JobStatus.SUCCEEDED
    assert [r[0] for r in sql(env, "SELECT id::text FROM public.invoice_lines")] == [newer]

    # ... and creation drops the invalid index and builds it again.
    job = run(indexes.index_create_request(actor=operator, env=env))
    assert job.status == JobStatus.SUCCEEDED, job.error
    outcome = next(o for o in job.result["indexes"] if o["name"] == DEDUP)
    assert outcome["action"] == "rebuilt" and outcome["dropped_invalid"] is True
    assert outcome["before"]["problems"] == ["invalid"]
    assert require_dedup_index(env).ok and sql(env, RUNBOOK_INVALID_CHECK) == []
    created = AuditEntry.objects.get(action="index.created", object_id=DEDUP)
    assert created.outcome["rebuilt_after_invalid"] == "true"
    assert job.result["ok"] is True
    assert older not in [r[0] for r in sql(env, "SELECT id::text FROM public.invoice_lines")]


def test_index_creation_needs_an_approver_in_a_protected_environment(
    operator, unprotected_env, protected_env, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        protected = indexes.index_create_request(actor=operator, env=protected_env)
        unprotected = indexes.index_create_request(actor=operator, env=unprotected_env)
        check = indexes.index_check_request(actor=operator, env=protected_env)
    assert protected.status == JobStatus.AWAITING_APPROVAL
    assert unprotected.status == JobStatus.QUEUED and check.status == JobStatus.QUEUED


def test_the_check_and_creation_through_the_page(env, operator, viewer, client_for) -> None:
    sql(env, f"DROP INDEX public.{UNIT_MONTH}")
    client = client_for(operator)
    home = f"/environments/{env.key}/reconciliation/"
    response = client.post(f"{home}indexes/check/")
    check = Job.objects.get(kind="index_check")
    assert response["Location"] == f"/jobs/{check.pk}/"
    run(check)
    page = client_for(viewer).get(home).content.decode()
    assert f'data-index="{UNIT_MONTH}" data-ok="false"' in page and "does not exist" in page
    assert "Create missing or invalid indexes" not in page  # a viewer has no forms
    client.post(f"{home}indexes/create/")
    job = run(Job.objects.get(kind="index_create"))
    job_page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert f'data-index="{UNIT_MONTH}" data-action="created"' in job_page
