"""Rolling back an upsert run (runbook §6.2): preview, four-eyes approval tied to the
preview, one transaction, conflicts skipped, its own chained audit rows, notifications."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core import mail
from django.core.exceptions import PermissionDenied, ValidationError
from django.urls import reverse

from audit.models import AuditEntry
from audit.selectors import dashboard_chain_verify
from billing_ops.environments import Environment, environment_connect
from billing_ops.models import Job, JobStatus, Notification, NotificationChannel, NotificationStatus
from billing_ops.notifications import notifications_deliver_due
from billing_ops.services import job_approve, job_execute, job_refuse
from reconciliation.models import RollbackStatus, RunRollback
from reconciliation.rollback import RollbackRefused, rollback_preview, rollback_request, rollback_run
from tests.conftest import make_user
from tests.test_notifications import make_due
from tests.test_upsert import (
    RUNBOOK_4_1_DUPLICATES,
    Recorder,
    assert_chain_intact,
    existing_line,
    query,
    request_upsert,
    run,
    write_csv,
)

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

ROLLBACK_ROWS = """
SELECT new_data ->> 'operation', record_id, old_data, new_data FROM audit_logs
 WHERE action = 'rollback_missing_lines' AND new_data ->> 'run_id' = %s ORDER BY created_at
"""


@pytest.fixture
def env(unprotected_env: Environment, clean_environments: None) -> Environment:
    return unprotected_env


@pytest.fixture
def people(db: None) -> dict[str, Any]:
    return {"operator": make_user("op", "Operator"), "approver": make_user("ap", "Approver")}


def line(env: Environment, line_id: str) -> tuple[Any, ...] | None:
    rows = query(
        env,
        "SELECT description, quantity::text, amount::text FROM invoice_lines WHERE id = %s",
        [line_id],
    )
    return rows[0] if rows else None


def line_id(env: Environment, invoice: str, line_type: str) -> str:
    return query(
        env,
        "SELECT id::text FROM invoice_lines WHERE invoice_id = %s AND line_type = %s",
        [invoice, line_type],
    )[0][0]


def requested(env: Environment, people: dict[str, Any], run_id: str, reason: str = "wrong file") -> Job:
    preview = rollback_preview(env, run_id)
    return rollback_request(
        actor=people["operator"], env=env, run_id=run_id, digest=preview.digest, reason=reason
    )


def approve_and_run(job: Job, approver: Any) -> Job:
    job_approve(actor=approver, job_id=job.pk, digest=job.params_digest)
    job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    return job


@pytest.fixture
def upserted(env: Environment, tmp_path: Path) -> dict[str, str]:
    """Two existing lines A and B, then run fix-1: updates A and B, inserts C and D."""
    a = existing_line(env, "INV-A", "U-1", "ENERGY", "Energy Jan", "10", "5.00")
    b = existing_line(env, "INV-B", "U-1", "ENERGY", "Energy Feb", "20", "6.00")
    path = write_csv(
        tmp_path,
        "INV-A,U-1,ENERGY,energy  JAN,11,5.50\n"
        "INV-B,U-1,ENERGY,Energy Feb,21,6.60\n"
        "INV-C,U-2,FEE,Meter fee,1,3.00\n"
        "INV-D,U-2,FEE,Meter fee,1,4.00\n",
    )
    outcome = run(env, path, run_id="fix-1")
    assert (outcome.inserted, outcome.updated) == (2, 2)
    return {"a": a, "b": b, "c": line_id(env, "INV-C", "FEE"), "d": line_id(env, "INV-D", "FEE")}


def test_the_preview_says_per_line_what_happens_and_lists_conflicts(env, upserted) -> None:
    query(env, "UPDATE invoice_lines SET amount = 7.77 WHERE id = %s", [upserted["b"]])  # someone else
    query(env, "DELETE FROM invoice_lines WHERE id = %s", [upserted["d"]])

    preview = rollback_preview(env, "fix-1")

    assert preview.counts() == {"delete": 1, "restore": 1, "skip": 2}
    assert preview.conflicts_by_kind == {"changed_since": 1, "deleted_since": 1}
    by_id = {entry["record_id"]: entry for entry in preview.lines}
    assert by_id[upserted["c"]]["action"] == "delete"
    assert by_id[upserted["a"]]["action"] == "restore"
    assert by_id[upserted["a"]]["restore_to"]["description"] == "Energy Jan"
    assert by_id[upserted["a"]]["now"]["description"] == "energy  JAN"
    assert (by_id[upserted["b"]]["action"], by_id[upserted["b"]]["conflict"]) == ("skip", "changed_since")
    assert (by_id[upserted["d"]]["action"], by_id[upserted["d"]]["now"]) == ("skip", None)
    assert preview.lines[0]["action"] == "skip"  # conflicts first
    # The digest follows the data.
    query(env, "UPDATE invoice_lines SET amount = 7.78 WHERE id = %s", [upserted["b"]])
    assert rollback_preview(env, "fix-1").digest != preview.digest


def test_a_rollback_deletes_inserts_restores_updates_and_skips_conflicts(
    env, upserted, people, inline_jobs, settings, receiver
) -> None:
    settings.OPS_WEBHOOK_URL = receiver.url
    settings.STAKEHOLDER_EMAILS = ["finance@example.com"]
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    query(env, "UPDATE invoice_lines SET amount = 7.77 WHERE id = %s", [upserted["b"]])  # a later change
    job = requested(env, people, "fix-1", reason="the CSV was for the wrong month")
    assert job.status == JobStatus.AWAITING_APPROVAL  # everywhere, not only in protected environments
    assert job.log_lines.filter(message__contains="always needs one").exists()

    job = approve_and_run(job, people["approver"])

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert (job.result["deleted"], job.result["restored"], job.result["skipped"]) == (2, 1, 1)
    assert line(env, upserted["c"]) is None and line(env, upserted["d"]) is None
    assert line(env, upserted["a"]) == ("Energy Jan", "10.000000", "5.00")
    assert line(env, upserted["b"]) == ("Energy Feb", "21.000000", "7.77")  # not overwritten
    assert [c["record_id"] for c in job.result["conflicts"]] == [upserted["b"]]
    normalized = query(env, "SELECT normalized_description FROM invoice_lines WHERE id = %s", [upserted["a"]])
    assert normalized == [("energy jan",)]

    rows = query(env, ROLLBACK_ROWS, ["fix-1"])
    assert sorted((op, record) for op, record, _old, _new in rows) == sorted(
        [("delete", upserted["c"]), ("delete", upserted["d"]), ("restore", upserted["a"])]
    )
    restore = next(r for r in rows if r[0] == "restore")
    assert restore[2]["description"] == "energy  JAN" and restore[3]["description"] == "Energy Jan"
    assert restore[3]["rollback_job"] == str(job.pk) and restore[3]["hash_scheme"] == "billing-ops/2"
    # A delete's new_data carries no line values (they are NULL in its row: left out).
    deletes = [new for op, _record, _old, new in rows if op == "delete"]
    tags = {
        "operation": "delete",
        "run_id": "fix-1",
        "rollback_job": str(job.pk),
        "hash_scheme": "billing-ops/2",
    }
    assert deletes == [tags, tags]
    assert query(env, RUNBOOK_4_1_DUPLICATES) == [(0,)]
    assert_chain_intact(env)

    rollback = RunRollback.objects.get(job=job)
    assert (rollback.status, rollback.deleted, rollback.restored, rollback.skipped) == (
        RollbackStatus.SUCCEEDED,
        2,
        1,
        1,
    )
    entry = AuditEntry.objects.get(action="upsert.rolled_back")
    assert entry.params["reason"] == "the CSV was for the wrong month"
    assert (entry.params["requested_by"], entry.params["approved_by"]) == ("op", "ap")
    assert entry.outcome["deleted"] == "2"
    assert dashboard_chain_verify().intact

    notifications_deliver_due()
    assert [r["json"]["text"] for r in receiver.requests] == [
        "🔴 Rollback executed for run fix-1. Reason: the CSV was for the wrong month"
    ]
    (email,) = mail.outbox
    assert email.to == ["finance@example.com"]
    assert email.body.startswith("Billing reconciliation rolled back.")
    assert "Inserted lines deleted: 2" in email.body and "restored to their previous values: 1" in email.body


def test_a_run_is_rolled_back_once(env, upserted, people, inline_jobs) -> None:
    job = requested(env, people, "fix-1")
    with pytest.raises(ValidationError, match="already has a rollback"):
        requested(env, people, "fix-1")  # while the first waits
    approve_and_run(job, people["approver"])
    with pytest.raises(ValidationError, match="already has a rollback"):
        requested(env, people, "fix-1")
    # Even without the dashboard's record, the environment's audit rows refuse a second run.
    with environment_connect(env) as conn, pytest.raises(RollbackRefused, match="already rolled back"):
        rollback_run(
            conn, run_id="fix-1", approved_digest=job.params["preview_digest"], job_id=0, report=Recorder()
        )


def test_nobody_approves_their_own_rollback(env, upserted, people, inline_jobs) -> None:
    both = make_user("both", "Operator", "Approver")
    preview = rollback_preview(env, "fix-1")
    job = rollback_request(actor=both, env=env, run_id="fix-1", digest=preview.digest, reason="r")
    with pytest.raises(PermissionDenied):
        job_approve(actor=both, job_id=job.pk, digest=job.params_digest)
    with pytest.raises(PermissionDenied):
        rollback_request(
            actor=make_user("v", "Viewer"), env=env, run_id="fix-1", digest=preview.digest, reason="r"
        )


def test_an_approval_is_refused_when_the_data_changed_since_the_preview(
    env, upserted, people, inline_jobs
) -> None:
    stale = rollback_preview(env, "fix-1").digest
    query(env, "UPDATE invoice_lines SET amount = 1 WHERE id = %s", [upserted["c"]])
    with pytest.raises(ValidationError, match="changed since your preview"):
        rollback_request(actor=people["operator"], env=env, run_id="fix-1", digest=stale, reason="r")

    job = requested(env, people, "fix-1")
    query(env, "UPDATE invoice_lines SET amount = 2 WHERE id = %s", [upserted["c"]])
    with pytest.raises(ValidationError, match="changed since this rollback was previewed"):
        job_approve(actor=people["approver"], job_id=job.pk, digest=job.params_digest)
    job.refresh_from_db()
    assert job.status == JobStatus.AWAITING_APPROVAL
    job_refuse(actor=people["approver"], job_id=job.pk, comment="preview again")
    assert RunRollback.objects.get(job=job).status == RollbackStatus.FAILED  # the run is free again
    requested(env, people, "fix-1")


def test_data_changed_after_approval_stops_the_run_and_changes_nothing(
    env, upserted, people, inline_jobs
) -> None:
    job = requested(env, people, "fix-1")
    job_approve(actor=people["approver"], job_id=job.pk, digest=job.params_digest)
    query(env, "UPDATE invoice_lines SET amount = 9 WHERE id = %s", [upserted["a"]])
    before = query(env, "SELECT id, description, quantity, amount FROM invoice_lines ORDER BY id")

    job_execute(job_id=job.pk, worker="test")

    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert "changed since the approved preview" in job.error and "nothing was changed" in job.error
    assert query(env, "SELECT id, description, quantity, amount FROM invoice_lines ORDER BY id") == before
    assert query(env, ROLLBACK_ROWS, ["fix-1"]) == []
    assert RunRollback.objects.get(job=job).status == RollbackStatus.FAILED


def test_a_failure_while_writing_the_audit_rows_commits_nothing(env, upserted, people, inline_jobs) -> None:
    before = query(env, "SELECT id, description, quantity, amount FROM invoice_lines ORDER BY id")
    query(
        env,
        """
        CREATE FUNCTION refuse_rollback_rows() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.action = 'rollback_missing_lines' THEN RAISE EXCEPTION 'audit storage failed'; END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_rollback_rows BEFORE INSERT ON audit_logs
           FOR EACH ROW EXECUTE FUNCTION refuse_rollback_rows();
        """,
    )
    try:
        job = approve_and_run(requested(env, people, "fix-1"), people["approver"])
    finally:
        query(env, "DROP TRIGGER refuse_rollback_rows ON audit_logs; DROP FUNCTION refuse_rollback_rows()")
    assert job.status == JobStatus.FAILED and "audit storage failed" in job.error
    assert query(env, "SELECT id, description, quantity, amount FROM invoice_lines ORDER BY id") == before
    assert Notification.objects.count() == 0


def _script_row(env: Environment, record_id: str, new: dict[str, str], old: dict[str, str] | None) -> None:
    """An audit row as the old batch_upsert.js writes it: its own hash formula (unknown to
    us), linked to the chain's head."""
    import json

    query(
        env,
        """
        INSERT INTO audit_logs (action, record_id, old_data, new_data, hash, previous_hash, created_at)
        SELECT 'upsert_missing_lines', %s, %s::jsonb, %s::jsonb, md5(random()::text),
               (SELECT hash FROM audit_logs ORDER BY created_at DESC, id DESC LIMIT 1), clock_timestamp()
        """,
        [record_id, json.dumps(old) if old else None, json.dumps(new)],
    )


