"""Chain verification as a job (audit.verification): its result, its alert, the schedule, the
pages; and a million rows verified in constant memory.

How each kind of tampering is classified is tested on the walk itself in
tests/test_dashboard_audit.py; here the same tampering goes through the job, and what the
job keeps, shows and raises is checked.
"""

from __future__ import annotations

import time
import tracemalloc
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.db import connections

from audit.selectors import environment_chain_verify
from audit.services import SYSTEM_SCHEDULER, audit_record
from audit.tasks import scheduled_chain_verify
from audit.verification import (
    CHAIN_VERIFY_KIND,
    chain_claim_key,
    chain_verify_request,
    chain_verify_scheduled_run,
)
from billing_ops import services
from billing_ops.environments import Environment, all_environments
from billing_ops.models import Job, JobClaim, JobStatus, Notification
from locks.models import Alert, AlertKind, AlertSeverity, AlertStatus
from locks.schedule import SCHEDULER_USERNAME
from tests.conftest import free_port_for_tests, make_user
from tests.test_dashboard_audit import ENV_START, env_chain, record, tampering

in_environments = pytest.mark.django_db(databases="__all__", transaction=True)

ENV_ROWS = 12
OTHER_WRITER_ROWS = (2, 3)


@pytest.fixture
def recipients(settings: Any) -> None:
    """Alert notifications go to one address (and a webhook on a closed port)."""
    settings.ALERT_EMAILS = ["ops@example.com"]
    settings.ALERT_WEBHOOK_URL = f"http://127.0.0.1:{free_port_for_tests()}/services/T0/B0/secret"


def write_chain(env: Environment) -> list[tuple[int, str]]:
    """12 chained rows; rows 2 and 3 are another writer's (linkage only)."""
    return env_chain(
        env, [(n not in OTHER_WRITER_ROWS, ENV_START + timedelta(seconds=n)) for n in range(ENV_ROWS)]
    )


def tamper_every_way(env: Environment, rows: list[tuple[int, str]]) -> dict[str, int]:
    """Rows 2 and 3 swapped in time, row 5's content changed, row 7 deleted, a row forged
    between 9 and 10. Returns the forged row's id under "inserted"."""
    ids = [row_id for row_id, _ in rows]
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "UPDATE public.audit_logs SET created_at = CASE id WHEN %s THEN %s ELSE %s END"
            " WHERE id = ANY(%s)",
            [ids[2], ENV_START + timedelta(seconds=3), ENV_START + timedelta(seconds=2), [ids[2], ids[3]]],
        )
        cursor.execute(
            """UPDATE public.audit_logs SET new_data = new_data || '{"amount": "0.01"}' WHERE id = %s""",
            [ids[5]],
        )
        cursor.execute("DELETE FROM public.audit_logs WHERE id = %s", [ids[7]])
        cursor.execute(
            "INSERT INTO public.audit_logs (action, record_id, new_data, hash, previous_hash, created_at)"
            " VALUES ('upsert_missing_lines', 'forged', '{}', %s, %s, %s) RETURNING id",
            ["f" * 64, rows[9][1], ENV_START + timedelta(seconds=9.5)],
        )
        return {"inserted": int(cursor.fetchone()[0])}


def run(job: Job) -> Job:
    assert services.job_execute(job_id=job.pk, worker="test") == JobStatus.SUCCEEDED, Job.objects.get(
        pk=job.pk
    ).error
    job.refresh_from_db()
    return job


def verify(env: Environment | None, actor: User) -> Job:
    return run(chain_verify_request(actor=actor, env=env))


def damages_by_entry(result: dict[str, Any]) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for damage in result["damages"]:
        found.setdefault(damage["entry_id"], set()).add(damage["kind"])
    return found


# --- The job's result -----------------------------------------------------------------------------


