"""Post-upsert verification (runbook §4): the runbook's queries, compared with the run's counts."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from django.db import connections

from billing_ops import services
from billing_ops.contract import contract_schema_apply
from billing_ops.models import Job, JobStatus
from reconciliation import verification
from reconciliation.models import UpsertRun, UpsertRunStatus
from reconciliation.verification import upsert_verification

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

RUN = "manual-20260208-fix42"


def add_lines(env, *descriptions: str, invoice: str = "INV-00000001") -> list[str]:
    """One line per description (same invoice, unit and type), normalized as the runbook does."""
    ids = []
    with connections[env.alias].cursor() as cursor:
        for description in descriptions:
            line_id = str(uuid.uuid4())
            cursor.execute(
                "INSERT INTO public.invoice_lines (id, invoice_id, unit_id, line_type, description,"
                " normalized_description, quantity, amount) VALUES (%s, %s, 'UNIT-000001', 'ENERGY', %s,"
                r" regexp_replace(lower(trim(%s)), '\s+', ' ', 'g'), 1, 2)",
                [line_id, invoice, description, description],
            )
            ids.append(line_id)
    return ids


def add_audit(env, run_id: str, operation: str | None, record_ids: list[str]) -> None:
    """Audit rows with the runbook's columns (hashes are any text: not what §4 checks)."""
    with connections[env.alias].cursor() as cursor:
        for record_id in record_ids:
            new_data = {"run_id": run_id, "invoice_id": "INV-00000001"}
            if operation is not None:
                new_data["operation"] = operation
            cursor.execute(
                "INSERT INTO public.audit_logs (action, record_id, old_data, new_data, hash, previous_hash)"
                " VALUES ('upsert_missing_lines', %s, NULL, %s::jsonb, md5(random()::text), 'prev')",
                [record_id, json.dumps(new_data)],
            )


def make_run(
    env, run_id: str = RUN, *, inserted: int, updated: int, status=UpsertRunStatus.SUCCEEDED, dry_run=False
):
    return UpsertRun.objects.create(
        environment=env.key,
        run_id=run_id,
        dry_run=dry_run,
        status=status,
        csv_name="missing_lines.csv",
        batch_size=50_000,
        inserted=inserted,
        updated=updated,
    )


def statuses(result: dict) -> dict[str, tuple]:
    return {c["name"]: (c["status"], c["expected"], c["actual"]) for c in result["checks"]}


@pytest.fixture
def env(unprotected_env, clean_environments):
    return unprotected_env


def test_matching_counts_pass(env) -> None:
    inserted = add_lines(env, "Energy Jan", "Network Jan", "Tax Jan")
    updated = add_lines(env, "Fee Jan", "Capacity Jan")
    add_audit(env, RUN, "insert", inserted)
    add_audit(env, RUN, "update", updated)
    add_audit(env, "another-run", "insert", inserted)  # other runs are not counted
    make_run(env, inserted=3, updated=2)
    result = upsert_verification(env, RUN)
    assert result["passed"] and result["compared"] and result["message"] == "Verification passed"
    assert statuses(result) == {
        "total_lines": ("info", None, 5),
        "duplicate_groups": ("pass", 0, 0),
        "audit_insert": ("pass", 3, 3),
        "audit_update": ("pass", 2, 2),
    }
    assert result["audit_rows"] == [
        {"action": "upsert_missing_lines", "op": "insert", "run_id": RUN, "cnt": 3},
        {"action": "upsert_missing_lines", "op": "update", "run_id": RUN, "cnt": 2},
    ]


def test_a_count_that_differs_from_the_runs_report_fails(env) -> None:
    ids = add_lines(env, "a", "b", "c", "d")
    add_audit(env, RUN, "insert", ids[:3])
    add_audit(env, RUN, "update", ids[3:])
    make_run(env, inserted=3, updated=2)
    result = upsert_verification(env, RUN)
    assert not result["passed"] and result["message"] == "Verification failed: 1 check(s) failed"
    assert statuses(result)["audit_update"] == ("fail", 2, 1)
    assert statuses(result)["audit_insert"] == ("pass", 3, 3)


def test_without_a_record_of_the_run_the_counts_are_shown_with_nothing_to_compare(env) -> None:
    ids = add_lines(env, "a", "b")
    add_audit(env, "node-script-run", "insert", ids)
    result = upsert_verification(env, "node-script-run")
    assert result["passed"] and result["run"] is None and result["compared"] is False
    assert result["audit_counts"] == {"insert": 2, "update": 0}
    check = next(c for c in result["checks"] if c["name"] == "audit_insert")
    assert check["status"] == "info" and check["actual"] == 2 and "nothing to compare" in check["message"]


def test_a_dry_run_only_is_said_to_commit_nothing(env) -> None:
    make_run(env, inserted=5, updated=1, dry_run=True)
    result = upsert_verification(env, RUN)
    assert result["run"] is None and "Only dry runs" in result["checks"][2]["message"]


def test_a_failed_run_must_have_left_no_audit_rows(env) -> None:
    make_run(env, inserted=0, updated=0, status=UpsertRunStatus.FAILED)
    assert upsert_verification(env, RUN)["passed"]
    add_audit(env, RUN, "insert", add_lines(env, "leaked"))
    result = upsert_verification(env, RUN)
    assert statuses(result)["audit_insert"] == ("fail", 0, 1)


