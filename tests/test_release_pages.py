"""The lock-release flow through its pages: select, preview, confirm, approve, restore."""

from __future__ import annotations

import pytest
from django.db import connections

from billing_ops import services
from billing_ops.models import Job, JobStatus
from locks.models import LockReleasePlan
from tests.conftest import make_user
from tests.factories import make_locks, make_run

pytestmark = [
    pytest.mark.django_db(databases="__all__", transaction=True),
    pytest.mark.usefixtures("inline_jobs"),
]


@pytest.fixture
def stuck(unprotected_env, clean_environments):
    make_run(unprotected_env, 1)
    make_locks(unprotected_env, 1, 12)
    make_run(unprotected_env, 2)
    make_locks(unprotected_env, 2, 3, system=False, entity_type="customers")
    return unprotected_env


def count_locks(env, run_id: int) -> int:
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM lock.locks WHERE billing_id = %s", [run_id])
        return cursor.fetchone()[0]


def test_an_operator_previews_selected_runs_then_releases(
    stuck, client_for, operator, django_capture_on_commit_callbacks
) -> None:
    client = client_for(operator)
    page = client.get(f"/environments/{stuck.key}/stuck-runs/").content.decode()
    assert 'name="runs"' in page and "Release locks of the selected runs" in page
    response = client.post(
        f"/environments/{stuck.key}/releases/preview/", {"scope": "selected", "runs": ["1"], "locks": "all"}
    )
    plan = LockReleasePlan.objects.get()
    assert response["Location"] == f"/environments/{stuck.key}/releases/{plan.pk}/"
    preview = client.get(response["Location"]).content.decode()
    assert "Release plan: 12 locks" in preview and "Release these locks" in preview
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post(
            f"/environments/{stuck.key}/releases/{plan.pk}/request/", {"digest": plan.digest}
        )
    job = Job.objects.get()
    assert response["Location"] == f"/jobs/{job.pk}/"
    assert job.status == JobStatus.QUEUED and job.params["runs"] == [1]
    services.job_execute(job_id=job.pk, worker="test")
    assert count_locks(stuck, 1) == 0 and count_locks(stuck, 2) == 3
    assert "12</strong> locks released" in client.get(f"/jobs/{job.pk}/").content.decode()


def test_everything_the_filter_shows_can_be_previewed(stuck, client_for, operator) -> None:
    client_for(operator).post(
        f"/environments/{stuck.key}/releases/preview/",
        {"scope": "shown", "filter_query": "lock_kind=user", "locks": "all"},
    )
    plan = LockReleasePlan.objects.get()
    assert plan.run_ids == [2] and plan.lock_count == 3


def test_a_viewer_sees_no_release_controls_and_cannot_post(stuck, client_for, viewer) -> None:
    client = client_for(viewer)
    assert 'name="runs"' not in client.get(f"/environments/{stuck.key}/stuck-runs/").content.decode()
    assert "Release locks" not in client.get(f"/environments/{stuck.key}/runs/1/").content.decode()
    response = client.post(
        f"/environments/{stuck.key}/releases/preview/", {"scope": "selected", "runs": ["1"], "locks": "all"}
    )
    assert response.status_code == 403 and not LockReleasePlan.objects.exists()


def test_tampered_run_ids_are_rejected_without_a_500(stuck, client_for, operator) -> None:
    client = client_for(operator)
    for runs in (["1; DROP TABLE lock.locks"], ["-5"], ["../../etc"]):
        response = client.post(
            f"/environments/{stuck.key}/releases/preview/",
            {"scope": "selected", "runs": runs, "locks": "all"},
        )
        assert response.status_code == 302
    assert not LockReleasePlan.objects.exists() and count_locks(stuck, 1) == 12


def test_production_asks_for_its_name_and_an_approver_sees_the_same_preview(
    protected_env, clean_environments, client_for
) -> None:
    env = protected_env
    make_run(env, 7)
    make_locks(env, 7, 4)
    operator = make_user("operator1", "Operator")
    approver = make_user("approver1", "Approver")
    client = client_for(operator)
    client.post(
        f"/environments/{env.key}/releases/preview/", {"scope": "selected", "runs": ["7"], "locks": "all"}
    )
    plan = LockReleasePlan.objects.get()
    if env.confirm_name:
        client.post(
            f"/environments/{env.key}/releases/{plan.pk}/request/",
            {"digest": plan.digest, "confirmation": "yes"},
        )
        assert not Job.objects.exists()
    client.post(
        f"/environments/{env.key}/releases/{plan.pk}/request/",
        {"digest": plan.digest, "confirmation": env.label},
    )
    job = Job.objects.get()
    assert job.status == JobStatus.AWAITING_APPROVAL
    page = client_for(approver).get(f"/jobs/{job.pk}/").content.decode()
    assert "Release plan: 4 locks" in page and f'action="/jobs/{job.pk}/approve/"' in page
    assert "Approve" not in client.get(f"/jobs/{job.pk}/").content.decode()
    client_for(approver).post(f"/jobs/{job.pk}/approve/", {"digest": job.params_digest})
    assert Job.objects.get(pk=job.pk).status == JobStatus.QUEUED
    services.job_execute(job_id=job.pk, worker="test")
    assert count_locks(env, 7) == 0
    page = client_for(approver).get(f"/jobs/{job.pk}/").content.decode()
    assert "Restore released locks" in page
    client_for(approver).post(f"/jobs/{job.pk}/restore-locks/")
    restore = Job.objects.get(kind="lock_restore")
    services.job_execute(job_id=restore.pk, worker="test")
    assert count_locks(env, 7) == 4


def test_the_polled_job_fragment_reads_no_preview_and_counts_no_alerts(stuck, client_for, operator) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client = client_for(operator)
    client.post(
        f"/environments/{stuck.key}/releases/preview/", {"scope": "selected", "runs": ["1"], "locks": "all"}
    )
    plan = LockReleasePlan.objects.get()
    client.post(f"/environments/{stuck.key}/releases/{plan.pk}/request/", {"digest": plan.digest})
    job = Job.objects.get()
    assert "Release plan: 12 locks" in client.get(f"/jobs/{job.pk}/").content.decode()
    with CaptureQueriesContext(connection) as queries:
        response = client.get(f"/jobs/{job.pk}/status/")
    assert response.status_code == 200
    tables = " ".join(q["sql"] for q in queries.captured_queries)
    assert "locks_lockreleaseplan" not in tables and "locks_alert" not in tables
