"""The scheduled cleanup: policies, the periodic task row, and a scheduled round."""

from __future__ import annotations

import pytest
from django.db import connections
from django_celery_beat.models import PeriodicTask

from billing_ops import services
from billing_ops.environments import all_environments
from billing_ops.models import Job, JobStatus
from locks import schedule
from locks.models import CleanupPolicy
from tests.factories import make_locks, make_run

pytestmark = [
    pytest.mark.django_db(databases="__all__", transaction=True),
    pytest.mark.usefixtures("inline_jobs"),
]


def remaining_locks(env) -> int:
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM lock.locks WHERE billing_id IS NOT NULL")
        return cursor.fetchone()[0]


def only(env_key: str, *, enabled: bool = True) -> None:
    """Switch the schedule off everywhere but one environment."""
    for env in all_environments():
        CleanupPolicy.objects.update_or_create(
            environment=env.key, defaults={"enabled": enabled and env.key == env_key}
        )


def test_it_is_on_by_default_only_where_the_environment_is_not_protected() -> None:
    policies = {p.env.key: p for p in schedule.cleanup_policies()}
    for env in all_environments():
        assert policies[env.key].enabled is (not env.protected)
    task = schedule.cleanup_schedule()
    assert (task.crontab.minute, task.crontab.hour) == (
        "0",
        "2",
    ) and task.task == "locks.tasks.scheduled_cleanup"


def test_a_scheduled_round_releases_eligible_runs_once(unprotected_env, clean_environments) -> None:
    env = unprotected_env
    make_run(env, 1)
    make_locks(env, 1, 6)
    make_run(env, 2, status="GENERATED")
    make_locks(env, 2, 2)
    make_locks(env, None, 3, system=False)
    only(env.key)
    outcomes = schedule.cleanup_scheduled_run()
    job = Job.objects.get()
    assert f"job #{job.pk}" in outcomes[0] and job.requested_by.username == "scheduler"
    assert job.status == JobStatus.QUEUED and job.params["runs"] == [1, 2] and job.params["scheduled"]
    # The next round while this one is still going does not start a second.
    assert "still going" in schedule.cleanup_scheduled_run()[0]
    assert Job.objects.count() == 1
    assert services.job_execute(job_id=job.pk, worker="test") == JobStatus.SUCCEEDED
    assert remaining_locks(env) == 0
    assert "nothing to release" in schedule.cleanup_scheduled_run()[0]


def test_in_a_protected_environment_it_only_opens_a_request(protected_env, clean_environments) -> None:
    env = protected_env
    make_run(env, 3)
    make_locks(env, 3, 4)
    only(env.key)
    schedule.cleanup_scheduled_run()
    job = Job.objects.get()
    assert job.status == JobStatus.AWAITING_APPROVAL
    assert remaining_locks(env) == 4


def test_an_approver_changes_the_schedule_and_an_operator_cannot(client_for, approver, operator) -> None:
    response = client_for(operator).post(
        "/cleanup-schedule/",
        {
            "what": "schedule",
            "minute": "30",
            "hour": "3",
            "day_of_week": "*",
            "time_zone": "UTC",
            "enabled": "on",
        },
    )
    assert response.status_code == 403
    response = client_for(approver).post(
        "/cleanup-schedule/",
        {
            "what": "schedule",
            "minute": "30",
            "hour": "3",
            "day_of_week": "mon-fri",
            "time_zone": "Asia/Tbilisi",
            "enabled": "on",
        },
    )
    assert response.status_code == 302
    task = PeriodicTask.objects.get(name=schedule.SCHEDULE_NAME)
    assert (task.crontab.minute, task.crontab.hour, task.crontab.day_of_week) == ("30", "3", "mon-fri")
    assert str(task.crontab.timezone) == "Asia/Tbilisi"


def test_a_bad_schedule_is_refused_with_the_reason(client_for, approver) -> None:
    response = client_for(approver).post(
        "/cleanup-schedule/",
        {"what": "schedule", "minute": "61", "hour": "2", "day_of_week": "*", "time_zone": "UTC"},
    )
    assert response.status_code == 200 and "Not a valid schedule" in response.content.decode()
    assert schedule.cleanup_schedule().crontab.minute == "0"


def test_an_approver_switches_environments(client_for, approver, protected_env) -> None:
    client_for(approver).post(
        "/cleanup-schedule/",
        {"what": "policies", f"enabled_{protected_env.key}": "on", f"system_only_{protected_env.key}": "on"},
    )
    policy = CleanupPolicy.objects.get(environment=protected_env.key)
    assert policy.enabled and policy.system_only and policy.updated_by == approver


def test_only_an_approver_gets_the_forms_the_others_see_the_settings(
    client_for, viewer, operator, approver
) -> None:
    for user in (viewer, operator):
        page = client_for(user).get("/cleanup-schedule/").content.decode()
        assert 'method="post"' not in page.split("</header>", 1)[1], user.username
        assert 'name="enabled_' in page and "disabled" in page  # the policies, read-only
    page = client_for(approver).get("/cleanup-schedule/").content.decode()
    assert page.split("</header>", 1)[1].count('method="post"') == 2