@in_environments
@pytest.mark.usefixtures("inline_jobs")
def test_the_job_keeps_the_result_of_an_intact_chain(unprotected_env, clean_environments) -> None:
    operator = make_user("operator1", "Operator")
    rows = write_chain(unprotected_env)

    job = verify(unprotected_env, operator)

    assert (job.kind, job.environment, job.params) == (
        CHAIN_VERIFY_KIND,
        unprotected_env.key,
        {"chain": "environment"},
    )
    result = job.result
    assert result["intact"] is True and result["chain"] == "environment"
    assert (result["entries"], result["recomputed"], result["linkage_only"]) == (ENV_ROWS, 10, 2)
    assert result["damaged_entries"] == 0 and result["damages"] == [] and result["damage_kinds"] == []
    assert result["first_broken"] is None
    head = {"entry_id": rows[-1][0], "hash": rows[-1][1]}
    assert result["head"] == head and result["verified_head"] == head
    assert result["duration_s"] >= 0 and result["rows_per_s"] > 0
    assert result["alert"] is None
    assert not JobClaim.objects.exists()  # settled: the chain is free for the next one
    assert not Alert.objects.exists()


@in_environments
@pytest.mark.usefixtures("inline_jobs")
def test_the_job_reports_each_kind_of_tampering_at_its_entry(unprotected_env, clean_environments) -> None:
    operator = make_user("operator1", "Operator")
    rows = write_chain(unprotected_env)
    ids = [row_id for row_id, _ in rows]
    forged = tamper_every_way(unprotected_env, rows)["inserted"]

    result = verify(unprotected_env, operator).result

    assert result["intact"] is False
    assert damages_by_entry(result) == {
        ids[2]: {"rows swapped"},
        ids[3]: {"rows swapped"},
        ids[5]: {"content changed"},
        ids[8]: {"row deleted"},
        forged: {"row inserted"},
    }
    assert result["damaged_entries"] == 5
    assert result["damage_kinds"] == [
        {"kind": "content changed", "count": 1},
        {"kind": "row deleted", "count": 1},
        {"kind": "row inserted", "count": 1},
        {"kind": "rows swapped", "count": 2},
    ]
    assert result["first_broken"]["entry_id"] == ids[3]  # ids[3] now sorts before ids[2]
    assert result["verified_head"] == {"entry_id": ids[1], "hash": rows[1][1]}
    assert result["entries"] == ENV_ROWS  # one deleted, one forged
    log = " ".join(Job.objects.get(kind=CHAIN_VERIFY_KIND).log_lines.values_list("message", flat=True))
    assert f"entry #{forged}: row inserted" in log and "DAMAGED" in log


@in_environments
@pytest.mark.usefixtures("inline_jobs")
def test_the_job_verifies_the_dashboards_own_trail_without_an_environment() -> None:
    approver = make_user("approver1", "Approver")
    entries = record(4)

    job = verify(None, approver)

    assert (job.environment, job.params, job.requested_by) == ("", {"chain": "dashboard"}, approver)
    # job.requested, then the job's own request entry: every entry recomputed, none linkage-only.
    assert job.result["intact"] is True and job.result["chain"] == "dashboard"
    assert job.result["entries"] == job.result["recomputed"] == len(entries) + 1
    assert job.result["linkage_only"] == 0

    with tampering() as cursor:
        cursor.execute("DELETE FROM audit_entry WHERE id = %s", [entries[1].pk])
    damaged = verify(None, approver).result
    assert damages_by_entry(damaged) == {entries[2].pk: {"row deleted"}}
    assert damaged["verified_head"]["entry_id"] == entries[0].pk


@in_environments
def test_a_verification_that_cannot_read_the_chain_fails_and_leaves_alerts_alone(
    extra_environment, inline_jobs
) -> None:
    env = extra_environment("gone", f"postgresql://postgres@127.0.0.1:{free_port_for_tests()}/nowhere")
    operator = make_user("operator1", "Operator")
    open_alert = Alert.objects.create(
        environment=env.key, kind=AlertKind.AUDIT_CHAIN_BROKEN, severity=AlertSeverity.CRITICAL, summary="x"
    )
    job = chain_verify_request(actor=operator, env=env)
    assert services.job_execute(job_id=job.pk, worker="test") == JobStatus.FAILED
    job.refresh_from_db()
    assert job.result is None and job.error
    assert Alert.objects.get().pk == open_alert.pk and Alert.objects.get().status == AlertStatus.OPEN


def test_only_operators_and_approvers_ask_for_a_verification(db: None) -> None:
    viewer = make_user("viewer1", "Viewer")
    with pytest.raises(PermissionDenied):
        chain_verify_request(actor=viewer, env=None)
    assert not Job.objects.exists()