def test_a_run_that_inserted_then_updated_a_line_is_undone_to_no_line(env, people, inline_jobs) -> None:
    # The old script could insert a line in one batch and update it in another.
    inserted = existing_line(env, "INV-S", "U-3", "FEE", "fee", "1", "1.00")
    values = {"invoice_id": "INV-S", "unit_id": "U-3", "line_type": "FEE", "description": "fee"}
    _script_row(
        env,
        inserted,
        {**values, "quantity": "1", "amount": "1.00", "run_id": "js-7", "operation": "insert"},
        None,
    )
    query(env, "UPDATE invoice_lines SET amount = 2.5 WHERE id = %s", [inserted])
    _script_row(
        env,
        inserted,
        {**values, "quantity": "1", "amount": "2.5", "run_id": "js-7", "operation": "update"},
        {**values, "quantity": "1", "amount": "1.00"},
    )
    kept = existing_line(env, "INV-S", "U-3", "TAX", "tax", "1", "1.00")  # untouched by the run

    preview = rollback_preview(env, "js-7")
    assert preview.counts() == {"delete": 1, "restore": 0, "skip": 0}
    assert preview.lines[0]["operations"] == 2

    job = approve_and_run(requested(env, people, "js-7"), people["approver"])

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert line(env, inserted) is None and line(env, kept) is not None
    assert_chain_intact(env)  # the script's rows for linkage, ours recomputed too


