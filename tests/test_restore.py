"""Full restore from a backup (runbook §6.1): real pg_dump backups restored with real
pg_restore into the environment's test database, approvals, the rule, failures that change
nothing, the row-count verification, the audit entry and the stakeholder notices (a local
HTTP receiver and Django's locmem mail backend)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core import mail
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connections

from audit.models import AuditEntry
from audit.selectors import dashboard_chain_verify
from billing_ops import services
from billing_ops.environments import Environment, environment_connect
from billing_ops.models import Job, JobStatus, Notification
from billing_ops.notifications import notifications_deliver_due
from reconciliation import backups, restore
from tests.conftest import Receiver, make_user, wait_for

pytestmark = [
    pytest.mark.django_db(databases="__all__", transaction=True),
    pytest.mark.usefixtures("inline_jobs"),
]

REASON = "Upsert manual-20260208-fix42 wrote lines for the wrong month"
TABLES = ("billing.billings", "lock.locks", "public.invoice_lines", "public.audit_logs")


# --- Helpers ---------------------------------------------------------------------------------


@pytest.fixture
def approver2(db: None) -> User:
    return make_user("approver2", "Approver")


@pytest.fixture
def stakeholders(settings, receiver) -> Receiver:
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.STAKEHOLDER_EMAILS = ["po@example.com", "finance@example.com"]
    settings.OPS_WEBHOOK_URL = receiver.url
    return receiver


def seed(env: Environment) -> None:
    """A little of every contract table."""
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "INSERT INTO billing.billings (id, billing_number, status)"
            " SELECT g, 'BILLING' || g, 'COMPLETED' FROM generate_series(1, 3) g"
        )
        cursor.execute(
            "INSERT INTO lock.locks (id, lock_key, entity_type, entity_id, billing_id)"
            " SELECT 'L' || g, 'customers' || g, 'customers', g::text, 1 + g % 3 FROM generate_series(1, 9) g"
        )
        cursor.execute(
            "INSERT INTO public.invoice_lines"
            " (invoice_id, unit_id, line_type, description, normalized_description, quantity, amount)"
            " SELECT 'INV-' || lpad(g::text, 8, '0'), 'UNIT-000001', 'ENERGY', 'Energy', 'energy', g, g * 1.5"
            " FROM generate_series(1, 20) g"
        )
        cursor.execute(
            "INSERT INTO public.audit_logs (action, record_id, new_data, hash, previous_hash)"
            " SELECT 'upsert_missing_lines', g::text, jsonb_build_object('run_id', 'r1'), md5(g::text),"
            " md5((g - 1)::text) FROM generate_series(1, 4) g"
        )


def change_after_backup(env: Environment) -> None:
    """What happened after the backup and the restore is to undo: lines deleted, one
    changed, new ones, a run's locks released, an audit row appended."""
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "DELETE FROM public.invoice_lines WHERE invoice_id IN ('INV-00000001', 'INV-00000002')"
        )
        cursor.execute("UPDATE public.invoice_lines SET amount = 999.99 WHERE invoice_id = 'INV-00000005'")
        cursor.execute(
            "INSERT INTO public.invoice_lines"
            " (invoice_id, unit_id, line_type, description, normalized_description)"
            " SELECT 'NEW-' || g, 'UNIT-000002', 'FEE', 'Fee', 'fee' FROM generate_series(1, 4) g"
        )
        cursor.execute("DELETE FROM lock.locks WHERE billing_id = 2")
        cursor.execute(
            "INSERT INTO public.audit_logs (action, record_id, hash, previous_hash)"
            " VALUES ('later', 'x', 'h', 'p')"
        )


def counts(env: Environment) -> dict[str, int]:
    with connections[env.alias].cursor() as cursor:
        found = {}
        for table in TABLES:
            cursor.execute(f"SELECT count(*) FROM {table}")
            found[table] = cursor.fetchone()[0]
    return found