def test_no_other_kind_runs_without_an_environment(db: None) -> None:
    operator = make_user("operator1", "Operator")
    with pytest.raises(LookupError):
        services.job_request(actor=operator, kind="environment_check", environment="")
    assert not Job.objects.exists()


@pytest.mark.django_db(databases="__all__")
def test_only_rows_whose_new_data_names_our_scheme_are_recomputed(
    unprotected_env, clean_environments
) -> None:
    """The verification's SQL decides what is ours as audit.chain.is_ours does."""
    rows = write_chain(unprotected_env)
    with connections[unprotected_env.alias].cursor() as cursor:
        for n, value in zip(OTHER_WRITER_ROWS, ('["billing-ops/2"]', '"billing-ops/2"'), strict=True):
            cursor.execute(
                "UPDATE public.audit_logs SET new_data = %s::jsonb WHERE id = %s", [value, rows[n][0]]
            )
        # Row 4 is ours, with our scheme's name under another key; row 6 ours, without new_data.
        cursor.execute(
            """UPDATE public.audit_logs SET new_data = '{"scheme": "billing-ops/2"}' WHERE id = %s""",
            [rows[4][0]],
        )
        cursor.execute("UPDATE public.audit_logs SET new_data = NULL WHERE id = %s", [rows[6][0]])
    report = environment_chain_verify(env=unprotected_env)
    # Neither names the scheme any more: checked for linkage only, which still holds.
    assert report.intact and report.linkage_only == 4 and report.recomputed == ENV_ROWS - 4


# --- The alert ---------------------------------------------------------------------------------------


@in_environments
@pytest.mark.usefixtures("inline_jobs")
def test_a_broken_chain_opens_one_critical_alert_and_an_intact_one_resolves_it(
    unprotected_env, clean_environments, recipients
) -> None:
    operator = make_user("operator1", "Operator")
    rows = write_chain(unprotected_env)
    assert verify(unprotected_env, operator).result["alert"] is None

    tamper_every_way(unprotected_env, rows)
    broken = verify(unprotected_env, operator)
    alert = Alert.objects.get()
    assert (alert.environment, alert.kind, alert.severity, alert.status) == (
        unprotected_env.key,
        AlertKind.AUDIT_CHAIN_BROKEN,
        AlertSeverity.CRITICAL,
        AlertStatus.OPEN,
    )
    assert broken.result["alert"] == {"id": alert.pk, "event": "opened"}
    assert alert.details["job_id"] == broken.pk and alert.details["damaged_entries"] == 5
    assert "first broken entry #" in alert.summary
    notices = Notification.objects.filter(source=f"alert:{alert.pk}")
    assert sorted(notices.values_list("channel", flat=True)) == ["email", "webhook"]
    email = notices.get(channel="email")
    assert email.subject.startswith("[Billing Ops] CRITICAL:") and "row inserted" in email.body

    # Still broken: the same alert, updated, nobody told again.
    again = verify(unprotected_env, operator)
    assert again.result["alert"] == {"id": alert.pk, "event": "updated"}
    assert Alert.objects.count() == 1 and notices.count() == 2

    # Repaired (the table written again, intact): resolved, and said so once.
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute("TRUNCATE public.audit_logs")
    write_chain(unprotected_env)
    fixed = verify(unprotected_env, operator)
    alert.refresh_from_db()
    assert alert.status == AlertStatus.RESOLVED and fixed.result["alert"] == {
        "id": alert.pk,
        "event": "resolved",
    }
    resolved = notices.filter(channel="email").order_by("id").last()
    assert resolved is not None and resolved.subject.startswith("[Billing Ops] RESOLVED:")
    assert "found the audit chain intact" in resolved.body


@in_environments
@pytest.mark.usefixtures("inline_jobs")
def test_the_dashboards_broken_trail_raises_its_own_alert(recipients, client_for) -> None:
    approver = make_user("approver1", "Approver")
    entries = record(3)
    with tampering() as cursor:
        cursor.execute("""UPDATE audit_entry SET params = '{"n": "9"}' WHERE id = %s""", [entries[1].pk])
    verify(None, approver)
    alert = Alert.objects.get()
    assert (alert.environment, alert.kind, alert.severity) == ("", AlertKind.AUDIT_CHAIN_BROKEN, "critical")
    assert alert.summary.startswith("Dashboard: audit trail hash chain broken")
    email = Notification.objects.get(source=f"alert:{alert.pk}", channel="email")
    assert "the dashboard's own audit trail" in email.body
    page = client_for(make_user("viewer1", "Viewer")).get("/alerts/").content.decode()
    assert 'href="/audit/chain/"' in page and alert.summary in page


