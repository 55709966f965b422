"""Jobs through a real Celery worker on real Redis, against the test databases."""

from __future__ import annotations

import time

import psycopg
import pytest
from django.db import connections

from billing_ops import services
from billing_ops.models import Job, JobStatus
from billing_ops.tasks import run_job
from tests.conftest import _test_url, broker_unreachable, wait_for

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True)]


def finished(job_id: int) -> Job | None:
    job = Job.objects.get(pk=job_id)
    return job if job.is_finished else None


def seed_rows(env) -> None:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "INSERT INTO billing.billings (id, billing_number, status, process_stage) "
            "SELECT g, 'BILLING' || g, 'COMPLETED', 'ACCOUNTING' FROM generate_series(1, 7) g"
        )
        cursor.execute(
            "INSERT INTO lock.locks (id, lock_key, entity_type, entity_id, billing_id, system_lock) "
            "SELECT 'L' || g, 'customers:' || g, 'customers', g::text, 1, true "
            "FROM generate_series(1, 12) g"
        )


def test_an_environment_check_runs_on_a_worker(
    celery_worker, operator, unprotected_env, clean_environments
) -> None:
    seed_rows(unprotected_env)
    job = services.job_request(actor=operator, kind="environment_check", environment=unprotected_env.key)
    job = wait_for(lambda: finished(job.pk), what="the environment check to finish")
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.dispatched_at is not None and job.attempts == 1
    assert job.worker == celery_worker.name
    assert job.result["row_counts"] == {
        "billing.billings": 7,
        "lock.locks": 12,
        "invoice_lines": 0,
        "audit_logs": 0,
    }
    assert job.result["schema"]["complete"] is True
    assert job.result["server_version"]
    assert job.progress_done == job.progress_total == 6


def test_a_duplicated_message_runs_the_job_once(
    celery_worker, operator, unprotected_env, clean_environments
) -> None:
    job = services.job_request(actor=operator, kind="environment_check", environment=unprotected_env.key)
    run_job.apply_async(args=[job.pk])  # the same message again, as a redelivery would
    run_job.apply_async(args=[job.pk])
    job = wait_for(lambda: finished(job.pk), what="the job to finish")
    time.sleep(2)  # give the duplicates time to arrive and be turned away
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1
    assert job.log_lines.filter(message__startswith="Started on").count() == 1


def test_a_job_submitted_while_redis_is_down_is_dispatched_when_it_returns(
    celery_worker, operator, unprotected_env, clean_environments
) -> None:
    with broker_unreachable():
        started = time.monotonic()
        job = services.job_request(actor=operator, kind="environment_check", environment=unprotected_env.key)
        submit_s = time.monotonic() - started
        job.refresh_from_db()
        assert job.status == JobStatus.QUEUED and job.dispatched_at is None
        assert "Error" in job.dispatch_error or "refused" in job.dispatch_error.lower()
        assert submit_s < 10, "submitting must not hang while Redis is down"

        report = services.jobs_sweep()  # still down: recorded as undispatchable, nothing lost
        assert job.pk in report.undispatchable

    report = services.jobs_sweep()
    assert job.pk in report.redispatched
    job = wait_for(lambda: finished(job.pk), what="the re-sent job to finish")
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1 and job.dispatch_count == 1


def test_a_job_whose_worker_is_killed_is_resumed_by_the_sweeper(
    celery_worker, operator, unprotected_env, clean_environments, settings
) -> None:
    seed_rows(unprotected_env)
    # Hold a lock that makes the check's count(*) wait, so the worker is mid-job when killed.
    blocker = psycopg.connect(_test_url(unprotected_env.alias))
    blocker.execute("LOCK TABLE lock.locks IN ACCESS EXCLUSIVE MODE")
    try:
        job = services.job_request(actor=operator, kind="environment_check", environment=unprotected_env.key)
        wait_for(lambda: Job.objects.get(pk=job.pk).status == JobStatus.RUNNING, what="the job to start")
        time.sleep(1)
        celery_worker.kill()
    finally:
        blocker.rollback()
        blocker.close()
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING  # nobody has noticed yet

    settings.JOB_STALE_AFTER_S = 3
    time.sleep(4)
    report = services.jobs_sweep()
    assert job.pk in report.requeued and job.pk in report.redispatched
    celery_worker.start()
    job = wait_for(lambda: finished(job.pk), what="the resumed job to finish")
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 2
    assert job.result["row_counts"]["lock.locks"] == 12
    assert job.log_lines.filter(message__contains="stopped responding").exists()


def test_a_release_whose_worker_is_killed_resumes_with_correct_totals(
    celery_worker, operator, unprotected_env, clean_environments, settings, monkeypatch
) -> None:
    from locks import release
    from locks.models import LockReleaseBatch
    from tests.factories import make_locks, make_run

    env = unprotected_env
    monkeypatch.setattr(release, "BATCH_SIZE_ROWS", 10)
    make_run(env, 1)
    make_locks(env, 1, 40)
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[1], system_only=False)
    second_batch = list(plan.items.filter(batch_no=1).values_list("lock_id", flat=True))
    # Another session holds a row of batch 2: the worker finishes batch 1, then waits there.
    blocker = psycopg.connect(_test_url(env.alias))
    blocker.execute("SELECT 1 FROM lock.locks WHERE id = %s FOR UPDATE", [second_batch[0]])
    try:
        job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
        wait_for(
            lambda: (
                LockReleaseBatch.objects.filter(plan=plan, status="done").count() == 1
                and LockReleaseBatch.objects.filter(plan=plan, status="deleting").exists()
            ),
            what="batch 1 done and batch 2 started",
        )
        celery_worker.kill()
    finally:
        blocker.rollback()
        blocker.close()
    settings.JOB_STALE_AFTER_S = 3
    time.sleep(4)
    report = services.jobs_sweep()
    assert job.pk in report.requeued
    celery_worker.start()
    job = wait_for(lambda: finished(job.pk), what="the resumed release to finish")
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 2
    assert job.result["released"] == 40 and job.result["gone"] == 0
    assert sum(LockReleaseBatch.objects.filter(plan=plan).values_list("deleted_count", flat=True)) == 40
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM lock.locks WHERE billing_id = 1")
        assert cursor.fetchone()[0] == 0