def fingerprint(env: Environment) -> dict[str, str]:
    """Every row of every contract table, as one digest per table."""
    with connections[env.alias].cursor() as cursor:
        found = {}
        for table in TABLES:
            cursor.execute(
                f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} t"
            )
            found[table] = cursor.fetchone()[0]
    return found


def amount_of(env: Environment, invoice_id: str) -> Any:
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT amount FROM public.invoice_lines WHERE invoice_id = %s", [invoice_id])
        row = cursor.fetchone()
    return row[0] if row else None


def take_backup(env: Environment) -> str:
    operator = User.objects.filter(username="backup-operator").first() or make_user(
        "backup-operator", "Operator"
    )
    job = backups.backup_request(actor=operator, env=env)
    services.job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED, job.error
    return str(job.result["file"])


def manifest_path(env: Environment, name: str) -> Path:
    return backups.backup_path(env, name).with_name(name + backups.MANIFEST_SUFFIX)


def manifest_rewrite(env: Environment, name: str, **changes: Any) -> None:
    path = manifest_path(env, name)
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def make_verified_backup(env: Environment, stamp: str = "20260208_140000") -> str:
    """A file with a manifest as the backup job writes it (not a real archive): enough for
    requests and pages, never for running a restore."""
    folder = Path(settings.BACKUP_DIR) / env.key
    folder.mkdir(parents=True, exist_ok=True)
    name = f"backup_{env.key}_{stamp}.dump"
    data = b"PGDMP" + b"x" * 2043
    (folder / name).write_bytes(data)
    manifest = {
        "file": name,
        "verified": True,
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "created_at": "2026-02-08T14:00:00+00:00",
        "row_counts": {
            "billing.billings": 3,
            "lock.locks": 9,
            "public.invoice_lines": 20,
            "public.audit_logs": 4,
        },
        "job_id": None,
    }
    (folder / (name + backups.MANIFEST_SUFFIX)).write_text(json.dumps(manifest))
    return name


def request_restore(actor: User, env: Environment, name: str, *, confirmation: str | None = None) -> Job:
    return restore.restore_request(
        actor=actor,
        env=env,
        backup_name=name,
        confirmation=env.label if confirmation is None else confirmation,
        reason=REASON,
    )


def approve_and_run(job: Job, approver: User) -> Job:
    services.job_approve(actor=approver, job_id=job.pk, digest=job.params_digest)
    services.job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    return job


def environment_allowing_restore(settings, env: Environment, allow: bool) -> Environment:
    changed = dataclasses.replace(env, allow_restore=allow)
    settings.ENVIRONMENTS = {**settings.ENVIRONMENTS, env.key: changed}
    return changed


# --- The restore ------------------------------------------------------------------------------