# --- The schedule ---------------------------------------------------------------------------------


@in_environments
@pytest.mark.usefixtures("inline_jobs")
def test_the_schedule_requests_every_chain_once_and_never_a_second_while_one_is_active() -> None:
    envs = all_environments()
    first = scheduled_chain_verify()  # the beat task
    jobs = list(Job.objects.filter(kind=CHAIN_VERIFY_KIND).order_by("id"))
    assert sorted(job.environment for job in jobs) == sorted([*(e.key for e in envs), ""])
    assert {job.requested_by.username for job in jobs} == {SCHEDULER_USERNAME}
    assert {job.status for job in jobs} == {JobStatus.QUEUED}
    assert len(first) == len(envs) + 1 and all("queued" in line for line in first)
    assert set(JobClaim.objects.values_list("key", flat=True)) == {
        *(chain_claim_key(e) for e in envs),
        chain_claim_key(None),
    }

    second = chain_verify_scheduled_run()
    assert Job.objects.filter(kind=CHAIN_VERIFY_KIND).count() == len(jobs)
    dashboard_job = next(job for job in jobs if job.environment == "")
    assert f"dashboard: skipped, job #{dashboard_job.pk} is still verifying it" in second

    run(dashboard_job)  # settled: its claim is free again; the others still run
    third = chain_verify_scheduled_run()
    new = Job.objects.filter(kind=CHAIN_VERIFY_KIND).exclude(pk__in=[j.pk for j in jobs])
    assert list(new.values_list("environment", flat=True)) == [""]
    assert sum("skipped" in line for line in third) == len(envs)


def test_the_beat_entry_runs_the_scheduled_task_at_the_configured_interval() -> None:
    entry = django_settings.CELERY_BEAT_SCHEDULE["verify-audit-chains"]
    assert entry["task"] == "audit.tasks.scheduled_chain_verify" == scheduled_chain_verify.name
    assert entry["schedule"] == float(django_settings.CHAIN_VERIFY_INTERVAL_S) == 86400.0


# --- The pages ------------------------------------------------------------------------------------------


@in_environments
@pytest.mark.usefixtures("inline_jobs")
def test_the_environments_audit_page_shows_the_last_verification_and_the_history(
    unprotected_env, clean_environments, client_for
) -> None:
    operator = make_user("operator1", "Operator")
    rows = write_chain(unprotected_env)
    intact = verify(unprotected_env, operator)
    forged = tamper_every_way(unprotected_env, rows)["inserted"]
    broken = verify(unprotected_env, operator)

    page = client_for(make_user("viewer1", "Viewer")).get(f"/environments/{unprotected_env.key}/audit/")
    html = page.content.decode()
    assert page.status_code == 200
    assert f'href="/jobs/{broken.pk}/"' in html and f'href="/jobs/{intact.pk}/"' in html  # the history
    assert 'data-intact="no"' in html and 'data-intact="yes"' in html
    assert f'data-first-broken="{rows[3][0]}"' in html
    assert f'data-verified-head="{rows[1][0]}"' in html
    for kind in ("content changed", "row deleted", "row inserted", "rows swapped"):
        assert kind in html
    assert f'data-entry="{forged}"' in html
    assert "checked for linkage only" in html
    assert "Verify now" not in html  # a viewer reads only

    job_page = client_for(operator).get(f"/jobs/{broken.pk}/").content.decode()
    assert f'data-entry="{forged}"' in job_page and 'data-intact="no"' in job_page

    operator_page = client_for(operator).get(f"/environments/{unprotected_env.key}/audit/").content.decode()
    assert "Verify now" in operator_page
    nav = client_for(operator).get(f"/environments/{unprotected_env.key}/reconciliation/").content.decode()
    assert f'href="/environments/{unprotected_env.key}/audit/"' in nav