def test_the_pages_preview_request_approve_and_show_the_rollback(
    env, people, inline_jobs, client_for, tmp_path
) -> None:
    path = write_csv(tmp_path, "INV-P,U-1,FEE,page fee,1,1\n")
    upsert = request_upsert(people["operator"], env, path, "fix-2")
    job_execute(job_id=upsert.pk, worker="test")
    inserted = line_id(env, "INV-P", "FEE")
    operator = client_for(people["operator"])
    runs = operator.get(reverse("upsert_runs", args=[env.key]))
    assert b"roll back" in runs.content

    url = reverse("rollback_preview", args=[env.key]) + "?run_id=fix-2"
    viewer_page = client_for(make_user("v", "Viewer")).get(url)
    assert viewer_page.status_code == 200
    assert b"Request the rollback" not in viewer_page.content and inserted.encode() in viewer_page.content

    for outsider in (make_user("v2", "Viewer"), make_user("a2", "Approver")):
        refused = client_for(outsider).post(
            reverse("rollback_preview", args=[env.key]),
            {"run_id": "fix-2", "digest": "0" * 64, "reason": "r"},
        )
        assert refused.status_code == 403
    page = operator.get(url)
    assert b"Request the rollback" in page.content
    digest = page.context["preview"].digest
    jobs_before = Job.objects.count()
    missing_reason = operator.post(
        reverse("rollback_preview", args=[env.key]), {"run_id": "fix-2", "digest": digest, "reason": ""}
    )
    assert missing_reason.status_code == 200 and Job.objects.count() == jobs_before
    response = operator.post(
        reverse("rollback_preview", args=[env.key]),
        {"run_id": "fix-2", "digest": digest, "reason": "wrong file"},
    )
    job = Job.objects.get(kind="upsert_rollback")
    assert response.status_code == 302 and response.url == reverse("job_detail", args=[job.pk])

    approver = client_for(people["approver"])
    detail = approver.get(reverse("job_detail", args=[job.pk]))
    assert b"still exactly the one requested" in detail.content and b"wrong file" in detail.content
    approver.post(reverse("job_approve", args=[job.pk]), {"digest": job.params_digest})
    job_execute(job_id=job.pk, worker="test")

    runs = operator.get(reverse("upsert_runs", args=[env.key]))
    assert b"rolled back" in runs.content and line(env, inserted) is None
    result = operator.get(reverse("job_detail", args=[job.pk]))
    assert b"inserted lines deleted" in result.content
    for bad in ("x'; DROP TABLE invoice_lines; --", "../../etc/passwd"):
        assert operator.get(reverse("rollback_preview", args=[env.key]), {"run_id": bad}).status_code == 200