def test_a_restore_brings_back_exactly_the_backed_up_rows(
    unprotected_env, approver, approver2, stakeholders, clean_environments, client_for
) -> None:
    env = unprotected_env
    seed(env)
    at_backup, rows_at_backup = counts(env), fingerprint(env)
    name = take_backup(env)
    change_after_backup(env)
    before = counts(env)
    assert before != at_backup and amount_of(env, "INV-00000005") == Decimal("999.99")

    job = request_restore(approver, env, name)
    assert job.status == JobStatus.AWAITING_APPROVAL  # an unprotected environment too
    job = approve_and_run(job, approver2)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert (
        counts(env)
        == at_backup
        == {
            "billing.billings": 3,
            "lock.locks": 9,
            "public.invoice_lines": 20,
            "public.audit_logs": 4,
        }
    )
    assert fingerprint(env) == rows_at_backup  # every row, every value
    assert str(amount_of(env, "INV-00000005")) == "7.50"
    assert amount_of(env, "INV-00000001") is not None and amount_of(env, "NEW-1") is None
    result = job.result
    assert result["status"] == "verified" and result["verified"] is True and result["mismatches"] == []
    assert result["counts_source"] == "manifest"
    assert result["counts_before"] == before and result["counts_after"] == at_backup
    assert result["counts_expected"] == at_backup
    assert [(r["table"], r["before"], r["after"], r["match"]) for r in result["tables"]] == [
        (t, before[t], at_backup[t], True) for t in TABLES
    ]

    # Recorded in the dashboard's audit trail, which still verifies.
    entry = AuditEntry.objects.get(action="database.restored")
    assert entry.environment == env.key and entry.object_id == str(job.pk)
    assert entry.params["backup"] == name and entry.params["reason"] == REASON
    assert (entry.params["requested_by"], entry.params["approved_by"]) == ("approver1", "approver2")
    assert entry.outcome["status"] == "verified"
    assert entry.outcome["counts_after"]["public.invoice_lines"] == "20"
    assert entry.outcome["counts_before"]["public.invoice_lines"] == str(before["public.invoice_lines"])
    assert dashboard_chain_verify().intact

    # Told: the ops channel and both stakeholders, in the outbox, then delivered.
    ops_text = f"🔴 Restore executed for {env.label} from backup {name}. Reason: {REASON}"
    rows = list(Notification.objects.order_by("pk"))
    assert [(n.channel, n.recipient) for n in rows] == [
        ("email", "po@example.com"),
        ("email", "finance@example.com"),
        ("webhook", stakeholders.url),
    ]
    assert rows[2].payload == {"text": ops_text} and {n.source for n in rows} == {f"job:{job.pk}"}
    assert sorted(notifications_deliver_due().sent) == [n.pk for n in rows]
    assert [r["json"] for r in stakeholders.requests] == [{"text": ops_text}]
    assert sorted(m.to[0] for m in mail.outbox) == ["finance@example.com", "po@example.com"]
    message = mail.outbox[0]
    assert message.subject == f"Billing reconciliation: {env.label} restored from backup {name}"
    assert f"Reason: {REASON}" in message.body
    assert f"  public.invoice_lines: {before['public.invoice_lines']} / 20 / 20" in message.body
    assert "  lock.locks: 6 / 9 / 9" in message.body
    assert "Verified: every contract table has the backup's row count." in message.body

    page = client_for(approver).get(f"/jobs/{job.pk}/").content.decode()
    assert 'data-restore-status="verified"' in page and 'data-table="public.invoice_lines"' in page


def test_a_failing_restore_changes_nothing(
    unprotected_env, approver, approver2, stakeholders, clean_environments
) -> None:
    """pg_restore fails mid-way: after dropping indexes and constraints, the DROP of
    invoice_lines meets a view created since the backup. One transaction: all rolled back."""
    env = unprotected_env
    seed(env)
    name = take_backup(env)
    change_after_backup(env)
    with connections[env.alias].cursor() as cursor:
        cursor.execute("CREATE SCHEMA reporting")
        cursor.execute("CREATE VIEW reporting.line_ids AS SELECT id FROM public.invoice_lines")
    try:
        before, rows_before = counts(env), fingerprint(env)
        job = approve_and_run(request_restore(approver, env, name), approver2)
        assert job.status == JobStatus.FAILED
        assert job.error.startswith(
            "RestoreError: pg_restore failed (exit 1); its single transaction was rolled back"
        )
        assert "cannot drop table public.invoice_lines because other objects depend on it" in job.error
        assert counts(env) == before and fingerprint(env) == rows_before
        assert amount_of(env, "INV-00000005") == Decimal("999.99")
        with connections[env.alias].cursor() as cursor:  # indexes dropped before the failure are back
            cursor.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'invoice_lines'")
            assert cursor.fetchone()[0] == 3
    finally:
        with connections[env.alias].cursor() as cursor:
            cursor.execute("DROP SCHEMA IF EXISTS reporting CASCADE")
    assert job.result["status"] == "rolled_back" and job.result["unchanged"] is True
    assert job.result["counts_after"] == before
    entry = AuditEntry.objects.get(action="database.restore_failed")
    assert entry.outcome["status"] == "rolled_back" and "cannot drop table" in entry.outcome["error"]
    assert not AuditEntry.objects.filter(action="database.restored").exists()
    assert dashboard_chain_verify().intact
    webhook = Notification.objects.get(channel="webhook")
    assert webhook.payload == {
        "text": f"⚠️ Restore of {env.label} from backup {name} failed and was rolled back. Reason: {REASON}"
    }
    assert Notification.objects.filter(channel="email").first().subject == (
        f"Billing reconciliation: restore of {env.label} from backup {name} failed, nothing restored"
    )