@pytest.mark.django_db(databases="__all__")
def test_verify_now_queues_one_job_and_refuses_a_second_naming_the_first(
    unprotected_env, client_for, django_capture_on_commit_callbacks
) -> None:
    client = client_for(make_user("approver1", "Approver"))
    with django_capture_on_commit_callbacks(execute=False):
        first = client.post(f"/environments/{unprotected_env.key}/audit/verify/")
        job = Job.objects.get()
        assert first.status_code == 302 and first["Location"] == f"/jobs/{job.pk}/"
        second = client.post(f"/environments/{unprotected_env.key}/audit/verify/", follow=True)
    assert Job.objects.count() == 1
    assert (
        f"Job #{job.pk}" in second.content.decode() and "already working on this" in second.content.decode()
    )
    assert f'data-active-job="{job.pk}"' in second.content.decode()


@pytest.mark.django_db(databases="__all__")
def test_the_dashboards_chain_page_and_its_button(client_for, django_capture_on_commit_callbacks) -> None:
    audit_record(actor=SYSTEM_SCHEDULER, action="job.requested")
    viewer_page = client_for(make_user("viewer1", "Viewer")).get("/audit/chain/").content.decode()
    assert "Not verified yet." in viewer_page and "Verify now" not in viewer_page
    client = client_for(make_user("operator1", "Operator"))
    assert "Verify now" in client.get("/audit/chain/").content.decode()
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post("/audit/chain/verify/")
    job = Job.objects.get()
    assert response["Location"] == f"/jobs/{job.pk}/" and job.environment == ""
    detail = client.get(f"/jobs/{job.pk}/").content.decode()
    assert "Audit chain verification" in detail


# --- A million rows in constant memory ----------------------------------------------------------------

SMALL_CHAIN_ROWS = 100_000
BIG_CHAIN_ROWS = 1_000_000
# What may differ between the two peaks: noise of the allocator and of Django's internals,
# not anything that grows with the chain (measured: well under 100 KB apart).
PEAK_MARGIN_BYTES = 512 * 1024

OTHER_WRITER_ROWS_SQL = """
    INSERT INTO public.audit_logs (action, record_id, hash, previous_hash, created_at)
    SELECT 'other_writer', i::text, md5(i::text),
           CASE WHEN i > 1 THEN md5((i - 1)::text) END,
           timestamptz '2026-01-01 00:00:00+00' + i * interval '1 millisecond'
      FROM generate_series(%s::bigint, %s::bigint) AS i
"""


def verification_peak(env: Environment) -> tuple[Any, int, float]:
    tracemalloc.start()
    started = time.monotonic()
    try:
        report = environment_chain_verify(env=env)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return report, peak, time.monotonic() - started


@pytest.mark.timeout(900)
@pytest.mark.django_db(databases="__all__")
def test_verifying_a_million_rows_streams_in_constant_memory(unprotected_env, clean_environments) -> None:
    env = unprotected_env
    with connections[env.alias].cursor() as cursor:
        cursor.execute(OTHER_WRITER_ROWS_SQL, [1, SMALL_CHAIN_ROWS])
    small, small_peak, _ = verification_peak(env)
    with connections[env.alias].cursor() as cursor:
        cursor.execute(OTHER_WRITER_ROWS_SQL, [SMALL_CHAIN_ROWS + 1, BIG_CHAIN_ROWS])
    big, big_peak, big_s = verification_peak(env)

    assert small.intact and small.entries == SMALL_CHAIN_ROWS and small.linkage_only == SMALL_CHAIN_ROWS
    assert big.intact and big.entries == BIG_CHAIN_ROWS and big.linkage_only == BIG_CHAIN_ROWS
    assert big.head is not None and big.head.hash == _md5(BIG_CHAIN_ROWS)
    print(
        f"\n1,000,000 rows verified in {big_s:.1f} s under tracemalloc; peaks {small_peak:,} / {big_peak:,} B"
    )
    assert big_peak <= small_peak + PEAK_MARGIN_BYTES, (small_peak, big_peak)


def _md5(n: int) -> str:
    import hashlib

    return hashlib.md5(str(n).encode()).hexdigest()  # noqa: S324 - the test's stand-in formula
