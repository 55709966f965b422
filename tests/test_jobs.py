"""The job core: recording, approval rules, cancel, claim, sweeper (in-process services)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from billing_ops import services
from billing_ops.job_kinds import REGISTRY, JobKind
from billing_ops.models import Job, JobStatus
from tests.conftest import make_user

pytestmark = pytest.mark.django_db

CALLS: list[dict[str, Any]] = []


def record_call(ctx: services.JobContext) -> dict[str, Any]:
    CALLS.append({"job": ctx.job_id, "params": ctx.params})
    ctx.progress(1, 1, "done")
    return {"ok": True}


@pytest.fixture
def destructive_kind(monkeypatch: pytest.MonkeyPatch) -> JobKind:
    kind = JobKind(
        name="test_destructive",
        label="Test destructive",
        handler="tests.test_jobs.record_call",
        destructive=True,
        worker_lost_note="Nothing was committed.",
    )
    monkeypatch.setitem(REGISTRY, kind.name, kind)
    CALLS.clear()
    return kind


@pytest.fixture
def admin(db: None):
    return make_user("admin1", "Operator", "Approver")


def test_it_records_the_job_and_dispatches_only_after_commit(
    operator, unprotected_env, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job = services.job_request(actor=operator, kind="environment_check", environment=unprotected_env.key)
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED and job.requested_by == operator
    assert job.dispatched_at is None
    assert len(callbacks) == 1
    assert job.log_lines.filter(message__contains="Requested by operator1").exists()


def test_it_queues_destructive_jobs_directly_in_unprotected_environments(
    operator, unprotected_env, destructive_kind
) -> None:
    job = services.job_request(actor=operator, kind=destructive_kind.name, environment=unprotected_env.key)
    assert Job.objects.get(pk=job.pk).status == JobStatus.QUEUED


def test_it_holds_destructive_jobs_for_an_approver_in_protected_environments(
    operator, protected_env, destructive_kind
) -> None:
    job = services.job_request(
        actor=operator, kind=destructive_kind.name, environment=protected_env.key, params={"run": 1}
    )
    assert Job.objects.get(pk=job.pk).status == JobStatus.AWAITING_APPROVAL


def test_it_refuses_self_approval(admin, protected_env, destructive_kind) -> None:
    job = services.job_request(actor=admin, kind=destructive_kind.name, environment=protected_env.key)
    with pytest.raises(PermissionDenied, match="own request"):
        services.job_approve(actor=admin, job_id=job.pk, digest=job.params_digest)
    with pytest.raises(PermissionDenied):
        services.job_refuse(actor=admin, job_id=job.pk)
    job.refresh_from_db()
    assert job.status == JobStatus.AWAITING_APPROVAL and job.approved_by is None


def test_an_operator_cannot_approve(operator, protected_env, destructive_kind) -> None:
    other = make_user("operator9", "Operator")
    job = services.job_request(actor=other, kind=destructive_kind.name, environment=protected_env.key)
    with pytest.raises(PermissionDenied):
        services.job_approve(actor=operator, job_id=job.pk, digest=job.params_digest)
    assert Job.objects.get(pk=job.pk).status == JobStatus.AWAITING_APPROVAL


def test_an_approver_approves_someone_elses_request(
    operator, approver, protected_env, destructive_kind, django_capture_on_commit_callbacks
) -> None:
    job = services.job_request(actor=operator, kind=destructive_kind.name, environment=protected_env.key)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.job_approve(actor=approver, job_id=job.pk, digest=job.params_digest, comment="checked")
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED
    assert job.approved_by == approver and job.approved_digest == job.params_digest
    assert job.decision_comment == "checked"
    assert len(callbacks) == 1


def test_an_approval_of_other_parameters_is_refused(
    operator, approver, protected_env, destructive_kind
) -> None:
    job = services.job_request(
        actor=operator, kind=destructive_kind.name, environment=protected_env.key, params={"run": 1}
    )
    seen = services.params_digest(kind=job.kind, environment=job.environment, params={"run": 2})
    with pytest.raises(ValidationError, match="changed since you reviewed"):
        services.job_approve(actor=approver, job_id=job.pk, digest=seen)
    assert Job.objects.get(pk=job.pk).status == JobStatus.AWAITING_APPROVAL


def test_a_job_whose_parameters_were_altered_after_approval_does_not_run(
    operator, approver, protected_env, destructive_kind
) -> None:
    job = services.job_request(
        actor=operator, kind=destructive_kind.name, environment=protected_env.key, params={"run": 1}
    )
    services.job_approve(actor=approver, job_id=job.pk, digest=job.params_digest)
    Job.objects.filter(pk=job.pk).update(params={"run": 666})  # tampering in the database
    assert services.job_execute(job_id=job.pk, worker="w") == JobStatus.FAILED
    job.refresh_from_db()
    assert "do not match" in job.error
    assert CALLS == []


def test_an_unapproved_job_forced_into_the_queue_does_not_run(
    operator, protected_env, destructive_kind
) -> None:
    job = services.job_request(actor=operator, kind=destructive_kind.name, environment=protected_env.key)
    Job.objects.filter(pk=job.pk).update(status=JobStatus.QUEUED)
    assert services.job_execute(job_id=job.pk, worker="w") == JobStatus.FAILED
    assert "needs an approval" in Job.objects.get(pk=job.pk).error
    assert CALLS == []


def test_a_refused_job_never_runs(operator, approver, protected_env, destructive_kind) -> None:
    job = services.job_request(actor=operator, kind=destructive_kind.name, environment=protected_env.key)
    services.job_refuse(actor=approver, job_id=job.pk, comment="not now")
    assert services.job_execute(job_id=job.pk, worker="w") == "skipped"
    job.refresh_from_db()
    assert job.status == JobStatus.REFUSED and job.decision_comment == "not now" and job.finished_at
    with pytest.raises(ValidationError):
        services.job_approve(actor=approver, job_id=job.pk, digest=job.params_digest)


def test_viewers_and_approvers_cannot_request_jobs(viewer, approver, unprotected_env) -> None:
    for user in (viewer, approver):
        with pytest.raises(PermissionDenied):
            services.job_request(actor=user, kind="environment_check", environment=unprotected_env.key)
    assert Job.objects.count() == 0


def test_a_claim_succeeds_once(operator, unprotected_env, destructive_kind) -> None:
    job = services.job_request(actor=operator, kind=destructive_kind.name, environment=unprotected_env.key)
    assert services.job_execute(job_id=job.pk, worker="w1") == JobStatus.SUCCEEDED
    assert services.job_execute(job_id=job.pk, worker="w2") == "skipped"
    job.refresh_from_db()
    assert job.attempts == 1 and job.worker == "w1" and len(CALLS) == 1
    assert job.result == {"ok": True} and job.progress_percent == 100


def test_cancel_before_start_and_during_run(operator, unprotected_env, destructive_kind) -> None:
    queued = services.job_request(actor=operator, kind=destructive_kind.name, environment=unprotected_env.key)
    services.job_cancel(actor=operator, job_id=queued.pk)
    assert Job.objects.get(pk=queued.pk).status == JobStatus.CANCELLED
    assert services.job_execute(job_id=queued.pk, worker="w") == "skipped"

    running = services.job_request(
        actor=operator, kind=destructive_kind.name, environment=unprotected_env.key
    )
    Job.objects.filter(pk=running.pk).update(status=JobStatus.RUNNING)
    services.job_cancel(actor=operator, job_id=running.pk)
    running.refresh_from_db()
    assert running.status == JobStatus.RUNNING and running.cancel_requested
    with pytest.raises(services.JobCancelled):
        services.JobContext(running, unprotected_env).check_cancel()


def test_another_operator_cannot_cancel_my_job(operator, unprotected_env) -> None:
    job = services.job_request(actor=operator, kind="environment_check", environment=unprotected_env.key)
    with pytest.raises(PermissionDenied):
        services.job_cancel(actor=make_user("operator9", "Operator"), job_id=job.pk)
    assert Job.objects.get(pk=job.pk).status == JobStatus.QUEUED


def test_the_sweeper_fails_a_non_resumable_job_whose_worker_died(
    operator, unprotected_env, destructive_kind, settings
) -> None:
    settings.JOB_STALE_AFTER_S = 60
    job = services.job_request(actor=operator, kind=destructive_kind.name, environment=unprotected_env.key)
    old = timezone.now() - timedelta(seconds=61)
    Job.objects.filter(pk=job.pk).update(
        status=JobStatus.RUNNING, attempts=1, heartbeat_at=old, worker="w1", dispatched_at=old
    )
    report = services.jobs_sweep()
    job.refresh_from_db()
    assert report.failed == [job.pk]
    assert (
        job.status == JobStatus.FAILED
        and "stopped responding" in job.error
        and "Nothing was committed" in job.error
    )


def test_the_sweeper_leaves_a_job_with_a_fresh_heartbeat_alone(
    operator, unprotected_env, destructive_kind
) -> None:
    job = services.job_request(actor=operator, kind=destructive_kind.name, environment=unprotected_env.key)
    Job.objects.filter(pk=job.pk).update(status=JobStatus.RUNNING, attempts=1, heartbeat_at=timezone.now())
    report = services.jobs_sweep()
    assert job.pk not in report.failed + report.requeued
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING


def test_a_job_of_a_kind_no_longer_configured_fails_cleanly(operator, unprotected_env) -> None:
    job = services.job_request(actor=operator, kind="environment_check", environment=unprotected_env.key)
    Job.objects.filter(pk=job.pk).update(kind="vanished_kind")
    assert services.job_execute(job_id=job.pk, worker="w") == JobStatus.FAILED
    assert "unknown job kind" in Job.objects.get(pk=job.pk).error


def test_the_job_page_lists_parameters_only_where_no_details_section_explains_them(
    operator, unprotected_env, destructive_kind, client_for
) -> None:
    plain = services.job_request(
        actor=operator, kind="test_destructive", environment=unprotected_env.key, params={"runs": [4, 5]}
    )
    page = client_for(operator).get(f"/jobs/{plain.pk}/").content.decode()
    assert "<code>runs</code> [4, 5]" in page and "{&#x27;runs&#x27;" not in page
    detailed = Job.objects.create(
        kind="upsert_rollback",
        environment=unprotected_env.key,
        params={"run_id": "r-1", "reason": "wrong month", "digest_marker": "zz-not-a-detail"},
        requested_by=operator,
    )
    page = client_for(operator).get(f"/jobs/{detailed.pk}/").content.decode()
    assert "wrong month" in page and "zz-not-a-detail" not in page
