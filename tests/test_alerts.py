"""Alerts: one per environment and kind, opened, updated, escalated and resolved by the
snapshot rounds, each change notified once; acknowledgement rules."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from billing_ops.models import Notification
from locks.history import alerts_active, alerts_recent
from locks.models import Alert, AlertKind, AlertSeverity, AlertStatus, LockSnapshot
from locks.services import AlertEvent, alert_acknowledge, alerts_evaluate, snapshots_take
from locks.tasks import snapshot_environments
from tests.conftest import free_port_for_tests, make_user
from tests.test_history import add_locks, add_run, delete_locks

# Snapshots read environments on their own connections: see tests/test_history.py.
in_environments = pytest.mark.django_db(databases="__all__", transaction=True)


@pytest.fixture
def recipients(settings) -> None:
    """One email address and one webhook: every notice is two rows. The webhook points at
    a closed port, so a worker of this session that happens to deliver sends nothing."""
    settings.ALERT_EMAILS = ["ops@example.com"]
    settings.ALERT_WEBHOOK_URL = f"http://127.0.0.1:{free_port_for_tests()}/services/T0/B0/secret-token"


def monitor_round() -> list[AlertEvent]:
    """What the beat task does, minus retention."""
    return alerts_evaluate(snapshots_take())


def notices(alert: Alert) -> list[Notification]:
    return list(Notification.objects.filter(source=f"alert:{alert.pk}").order_by("id"))


def subjects(alert: Alert) -> list[str]:
    return [n.subject for n in notices(alert) if n.channel == "email"]


# --- Opening, updating, escalating, resolving (real environment data) -----------------------


@in_environments
def test_it_opens_one_alert_per_environment_not_one_per_run(
    unprotected_env, clean_environments, recipients
) -> None:
    env = unprotected_env
    for run_id, locks in ((1, 5), (2, 3), (3, 2)):
        add_run(env, run_id)
        add_locks(env, run_id, locks)

    events = monitor_round()

    alert = Alert.objects.get()
    assert [(e.event, e.alert.pk) for e in events] == [("opened", alert.pk)]
    assert (alert.environment, alert.kind) == (env.key, AlertKind.COMPLETED_WITH_LOCKS)
    assert (alert.status, alert.severity, alert.notified_severity) == ("open", "warning", "warning")
    assert alert.summary == f"{env.label}: 3 COMPLETED runs still hold 10 locks"
    assert [(r["id"], r["lock_count"]) for r in alert.details["runs"]] == [(1, 5), (2, 3), (3, 2)]
    assert alert.details["runs"][0]["number"] == "BILLING202512220001"
    assert alert.details["runs_total"] == 3
    assert alert.details["figures"]["stuck_locks"] == 10
    assert alert.details["snapshot_id"] == LockSnapshot.objects.get(environment=env.key).pk

    sent = notices(alert)
    assert sorted(n.channel for n in sent) == ["email", "webhook"]
    assert subjects(alert) == [f"[Billing Ops] WARNING: {alert.summary}"]
    webhook = next(n for n in sent if n.channel == "webhook")
    assert alert.summary in webhook.payload["text"] and "BILLING202512220001" in webhook.payload["text"]


@in_environments
def test_alert_texts_are_in_the_deployments_language_whoever_starts_the_round(
    unprotected_env, clean_environments, recipients
) -> None:
    """A round started while Georgian is active (a Georgian reader's request): the alert and
    its notices are read by everyone, later, so they are written in LANGUAGE_CODE."""
    import re

    from django.utils import translation

    add_run(unprotected_env, 1)
    add_locks(unprotected_env, 1, 4)
    with translation.override("ka"):
        monitor_round()
    alert = Alert.objects.get()
    assert alert.summary == f"{unprotected_env.label}: 1 COMPLETED run still holds 4 locks"
    texts = [alert.summary] + [f"{n.subject} {n.body} {n.payload}" for n in notices(alert)]
    assert not any(re.search("[\u10a0-\u10ff]", text) for text in texts), texts
    assert subjects(alert) == [f"[Billing Ops] WARNING: {alert.summary}"]


@in_environments
def test_a_later_round_updates_the_alert_without_notifying_again(
    unprotected_env, clean_environments, recipients
) -> None:
    env = unprotected_env
    add_run(env, 1)
    add_locks(env, 1, 5)
    monitor_round()
    alert = Alert.objects.get()
    add_run(env, 2)
    add_locks(env, 2, 1)

    events = monitor_round()

    assert [e.event for e in events] == ["updated"]
    updated = Alert.objects.get()
    assert updated.pk == alert.pk and updated.status == "open"
    assert updated.summary == f"{env.label}: 2 COMPLETED runs still hold 6 locks"
    assert updated.updated_at > alert.updated_at and updated.opened_at == alert.opened_at
    assert len(notices(alert)) == 2  # still only the opening notice (email + webhook)


@in_environments
def test_it_escalates_once_when_the_stuck_locks_pass_the_critical_count(
    unprotected_env, clean_environments, recipients, settings
) -> None:
    settings.ALERT_CRITICAL_LOCKS = 10
    env = unprotected_env
    add_run(env, 1)
    add_locks(env, 1, 10)
    monitor_round()
    alert = Alert.objects.get()
    assert alert.severity == "warning"

    add_run(env, 2)
    add_locks(env, 2, 1)  # 11 > 10
    assert [e.event for e in monitor_round()] == ["escalated"]
    alert.refresh_from_db()
    assert (alert.severity, alert.notified_severity) == ("critical", "critical")
    assert alert.details["severity_reasons"] == ["11 stuck locks (more than 10)"]
    assert subjects(alert)[-1] == f"[Billing Ops] ESCALATED to CRITICAL: {alert.summary}"

    # Staying critical, dropping back to warning and rising again: nobody is told again.
    monitor_round()
    delete_locks(env, billing_id=2)
    monitor_round()
    alert.refresh_from_db()
    assert alert.severity == "warning"
    add_locks(env, 2, 3)
    monitor_round()
    alert.refresh_from_db()
    assert alert.severity == "critical"
    assert len(subjects(alert)) == 2  # opened, escalated


@in_environments
def test_an_alert_opens_critical_when_the_oldest_stuck_lock_is_older_than_the_limit(
    unprotected_env, clean_environments, recipients, settings
) -> None:
    settings.ALERT_CRITICAL_AGE_H = 24
    env = unprotected_env
    add_run(env, 1)
    add_locks(env, 1, 2, created_ago=timedelta(hours=30))

    assert [e.event for e in monitor_round()] == ["opened"]
    alert = Alert.objects.get()
    assert (alert.severity, alert.notified_severity) == ("critical", "critical")
    assert alert.details["severity_reasons"] == ["the oldest stuck lock is 30 h old (more than 24 h)"]
    assert subjects(alert) == [f"[Billing Ops] CRITICAL: {alert.summary}"]

    monitor_round()
    assert len(subjects(alert)) == 1  # already critical when opened: no escalation notice


@in_environments
def test_it_resolves_the_alert_when_the_locks_are_gone(
    unprotected_env, clean_environments, recipients
) -> None:
    env = unprotected_env
    add_run(env, 1)
    add_locks(env, 1, 4)
    monitor_round()
    alert = Alert.objects.get()
    delete_locks(env)  # the cleanup ran

    events = monitor_round()

    assert [(e.event, e.alert.pk) for e in events] == [("resolved", alert.pk)]
    alert.refresh_from_db()
    assert alert.status == "resolved" and alert.resolved_at is not None
    assert subjects(alert)[-1] == f"[Billing Ops] RESOLVED: {alert.summary}"
    assert "No COMPLETED run holds locks any more." in notices(alert)[-1].body
    assert monitor_round() == []  # nothing to resolve twice
    assert list(alerts_active()) == []
    assert alerts_recent() == [alert]

    # The problem coming back is a new alert; the old one stays in the history.
    add_locks(env, 1, 1)
    monitor_round()
    reopened = Alert.objects.get(status="open")
    assert reopened.pk != alert.pk
    assert Alert.objects.get(pk=alert.pk).status == "resolved"


@in_environments
def test_stale_accounting_runs_raise_their_own_alert(
    unprotected_env, clean_environments, recipients, settings
) -> None:
    settings.STALE_RUN_AFTER_MIN = 120
    settings.ALERT_CRITICAL_AGE_H = 24
    env = unprotected_env
    add_run(env, 5, status="IN_PROGRESS_ACCOUNTING", modified_ago=timedelta(hours=3))
    add_locks(env, 5, 4)
    add_run(env, 6, status="IN_PROGRESS_ACCOUNTING", modified_ago=timedelta(minutes=5))  # still running
    add_locks(env, 6, 9)

    monitor_round()

    alert = Alert.objects.get()
    assert (alert.kind, alert.severity) == (AlertKind.STALE_RUNS, "warning")
    assert alert.summary == (
        f"{env.label}: 1 IN_PROGRESS_ACCOUNTING run unchanged for over 120 min, holding 4 locks"
    )
    assert [(r["id"], r["lock_count"]) for r in alert.details["runs"]] == [(5, 4)]
    assert alert.details["runs"][0]["modify_date"]

    add_run(env, 7, status="IN_PROGRESS_ACCOUNTING", modified_ago=timedelta(hours=30))
    assert [e.event for e in monitor_round()] == ["escalated"]
    alert.refresh_from_db()
    assert alert.severity == "critical"
    assert alert.details["severity_reasons"] == ["the oldest has been unchanged for 30 h (more than 24 h)"]


@in_environments
def test_an_unreachable_environment_leaves_its_alerts_as_they_are(
    unprotected_env, clean_environments, extra_environment, recipients
) -> None:
    down = extra_environment("down", f"postgresql://x@127.0.0.1:{free_port_for_tests()}/phoenix")
    opened_at = timezone.now() - timedelta(hours=2)
    kept = Alert.objects.create(
        environment=down.key,
        kind=AlertKind.COMPLETED_WITH_LOCKS,
        severity=AlertSeverity.WARNING,
        opened_at=opened_at,
        updated_at=opened_at,
        summary="down: 2 COMPLETED runs still hold 9 locks",
        notified_severity=AlertSeverity.WARNING,
    )
    # The same kind of alert in a reachable environment whose locks are gone does resolve.
    gone = Alert.objects.create(
        environment=unprotected_env.key,
        kind=AlertKind.COMPLETED_WITH_LOCKS,
        severity=AlertSeverity.WARNING,
        opened_at=opened_at,
        updated_at=opened_at,
        summary="was stuck",
    )

    events = monitor_round()

    assert [(e.event, e.alert.pk) for e in events] == [("resolved", gone.pk)]
    after = Alert.objects.get(pk=kept.pk)
    assert (after.status, after.updated_at, after.summary) == ("open", opened_at, kept.summary)
    assert notices(kept) == []
    assert LockSnapshot.objects.get(environment=down.key).reachable is False


@in_environments
def test_the_beat_task_snapshots_alerts_and_prunes(unprotected_env, clean_environments, recipients) -> None:
    old = LockSnapshot.objects.create(
        environment=unprotected_env.key,
        taken_at=timezone.now() - timedelta(days=400),
        reachable=True,
        verdict="green",
    )
    add_run(unprotected_env, 1)
    add_locks(unprotected_env, 1, 2)

    result = snapshot_environments()

    assert result["snapshots"][unprotected_env.key] == "red"
    assert result["pruned"] == 1 and not LockSnapshot.objects.filter(pk=old.pk).exists()
    alert = Alert.objects.get()
    assert result["alerts"] == [f"opened #{alert.pk} {unprotected_env.key} completed_with_locks"]


# --- Rules that need no environment data --------------------------------------------------


def stuck_snapshot(env_key: str, *, runs: int, locks: int, minutes_ago: int = 0) -> LockSnapshot:
    """An unsaved snapshot saying ``runs`` COMPLETED runs hold ``locks`` locks."""
    return LockSnapshot(
        environment=env_key,
        taken_at=timezone.now() - timedelta(minutes=minutes_ago),
        reachable=True,
        verdict="red" if runs else "green",
        completed_with_locks=runs,
        stuck_locks=locks,
        stale_runs=0,
        stale_runs_locks=0,
    )


@pytest.mark.django_db(databases="__all__")
def test_a_round_older_than_the_alerts_last_update_changes_nothing(unprotected_env, recipients) -> None:
    key = unprotected_env.key
    alerts_evaluate([stuck_snapshot(key, runs=1, locks=3)])
    # A slower round that started a minute earlier, when the locks were not there yet.
    assert alerts_evaluate([stuck_snapshot(key, runs=0, locks=0, minutes_ago=1)]) == []
    assert Alert.objects.get().status == "open"


@pytest.mark.django_db(databases="__all__")
def test_the_database_keeps_one_active_alert_per_environment_and_kind() -> None:
    def add(status: str) -> Alert:
        return Alert.objects.create(
            environment="dev",
            kind=AlertKind.COMPLETED_WITH_LOCKS,
            severity="warning",
            status=status,
            summary="x",
        )

    add("resolved")
    add("resolved")
    add("open")
    with pytest.raises(IntegrityError), transaction.atomic():
        add("acknowledged")
    add("resolved")  # history is unlimited beside the active one
    assert Alert.objects.exclude(status="resolved").count() == 1


@pytest.mark.django_db(databases="__all__")
def test_a_viewer_cannot_acknowledge_an_alert(unprotected_env, recipients) -> None:
    viewer = make_user("viewer-ack", "Viewer")
    alerts_evaluate([stuck_snapshot(unprotected_env.key, runs=1, locks=3)])
    alert = Alert.objects.get()

    with pytest.raises(PermissionDenied):
        alert_acknowledge(actor=viewer, alert_id=alert.pk)

    alert.refresh_from_db()
    assert alert.status == "open" and alert.acknowledged_by is None


@pytest.mark.django_db(databases="__all__")
def test_operators_and_approvers_acknowledge_and_the_alert_stays_active(
    unprotected_env, protected_env, recipients
) -> None:
    operator = make_user("operator-ack", "Operator")
    approver = make_user("approver-ack", "Approver")
    alerts_evaluate(
        [
            stuck_snapshot(unprotected_env.key, runs=1, locks=3),
            stuck_snapshot(protected_env.key, runs=2, locks=7),
        ]
    )
    first = Alert.objects.get(environment=unprotected_env.key)
    second = Alert.objects.get(environment=protected_env.key)

    alert_acknowledge(actor=operator, alert_id=first.pk)
    alert_acknowledge(actor=approver, alert_id=second.pk)
    alert_acknowledge(actor=approver, alert_id=first.pk)  # twice: harmless, the first one stays

    first.refresh_from_db()
    assert (first.status, first.acknowledged_by, first.acknowledged_at is not None) == (
        AlertStatus.ACKNOWLEDGED,
        operator,
        True,
    )
    assert Alert.objects.get(pk=second.pk).acknowledged_by == approver
    assert set(alerts_active()) == {first, second}


@pytest.mark.django_db(databases="__all__")
def test_an_acknowledged_alert_is_not_notified_when_it_escalates_but_is_when_resolved(
    unprotected_env, recipients, settings
) -> None:
    settings.ALERT_CRITICAL_LOCKS = 10
    key = unprotected_env.key
    alerts_evaluate([stuck_snapshot(key, runs=1, locks=3)])
    alert = Alert.objects.get()
    alert_acknowledge(actor=make_user("operator-esc", "Operator"), alert_id=alert.pk)

    assert [e.event for e in alerts_evaluate([stuck_snapshot(key, runs=5, locks=50)])] == ["updated"]
    alert.refresh_from_db()
    assert (alert.status, alert.severity) == ("acknowledged", "critical")
    assert len(subjects(alert)) == 1

    assert [e.event for e in alerts_evaluate([stuck_snapshot(key, runs=0, locks=0)])] == ["resolved"]
    assert subjects(alert)[-1].startswith("[Billing Ops] RESOLVED")


@pytest.mark.django_db(databases="__all__")
def test_acknowledging_a_resolved_alert_is_refused(unprotected_env, recipients) -> None:
    key = unprotected_env.key
    alerts_evaluate([stuck_snapshot(key, runs=1, locks=3)])
    alerts_evaluate([stuck_snapshot(key, runs=0, locks=0)])

    with pytest.raises(ValidationError):
        alert_acknowledge(actor=make_user("operator-late", "Operator"), alert_id=Alert.objects.get().pk)


@pytest.mark.django_db(databases="__all__")
def test_active_alerts_list_critical_first(unprotected_env, protected_env, recipients, settings) -> None:
    settings.ALERT_CRITICAL_LOCKS = 10
    alerts_evaluate([stuck_snapshot(unprotected_env.key, runs=1, locks=3)])
    alerts_evaluate([stuck_snapshot(protected_env.key, runs=2, locks=70)])  # newer, critical
    alerts_evaluate([stuck_snapshot("nowhere", runs=2, locks=70)])  # not configured: ignored

    active = list(alerts_active())

    assert [(a.environment, a.severity) for a in active] == [
        (protected_env.key, "critical"),
        (unprotected_env.key, "warning"),
    ]
    assert list(alerts_active(environment=unprotected_env.key)) == [active[1]]
    assert alerts_recent(include_active=True) == [active[0], active[1]]