def test_a_running_run_cannot_be_verified_yet(env) -> None:
    make_run(env, inserted=0, updated=0, status=UpsertRunStatus.RUNNING)
    result = upsert_verification(env, RUN)
    assert not result["passed"] and "still running" in result["checks"][2]["message"]


def test_audit_rows_without_a_known_operation_fail(env) -> None:
    add_audit(env, RUN, None, add_lines(env, "x"))
    make_run(env, inserted=0, updated=0)
    result = upsert_verification(env, RUN)
    assert statuses(result)["audit_other"] == ("fail", 0, 1) and "None (1)" in result["checks"][-1]["message"]


def test_the_run_id_is_a_bound_parameter(env) -> None:
    tricky = "x' OR '1'='1"
    add_audit(env, RUN, "insert", add_lines(env, "a"))
    result = upsert_verification(env, tricky)
    assert result["audit_rows"] == [] and result["audit_counts"] == {"insert": 0, "update": 0}


@pytest.fixture
def without_dedup_index(env) -> Iterator[None]:
    """The unique index stops duplicates from existing at all: drop it for the test, and
    after it empty the table and rebuild the schema's indexes (before clean_environments'
    own truncate, which is harmless twice)."""
    with connections[env.alias].cursor() as cursor:
        cursor.execute("DROP INDEX public.idx_invoice_lines_dedup")
    yield
    with connections[env.alias].cursor() as cursor:
        cursor.execute("TRUNCATE public.invoice_lines")
    contract_schema_apply(env)
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'public.idx_invoice_lines_dedup'::regclass"
        )
        assert cursor.fetchone() == (True,)


def test_duplicate_groups_fail_the_verification(env, without_dedup_index) -> None:
    ids = add_lines(env, "Energy  Jan", "ENERGY jan", " energy jan", "Network Jan", "network   JAN")
    add_audit(env, RUN, "insert", ids)
    make_run(env, inserted=5, updated=0)
    result = upsert_verification(env, RUN)
    assert not result["passed"]
    assert statuses(result)["duplicate_groups"] == ("fail", 0, 2)
    assert statuses(result)["audit_insert"] == ("pass", 5, 5) and result["total_lines"] == 5


def test_the_queries_are_the_runbooks() -> None:
    # As printed in billing-reconciliation-runbook.md §4.1 and §4.2 (the run id there a literal).
    runbook_42 = """SELECT action,
       (new_data->>'operation') AS op,
       (new_data->>'run_id') AS run_id,
       COUNT(*) AS cnt
FROM audit_logs
WHERE action = 'upsert_missing_lines'
  AND new_data->>'run_id' = 'manual-20260208-fix42'
GROUP BY 1, 2, 3;"""
    runbook_41 = """SELECT COUNT(*) AS total_lines FROM invoice_lines;

-- Verify no new duplicates were introduced
SELECT COUNT(*) FROM (
  SELECT invoice_id, unit_id, line_type,
         normalized_description
  FROM invoice_lines
  GROUP BY 1, 2, 3, 4
  HAVING COUNT(*) > 1
) sub;"""
    assert verification.RUNBOOK_AUDIT_TRAIL_SQL.replace("%s", "'manual-20260208-fix42'") == runbook_42
    assert runbook_41 == (
        verification.RUNBOOK_TOTAL_LINES_SQL
        + "\n\n-- Verify no new duplicates were introduced\n"
        + verification.RUNBOOK_DUPLICATE_GROUPS_SQL
    )


@pytest.mark.usefixtures("inline_jobs")
def test_an_operator_verifies_a_run_and_a_viewer_reads_the_result(env, client_for, operator, viewer) -> None:
    ids = add_lines(env, "a", "b")
    add_audit(env, RUN, "insert", ids)
    run = make_run(env, inserted=2, updated=0)
    client = client_for(operator)
    home = client.get(f"/environments/{env.key}/reconciliation/?run_id={RUN}").content.decode()
    assert f'<option value="{RUN}">' in home and f'value="{RUN}"' in home
    response = client.post(f"/environments/{env.key}/reconciliation/verify/", {"run_id": f"  {RUN} "})
    job = Job.objects.get()
    assert response["Location"] == f"/jobs/{job.pk}/" and job.params == {"run_id": RUN}
    assert services.job_execute(job_id=job.pk, worker="test") == JobStatus.SUCCEEDED
    job.refresh_from_db()
    assert job.result["passed"] and job.result["run"]["id"] == run.pk
    assert any(line.message == "Verification passed" for line in job.log_lines.all())
    page = client_for(viewer).get(f"/jobs/{job.pk}/").content.decode()
    assert 'data-passed="yes"' in page and 'data-check="audit_insert" data-status="pass"' in page
    assert "upsert_missing_lines | insert | manual-20260208-fix42 | 2" in page
    home = client_for(viewer).get(f"/environments/{env.key}/reconciliation/").content.decode()
    assert "Verification passed" in home and "Verify this run" not in home
    assert client.post(f"/environments/{env.key}/reconciliation/verify/", {"run_id": "  "}).status_code == 302
    assert Job.objects.count() == 1