def test_a_failed_ops_notification_is_retried(env, upserted, people, inline_jobs, settings, receiver) -> None:
    settings.OPS_WEBHOOK_URL = receiver.url
    settings.STAKEHOLDER_EMAILS = []
    receiver.statuses = [500]
    approve_and_run(requested(env, people, "fix-1"), people["approver"])

    notifications_deliver_due()
    (row,) = Notification.objects.filter(channel=NotificationChannel.WEBHOOK)
    assert (row.status, row.attempts) == (NotificationStatus.PENDING, 1) and "500" in row.last_error
    make_due(row)
    notifications_deliver_due()
    row.refresh_from_db()
    assert row.status == NotificationStatus.SENT
    assert len(receiver.requests) == 2 and receiver.requests[1]["json"]["text"].startswith(
        "🔴 Rollback executed"
    )


def test_a_line_locked_by_another_session_stops_the_rollback_and_changes_nothing(
    env, upserted, people, inline_jobs, monkeypatch
) -> None:
    from reconciliation import rollback

    monkeypatch.setattr(rollback, "LOCK_TIMEOUT_MS", 200)
    job = requested(env, people, "fix-1")
    job_approve(actor=people["approver"], job_id=job.pk, digest=job.params_digest)
    before = query(env, "SELECT id, description, quantity, amount FROM invoice_lines ORDER BY id")
    with environment_connect(env) as holder:
        holder.execute("SELECT 1 FROM invoice_lines WHERE id = %s FOR UPDATE", [upserted["c"]])
        job_execute(job_id=job.pk, worker="test")
        holder.rollback()

    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert "locked by another session (waited 200 ms); nothing was changed" in job.error
    assert query(env, "SELECT id, description, quantity, amount FROM invoice_lines ORDER BY id") == before
    assert query(env, ROLLBACK_ROWS, ["fix-1"]) == []
    assert RunRollback.objects.get(job=job).status == RollbackStatus.FAILED