def test_a_damaged_archive_that_still_lists_fails_in_its_data_and_changes_nothing(
    unprotected_env, approver, approver2, stakeholders, clean_environments
) -> None:
    """The archive's table of contents is at its start: cut off its end and pg_restore
    --list still reads it. (The manifest is rewritten to match, as for a file damaged before
    it was verified.) The restore fails while loading rows, after dropping and recreating
    the tables; nothing of it stays."""
    env = unprotected_env
    seed(env)
    name = take_backup(env)
    change_after_backup(env)
    path = backups.backup_path(env, name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    damaged = path.read_bytes()
    pg_restore = str(
        # The newest one: it reads what any of them wrote (the backup used one as new as the server).
        Path(max(backups.pg_dump_candidates(), key=lambda tool: tool.major).path).with_name("pg_restore")
    )
    subprocess.run([pg_restore, "--list", str(path)], check=True, capture_output=True)
    manifest_rewrite(env, name, size_bytes=len(damaged), sha256=hashlib.sha256(damaged).hexdigest())
    before, rows_before = counts(env), fingerprint(env)

    job = approve_and_run(request_restore(approver, env, name), approver2)

    assert job.status == JobStatus.FAILED
    assert "pg_restore failed (exit 1)" in job.error and "nothing was restored" in job.error
    assert counts(env) == before and fingerprint(env) == rows_before
    assert job.result["status"] == "rolled_back" and job.result["unchanged"] is True


def test_a_file_changed_after_the_approval_is_refused_before_anything_runs(
    unprotected_env, approver, approver2, stakeholders, clean_environments
) -> None:
    env = unprotected_env
    seed(env)
    name = take_backup(env)
    change_after_backup(env)
    job = request_restore(approver, env, name)
    path = backups.backup_path(env, name)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size: the listing still calls it verified; the sha256 differs
    path.write_bytes(bytes(data))
    before = fingerprint(env)

    job = approve_and_run(job, approver2)

    assert job.status == JobStatus.FAILED
    assert f"{name} is not the file that was approved" in job.error and "Nothing was changed." in job.error
    assert fingerprint(env) == before
    assert not Notification.objects.exists()
    assert not AuditEntry.objects.filter(action__startswith="database.").exists()


def test_a_session_holding_a_lock_makes_the_restore_fail_naming_it(
    unprotected_env, approver, approver2, stakeholders, clean_environments, monkeypatch
) -> None:
    """The archive sets lock_timeout = 0; the watcher cancels a restore that waits for a
    lock longer than RESTORE_LOCK_WAIT_TIMEOUT_MS and names who held it."""
    monkeypatch.setattr(restore, "RESTORE_LOCK_WAIT_TIMEOUT_MS", 1_000)
    env = unprotected_env
    seed(env)
    name = take_backup(env)
    change_after_backup(env)
    before = fingerprint(env)
    job = request_restore(approver, env, name)
    services.job_approve(actor=approver2, job_id=job.pk, digest=job.params_digest)
    holder = environment_connect(env, autocommit=True, application_name="phoenix-billing-app")
    holder.execute("BEGIN")
    holder.execute("SELECT count(*) FROM lock.locks")  # idle in transaction, holding ACCESS SHARE
    holder_pid = holder.info.backend_pid
    try:
        services.job_execute(job_id=job.pk, worker="test")
        assert holder.execute("SELECT 1").fetchone() == (1,)  # told about, not killed
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert "waited more than 1 s for a lock and was cancelled" in job.error
    assert f"pid {holder_pid} (phoenix-billing-app" in job.error
    assert fingerprint(env) == before
    assert job.result["status"] == "rolled_back"


def test_a_cancel_stops_the_restore_and_changes_nothing(
    unprotected_env, approver, approver2, stakeholders, clean_environments
) -> None:
    """A cancel while pg_restore waits for a lock (it has dropped indexes by then) cancels
    its statement on the server: everything is rolled back, and recorded."""
    env = unprotected_env
    seed(env)
    name = take_backup(env)
    change_after_backup(env)
    before = fingerprint(env)
    job = request_restore(approver, env, name)
    services.job_approve(actor=approver2, job_id=job.pk, digest=job.params_digest)
    holder = environment_connect(env, autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT count(*) FROM public.invoice_lines")

    def cancel_when_waiting() -> None:
        watcher = environment_connect(env, autocommit=True)
        try:
            wait_for(
                lambda: watcher.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
                    [f"billing-ops restore env={env.key} job={job.pk}"],
                ).fetchone(),
                timeout_s=30,
                what="pg_restore to wait for the lock",
            )
        finally:
            watcher.close()
        Job.objects.filter(pk=job.pk).update(cancel_requested=True)
        connections.close_all()

    thread = threading.Thread(target=cancel_when_waiting)
    thread.start()
    try:
        status = services.job_execute(job_id=job.pk, worker="test")
    finally:
        thread.join()
        holder.execute("ROLLBACK")
        holder.close()
    assert status == JobStatus.CANCELLED
    assert fingerprint(env) == before
    entry = AuditEntry.objects.get(action="database.restore_failed")
    assert entry.outcome["error"].startswith("Cancelled on request while pg_restore ran")
    job.refresh_from_db()
    assert job.result["status"] == "rolled_back" and job.result["unchanged"] is True


def test_a_backup_without_recorded_counts_is_checked_against_the_archive(
    unprotected_env, approver, approver2, stakeholders, clean_environments
) -> None:
    """A backup made before the dashboard counted rows: still restorable, and verified
    against the rows counted in the archive itself."""
    env = unprotected_env
    seed(env)
    at_backup = counts(env)
    name = take_backup(env)
    manifest_rewrite(env, name, row_counts=None)
    change_after_backup(env)

    job = approve_and_run(request_restore(approver, env, name), approver2)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.params["row_counts"] is None
    assert job.result["counts_source"] == "archive" and job.result["counts_expected"] == at_backup
    assert job.result["verified"] is True and counts(env) == at_backup
    assert any("The backup recorded no row counts" in line.message for line in job.log_lines.all())


def test_restored_rows_that_do_not_match_the_backup_fail_the_job_loudly(
    unprotected_env, approver, approver2, stakeholders, clean_environments
) -> None:
    """The manifest says one more invoice line than the archive holds (a dump that lost
    rows): the restore commits, the count differs, and the job, trail and notices say so."""
    env = unprotected_env
    seed(env)
    name = take_backup(env)
    recorded = backups.backup_manifest(env, name)["row_counts"]
    manifest_rewrite(env, name, row_counts={**recorded, "public.invoice_lines": 21})
    change_after_backup(env)

    job = approve_and_run(request_restore(approver, env, name), approver2)

    assert job.status == JobStatus.FAILED
    assert job.error.startswith(f"RestoreError: The restore of {name} was committed, but the restored rows")
    assert "public.invoice_lines has 20 rows, the backup 21" in job.error
    assert job.result["status"] == "counts_mismatch" and job.result["verified"] is False
    assert counts(env)["public.invoice_lines"] == 20
    entry = AuditEntry.objects.get(action="database.restored")
    assert entry.outcome["status"] == "counts_mismatch"
    assert "do NOT match" in Notification.objects.get(channel="webhook").payload["text"]


# --- Who may, where, and which backup -----------------------------------------------------------


def test_only_an_approver_may_request_a_restore(unprotected_env, operator, viewer) -> None:
    name = make_verified_backup(unprotected_env)
    for user in (operator, viewer):
        with pytest.raises(PermissionDenied):
            request_restore(user, unprotected_env, name)
    assert not Job.objects.exists()


def test_the_environments_name_must_be_typed_exactly(unprotected_env, approver) -> None:
    name = make_verified_backup(unprotected_env)
    for typed in ("", unprotected_env.key.upper() + "x", unprotected_env.label.lower() + "!"):
        with pytest.raises(ValidationError, match="Type the environment's name"):
            request_restore(approver, unprotected_env, name, confirmation=typed)
    assert not Job.objects.exists()
    job = request_restore(approver, unprotected_env, name, confirmation=f"  {unprotected_env.label} ")
    assert job.params["confirmed_name"] == unprotected_env.label


def test_a_reason_is_required(unprotected_env, approver) -> None:
    name = make_verified_backup(unprotected_env)
    with pytest.raises(ValidationError, match="Give the reason"):
        restore.restore_request(
            actor=approver,
            env=unprotected_env,
            backup_name=name,
            confirmation=unprotected_env.label,
            reason="  \n",
        )
    job = restore.restore_request(
        actor=approver,
        env=unprotected_env,
        backup_name=name,
        confirmation=unprotected_env.label,
        reason="a\n  b ",
    )
    assert job.params["reason"] == "a b"  # one line: it goes into the ops channel's message


def test_a_protected_environment_is_refused_unless_its_configuration_allows_restores(
    protected_env, approver, settings
) -> None:
    name = make_verified_backup(protected_env)
    with pytest.raises(ValidationError, match="allow_restore = true"):
        request_restore(approver, protected_env, name)
    assert not Job.objects.exists()
    allowed = environment_allowing_restore(settings, protected_env, True)
    job = request_restore(approver, allowed, name)
    assert job.status == JobStatus.AWAITING_APPROVAL


def test_the_rule_refuses_only_protected_environments_without_allow_restore() -> None:
    def env(**flags: bool) -> Environment:
        return Environment(key="x", label="X", url="postgresql://h/db", **flags)

    assert restore.restore_refusal(env()) == ""
    assert restore.restore_refusal(env(demo=True)) == ""
    assert "allow_restore = true" in restore.restore_refusal(env(protected=True))
    assert "allow_restore = true" in restore.restore_refusal(env(protected=True, demo=True))
    assert restore.restore_refusal(env(protected=True, allow_restore=True)) == ""


def test_nobody_approves_their_own_restore(unprotected_env) -> None:
    admin = make_user("admin1", "Operator", "Approver")
    job = request_restore(admin, unprotected_env, make_verified_backup(unprotected_env))
    with pytest.raises(PermissionDenied):
        services.job_approve(actor=admin, job_id=job.pk, digest=job.params_digest)
    job.refresh_from_db()
    assert job.status == JobStatus.AWAITING_APPROVAL and job.approved_by is None


def test_a_restore_is_refused_at_run_time_when_the_configuration_no_longer_allows_it(
    protected_env, approver, approver2, settings
) -> None:
    name = make_verified_backup(protected_env)
    job = request_restore(approver, environment_allowing_restore(settings, protected_env, True), name)
    services.job_approve(actor=approver2, job_id=job.pk, digest=job.params_digest)
    environment_allowing_restore(settings, protected_env, False)
    services.job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and "allow_restore = true" in job.error
    assert "Nothing was changed." in job.error


def test_only_a_backup_the_dashboard_verified_can_be_chosen(unprotected_env, approver) -> None:
    folder = Path(settings.BACKUP_DIR) / unprotected_env.key
    folder.mkdir(parents=True)
    unverified = f"backup_{unprotected_env.key}_20260101_000000.dump"
    (folder / unverified).write_bytes(b"PGDMP made elsewhere")
    grown = make_verified_backup(unprotected_env, stamp="20260102_000000")
    with open(folder / grown, "ab") as handle:
        handle.write(b"more")
    for name in (unverified, grown, "../elsewhere.dump", f"backup_other_{'2' * 8}_000000.dump"):
        with pytest.raises(ValidationError):
            request_restore(approver, unprotected_env, name)
    assert not Job.objects.exists()


def test_one_restore_per_environment_at_a_time(unprotected_env, approver) -> None:
    name = make_verified_backup(unprotected_env)
    first = request_restore(approver, unprotected_env, name)
    with pytest.raises(services.JobConflict) as refused:
        request_restore(approver, unprotected_env, name)
    assert refused.value.holder.pk == first.pk and Job.objects.count() == 1


# --- Pages -----------------------------------------------------------------------------------


def test_approvers_get_restore_on_verified_backups_where_it_is_allowed(
    client_for, approver, operator, unprotected_env, protected_env
) -> None:
    verified = make_verified_backup(unprotected_env)
    folder = Path(settings.BACKUP_DIR) / unprotected_env.key
    (folder / f"backup_{unprotected_env.key}_20260101_000000.dump").write_bytes(b"PGDMP")
    url = f"/environments/{unprotected_env.key}/reconciliation/backups/"
    page = client_for(approver).get(url).content.decode()
    assert f'href="/environments/{unprotected_env.key}/reconciliation/backups/{verified}/restore/"' in page
    assert page.count('data-restore="allowed"') == 1 and "only verified backups" in page
    assert "public.invoice_lines 20" in page  # the counts recorded in the manifest
    assert "/restore/" not in client_for(operator).get(url).content.decode()
    make_verified_backup(protected_env)
    protected = client_for(approver).get(f"/environments/{protected_env.key}/reconciliation/backups/").content
    assert b'data-restore="refused"' in protected and b"allow_restore = true" in protected
    assert b"/restore/" not in protected


def test_the_restore_form_shows_the_backup_and_leads_to_the_job(
    client_for, approver, approver2, operator, unprotected_env, django_capture_on_commit_callbacks
) -> None:
    env = unprotected_env
    name = make_verified_backup(env)
    url = f"/environments/{env.key}/reconciliation/backups/{name}/restore/"
    assert client_for(operator).get(url).status_code == 403
    form = client_for(approver).get(url).content.decode()
    manifest = backups.backup_manifest(env, name)
    assert name in form and manifest["sha256"] in form and "public.invoice_lines" in form
    assert 'name="confirmation"' in form and 'name="reason"' in form

    wrong = client_for(approver).post(url, {"confirmation": env.key + "?", "reason": REASON})
    assert wrong.status_code == 200 and "Type the environment&#x27;s name" in wrong.content.decode()
    assert not Job.objects.exists()

    with django_capture_on_commit_callbacks(execute=False):
        response = client_for(approver).post(url, {"confirmation": env.label, "reason": REASON})
    job = Job.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.pk}/"
    assert (job.kind, job.status, job.requested_by) == (
        "database_restore",
        JobStatus.AWAITING_APPROVAL,
        approver,
    )
    assert job.params["backup"] == name and job.params["sha256"] == manifest["sha256"]

    seen_by_approver2 = client_for(approver2).get(f"/jobs/{job.pk}/").content.decode()
    assert f'data-restore-backup="{name}"' in seen_by_approver2 and REASON in seen_by_approver2
    assert (
        manifest["sha256"] in seen_by_approver2 and f'action="/jobs/{job.pk}/approve/"' in seen_by_approver2
    )
    seen_by_requester = client_for(approver).get(f"/jobs/{job.pk}/").content.decode()
    assert f"/jobs/{job.pk}/approve/" not in seen_by_requester


def test_an_unknown_backup_has_no_restore_form(client_for, approver, unprotected_env) -> None:
    response = client_for(approver).get(
        f"/environments/{unprotected_env.key}/reconciliation/backups/backup_{unprotected_env.key}_20200101_000000.dump/restore/"
    )
    assert response.status_code == 404
