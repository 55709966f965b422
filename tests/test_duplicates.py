"""Duplicate precheck (runbook §1.2) and resolve (§5.1) as jobs, against real PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import connections

from audit.models import AuditEntry
from billing_ops import services
from billing_ops.environments import environment_connect
from billing_ops.models import Job, JobStatus
from reconciliation import duplicates
from tests.conftest import make_user
from tests.factories import make_invoice_line

pytestmark = [
    pytest.mark.django_db(databases="__all__", transaction=True),
    pytest.mark.usefixtures("inline_jobs"),
]

T0 = datetime(2026, 2, 8, 9, 0, tzinfo=UTC)

# Runbook §1.2, verbatim.
RUNBOOK_PRECHECK = r"""
SELECT invoice_id, unit_id, line_type,
       regexp_replace(lower(trim(description)), '\s+', ' ', 'g') AS normalized,
       COUNT(*) AS cnt,
       array_agg(id ORDER BY created_at DESC) AS ids
FROM invoice_lines
GROUP BY invoice_id, unit_id, line_type, normalized
HAVING COUNT(*) > 1;
"""


def runbook_precheck(env) -> dict[tuple[str, str, str, str], list[str]]:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(RUNBOOK_PRECHECK)
        return {(r[0], r[1], r[2], r[3]): [str(i) for i in r[5]] for r in cursor.fetchall()}


def line_ids(env) -> set[str]:
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT id::text FROM public.invoice_lines")
        return {r[0] for r in cursor.fetchall()}


@pytest.fixture
def lines(unprotected_env, clean_environments):
    """Two duplicate groups that the unique index lets through, because the stored
    normalized_description differs while the runbook's expression over description agrees;
    and lines that only look alike."""
    env = unprotected_env
    ids = {
        "a_old": make_invoice_line(
            env, description="Energy charge", normalized_description="a1", created_at=T0
        ),
        "a_mid": make_invoice_line(
            env,
            description="  energy   CHARGE ",
            normalized_description="a2",
            amount="11.50",
            created_at=T0 + timedelta(hours=1),
        ),
        "a_new": make_invoice_line(
            env,
            description="ENERGY\tcharge",
            normalized_description="a3",
            amount="12.00",
            created_at=T0 + timedelta(hours=2),
        ),
        "b_old": make_invoice_line(
            env, invoice_id="INV-2", description="Network fee", normalized_description="b1", created_at=T0
        ),
        "b_new": make_invoice_line(
            env,
            invoice_id="INV-2",
            description="network  fee",
            normalized_description="b2",
            created_at=T0 + timedelta(minutes=5),
        ),
        # Not duplicates: another unit, another description, another line type.
        "other_unit": make_invoice_line(env, unit_id="U-2", description="Energy charge", created_at=T0),
        "other_text": make_invoice_line(env, description="Energy charges", created_at=T0),
        "other_type": make_invoice_line(env, line_type="tax", description="Energy charge", created_at=T0),
    }
    return env, ids


def run(job: Job) -> Job:
    services.job_execute(job_id=job.pk, worker="test")
    return Job.objects.get(pk=job.pk)


def precheck(env, actor) -> Job:
    job = run(duplicates.duplicate_precheck_request(actor=actor, env=env))
    assert job.status == JobStatus.SUCCEEDED, job.error
    return job


def resolve(env, operator, approver, precheck_job: Job) -> Job:
    job = duplicates.duplicate_resolve_request(actor=operator, env=env, precheck_job_id=precheck_job.pk)
    assert job.status == JobStatus.AWAITING_APPROVAL  # everywhere, even unprotected
    services.job_approve(actor=approver, job_id=job.pk, digest=job.params_digest)
    return run(job)


def test_the_precheck_finds_what_the_runbooks_query_finds(lines, operator) -> None:
    env, ids = lines
    result = precheck(env, operator).result
    assert result["groups_total"] == 2 and result["rows_in_groups"] == 5 and result["rows_to_delete"] == 3
    assert result["groups_shown"] == 2 and result["groups_left_out"] == 0
    first, second = result["groups"]
    assert (first["invoice_id"], first["normalized"], first["count"]) == ("INV-1", "energy charge", 3)
    assert first["ids"] == [ids["a_new"], ids["a_mid"], ids["a_old"]] and first["keep"] == ids["a_new"]
    assert [row["amount"] for row in first["rows"]] == ["12.00", "11.50", "10.00"]  # exact, newest first
    assert first["rows"][0]["description"] == "ENERGY\tcharge"
    assert second["ids"] == [ids["b_new"], ids["b_old"]]
    found = {
        (g["invoice_id"], g["unit_id"], g["line_type"], g["normalized"]): g["ids"] for g in result["groups"]
    }
    assert found == runbook_precheck(env)


def test_the_precheck_uses_the_runbooks_expression_not_the_stored_column(lines, operator) -> None:
    env, _ids = lines
    with connections[env.alias].cursor() as cursor:  # what §4.1 (over the stored column) sees
        cursor.execute(
            "SELECT count(*) FROM (SELECT 1 FROM invoice_lines GROUP BY invoice_id, unit_id, line_type,"
            " normalized_description HAVING count(*) > 1) sub"
        )
        assert cursor.fetchone()[0] == 0  # both groups hide behind distinct stored values
    assert precheck(env, operator).result["groups_total"] == 2


def test_no_duplicates_is_zero_groups(unprotected_env, clean_environments, operator, client_for) -> None:
    make_invoice_line(unprotected_env, description="Energy charge")
    make_invoice_line(unprotected_env, description="Network fee")
    job = precheck(unprotected_env, operator)
    assert job.result["groups_total"] == 0 and job.result["groups"] == []
    page = client_for(operator).get(f"/jobs/{job.pk}/").content.decode()
    assert 'data-groups="0"' in page
    with pytest.raises(ValidationError, match="found no duplicates"):
        duplicates.duplicate_resolve_request(actor=operator, env=unprotected_env, precheck_job_id=job.pk)


def test_a_precheck_keeps_the_first_groups_and_says_how_many_were_left_out(
    lines, operator, monkeypatch
) -> None:
    env, ids = lines
    monkeypatch.setattr(duplicates, "PRECHECK_GROUPS_SHOWN", 1)
    result = precheck(env, operator).result
    assert result["groups_total"] == 2 and result["groups_shown"] == 1 and result["groups_left_out"] == 1
    assert result["rows_to_delete"] == 3 and result["rows_to_delete_shown"] == 2
    assert result["groups"][0]["keep"] == ids["a_new"]  # the most duplicated group first


def test_resolving_needs_an_approver_keeps_the_newest_and_records_what_went(
    lines, operator, approver
) -> None:
    env, ids = lines
    job = resolve(env, operator, approver, precheck(env, operator))
    assert job.status == JobStatus.SUCCEEDED, job.error
    gone = {ids["a_old"], ids["a_mid"], ids["b_old"]}
    assert line_ids(env) == set(ids.values()) - gone
    assert runbook_precheck(env) == {}
    result = job.result
    assert result["deleted"] == 3 and result["groups"] == 2 and result["clean"] is True
    assert result["after"]["groups_total"] == 0
    assert {row["id"] for row in result["deleted_rows"]} == gone
    mid = next(row for row in result["deleted_rows"] if row["id"] == ids["a_mid"])
    assert mid["description"] == "  energy   CHARGE " and mid["amount"] == "11.50"
    entry = AuditEntry.objects.get(action="invoice_lines.duplicates_deleted")
    assert entry.environment == env.key and entry.object_id == str(job.pk)
    assert {row["id"] for row in entry.outcome["deleted_rows"]} == gone
    assert entry.params["approved_by_id"] == str(approver.pk)


def test_a_resolve_cannot_run_without_an_approval(lines, operator) -> None:
    env, ids = lines
    job = duplicates.duplicate_resolve_request(
        actor=operator, env=env, precheck_job_id=precheck(env, operator).pk
    )
    Job.objects.filter(pk=job.pk).update(status=JobStatus.QUEUED)  # as if someone skipped the approval
    job = run(job)
    assert job.status == JobStatus.FAILED and "approval" in job.error
    assert line_ids(env) == set(ids.values())


def change_a_value(env, ids) -> None:
    with connections[env.alias].cursor() as cursor:
        cursor.execute("UPDATE public.invoice_lines SET amount = 99 WHERE id = %s", [ids["a_old"]])


def add_a_line(env, ids) -> None:
    make_invoice_line(env, invoice_id="INV-2", description="NETWORK FEE", created_at=T0 + timedelta(days=1))


def delete_a_line(env, ids) -> None:
    with connections[env.alias].cursor() as cursor:
        cursor.execute("DELETE FROM public.invoice_lines WHERE id = %s", [ids["a_mid"]])


def make_another_line_newest(env, ids) -> None:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "UPDATE public.invoice_lines SET created_at = %s WHERE id = %s",
            [T0 + timedelta(days=2), ids["a_old"]],
        )


@pytest.mark.parametrize("change", [change_a_value, add_a_line, delete_a_line, make_another_line_newest])
def test_a_resolve_deletes_nothing_when_the_groups_changed_since_the_precheck(
    lines, operator, approver, change
) -> None:
    env, ids = lines
    checked = precheck(env, operator)
    change(env, ids)
    before = line_ids(env)
    job = resolve(env, operator, approver, checked)
    assert job.status == JobStatus.FAILED
    assert "changed since precheck" in job.error and "Run a new duplicate precheck" in job.error
    assert line_ids(env) == before
    assert not AuditEntry.objects.filter(action="invoice_lines.duplicates_deleted").exists()


def test_a_resolve_deletes_only_the_groups_the_precheck_showed(
    lines, operator, approver, monkeypatch, client_for
) -> None:
    env, ids = lines
    monkeypatch.setattr(duplicates, "PRECHECK_GROUPS_SHOWN", 1)
    checked = precheck(env, operator)
    job = resolve(env, operator, approver, checked)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert line_ids(env) == set(ids.values()) - {ids["a_old"], ids["a_mid"]}  # group B untouched
    assert job.result["clean"] is False and job.result["after"]["groups_total"] == 1
    client = client_for(operator)
    assert "1 more were left out" in client.get(f"/jobs/{checked.pk}/").content.decode()
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert 'data-deleted="2"' in page and 'data-after-groups="1"' in page and ids["a_mid"] in page
    home = client.get(f"/environments/{env.key}/reconciliation/").content.decode()
    assert 'data-job-kind="duplicate_resolve"' in home
    assert 'name="precheck_job"' not in home  # that precheck is resolved: run a new one


def test_a_resolve_waits_only_briefly_for_a_locked_line(lines, operator, approver, monkeypatch) -> None:
    env, ids = lines
    monkeypatch.setattr(duplicates, "RESOLVE_LOCK_TIMEOUT_MS", 200)
    checked = precheck(env, operator)
    with environment_connect(env) as other:
        other.execute("SELECT 1 FROM public.invoice_lines WHERE id = %s FOR UPDATE", [ids["b_old"]])
        job = resolve(env, operator, approver, checked)
        other.rollback()
    assert job.status == JobStatus.FAILED and "locked by another session" in job.error
    assert line_ids(env) == set(ids.values())


def test_a_resolve_request_needs_a_successful_precheck_of_this_environment(
    lines, operator, protected_env
) -> None:
    env, _ids = lines
    checked = precheck(env, operator)
    with pytest.raises(ValidationError, match="no duplicate precheck"):
        duplicates.duplicate_resolve_request(actor=operator, env=protected_env, precheck_job_id=checked.pk)
    with pytest.raises(ValidationError, match="no duplicate precheck"):
        duplicates.duplicate_resolve_request(actor=operator, env=env, precheck_job_id=424242)
    failed = duplicates.duplicate_precheck_request(actor=operator, env=env)
    Job.objects.filter(pk=failed.pk).update(status=JobStatus.FAILED)
    with pytest.raises(ValidationError, match="did not succeed"):
        duplicates.duplicate_resolve_request(actor=operator, env=env, precheck_job_id=failed.pk)


def test_a_tampered_precheck_result_is_refused_at_run_time(lines, operator, approver) -> None:
    env, ids = lines
    checked = precheck(env, operator)
    job = duplicates.duplicate_resolve_request(actor=operator, env=env, precheck_job_id=checked.pk)
    services.job_approve(actor=approver, job_id=job.pk, digest=job.params_digest)
    result = checked.result
    result["groups"][0]["ids"].reverse()
    Job.objects.filter(pk=checked.pk).update(result=result)
    job = run(job)
    assert job.status == JobStatus.FAILED and "not the ones this request was approved for" in job.error
    assert line_ids(env) == set(ids.values())


def test_one_resolve_at_a_time_per_environment(lines, operator) -> None:
    env, _ids = lines
    checked = precheck(env, operator)
    first = duplicates.duplicate_resolve_request(actor=operator, env=env, precheck_job_id=checked.pk)
    with pytest.raises(ValidationError, match=f"Job #{first.pk}"):
        duplicates.duplicate_resolve_request(actor=operator, env=env, precheck_job_id=checked.pk)


# --- Through the pages -------------------------------------------------------------------------


def test_an_operator_runs_the_precheck_and_requests_the_resolve_from_the_page(
    lines, operator, approver, client_for, django_capture_on_commit_callbacks
) -> None:
    env, ids = lines
    client = client_for(operator)
    home = f"/environments/{env.key}/reconciliation/"
    assert "Run the duplicate precheck" in client.get(home).content.decode()
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post(f"{home}duplicates/precheck/")
    checked = Job.objects.get(kind="duplicate_precheck")
    assert response["Location"] == f"/jobs/{checked.pk}/"
    run(checked)
    job_page = client.get(f"/jobs/{checked.pk}/").content.decode()
    assert 'data-groups="2"' in job_page and ids["a_old"] in job_page
    page = client.get(home).content.decode()
    assert 'data-precheck-groups="2"' in page and 'name="precheck_job"' in page
    response = client.post(f"{home}duplicates/resolve/", {"precheck_job": checked.pk})
    job = Job.objects.get(kind="duplicate_resolve")
    assert response["Location"] == f"/jobs/{job.pk}/" and job.status == JobStatus.AWAITING_APPROVAL
    # The approver sees exactly the groups and lines that would go.
    approval_page = client_for(approver).get(f"/jobs/{job.pk}/").content.decode()
    assert "This deletes 3 lines" in approval_page and ids["b_old"] in approval_page
    assert f'action="/jobs/{job.pk}/approve/"' in approval_page


def test_a_viewer_sees_the_results_but_no_forms(lines, operator, viewer, client_for) -> None:
    env, _ids = lines
    precheck(env, operator)
    client = client_for(viewer)
    page = client.get(f"/environments/{env.key}/reconciliation/").content.decode()
    assert 'data-precheck-groups="2"' in page
    assert "Run the duplicate precheck" not in page and 'name="precheck_job"' not in page
    response = client.post(f"/environments/{env.key}/reconciliation/duplicates/precheck/")
    assert response.status_code == 403 and Job.objects.filter(kind="duplicate_precheck").count() == 1


def test_an_operator_cannot_approve_their_own_resolve(lines) -> None:
    env, _ids = lines
    admin = make_user("admin1", "Operator", "Approver")
    job = duplicates.duplicate_resolve_request(actor=admin, env=env, precheck_job_id=precheck(env, admin).pk)
    from django.core.exceptions import PermissionDenied

    with pytest.raises(PermissionDenied):
        services.job_approve(actor=admin, job_id=job.pk, digest=job.params_digest)


def test_the_precheck_reads_one_snapshot(lines, operator, monkeypatch) -> None:
    """A line deleted between the grouping and the reading of the values is still reported
    as it was (REPEATABLE READ), never as a group with a hole."""
    env, ids = lines
    original = duplicates.ROWS_BY_ID_SQL
    deleted = threading.Event()

    class Cursor:
        def __init__(self, inner):
            self.inner = inner

        def execute(self, query, params=None):
            if query == original and not deleted.is_set():
                with environment_connect(env, autocommit=True) as other:
                    other.execute("DELETE FROM public.invoice_lines WHERE id = %s", [ids["a_mid"]])
                deleted.set()
            return self.inner.execute(query, params)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    real = duplicates.duplicate_groups
    monkeypatch.setattr(
        duplicates, "duplicate_groups", lambda cursor, limit: real(Cursor(cursor), limit=limit)
    )
    result = duplicates.duplicate_precheck(env)
    assert deleted.is_set()
    assert [row["id"] for row in result["groups"][0]["rows"]] == [ids["a_new"], ids["a_mid"], ids["a_old"]]
