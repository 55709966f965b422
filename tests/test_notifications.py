"""The notification outbox: rows per recipient, delivery by email (Django's mail backends)
and webhook (a real HTTP receiver on 127.0.0.1), retries with backoff, the claim, and the
webhook URL kept secret."""

from __future__ import annotations

import base64
import threading
from datetime import timedelta

import pytest
from django.conf import settings
from django.core import mail
from django.db import connections, transaction
from django.utils import timezone

from billing_ops.celery import app as celery_app
from billing_ops.models import Notification, NotificationStatus
from billing_ops.notifications import (
    MAX_ATTEMPTS,
    RETRY_BASE_DELAY_S,
    notification_claim,
    notifications_deliver_due,
    notifications_failed_recent,
    notify,
    webhook_display,
)
from tests.conftest import SECRET_PATH, Receiver, free_port_for_tests, wait_for


@pytest.fixture
def webhook_only(settings, receiver) -> Receiver:
    settings.ALERT_EMAILS = []
    settings.ALERT_WEBHOOK_URL = receiver.url
    return receiver


def make_due(notification: Notification) -> None:
    """Let the backoff pass (instead of sleeping through it)."""
    Notification.objects.filter(pk=notification.pk).update(next_attempt_at=timezone.now())


# --- Writing -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_writes_one_row_per_recipient_and_delivers_after_commit(
    settings, django_capture_on_commit_callbacks
) -> None:
    settings.ALERT_EMAILS = ["ops@example.com", "finance@example.com"]
    settings.ALERT_WEBHOOK_URL = "https://hooks.example.com/services/T0/B0/secret"

    with django_capture_on_commit_callbacks() as callbacks:
        rows = notify(subject="Dev: stuck\nlocks", body="178 runs", source="alert:12")

    assert len(callbacks) == 1  # one delivery request, after the commit
    assert [(n.channel, n.recipient) for n in rows] == [
        ("email", "ops@example.com"),
        ("email", "finance@example.com"),
        ("webhook", "https://hooks.example.com/services/T0/B0/secret"),
    ]
    stored = Notification.objects.get(channel="webhook")
    assert stored.subject == "Dev: stuck locks"  # one line: it becomes an email header
    assert stored.payload == {"text": "*Dev: stuck locks*\n178 runs"}
    assert (stored.status, stored.attempts, stored.source) == ("pending", 0, "alert:12")


@pytest.mark.django_db
def test_with_nobody_configured_nothing_is_written(settings) -> None:
    settings.ALERT_EMAILS = []
    settings.ALERT_WEBHOOK_URL = ""
    assert notify(subject="s", body="b", source="test") == []
    assert not Notification.objects.exists()


# --- Webhooks ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_webhook_is_posted_as_json_to_the_receiver(webhook_only) -> None:
    [row] = notify(subject="Test: 6 COMPLETED runs still hold 1,358 locks", body="details", source="alert:1")

    report = notifications_deliver_due()

    assert report.sent == [row.pk]
    assert webhook_only.requests == [
        {
            "path": SECRET_PATH,
            "content_type": "application/json",
            "json": {"text": "*Test: 6 COMPLETED runs still hold 1,358 locks*\ndetails"},
        }
    ]
    row.refresh_from_db()
    assert (row.status, row.attempts, row.last_error) == ("sent", 1, "")
    assert row.sent_at is not None
    assert webhook_only.authorizations == [None]
    assert notifications_deliver_due().sent == []  # sent once, never again


@pytest.mark.django_db
def test_credentials_in_a_webhook_url_are_sent_as_basic_auth(settings, receiver) -> None:
    settings.ALERT_EMAILS = []
    settings.ALERT_WEBHOOK_URL = receiver.url.replace("http://", "http://bot:p%40ss@")
    notify(subject="s", body="b", source="test")

    assert len(notifications_deliver_due().sent) == 1

    assert receiver.requests[0]["path"] == SECRET_PATH
    assert receiver.authorizations == ["Basic " + base64.b64encode(b"bot:p@ss").decode()]


@pytest.mark.django_db
def test_a_failed_post_is_retried_after_its_backoff(webhook_only) -> None:
    webhook_only.statuses = [500]
    [row] = notify(subject="s", body="b", source="test")

    started = timezone.now()
    assert notifications_deliver_due().retrying == [row.pk]

    row.refresh_from_db()
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.last_error == "HTTP 500 Internal Server Error"
    assert row.next_attempt_at - started >= timedelta(seconds=RETRY_BASE_DELAY_S)
    assert notifications_deliver_due().sent == []  # not before its time
    assert len(webhook_only.requests) == 1

    make_due(row)
    assert notifications_deliver_due().sent == [row.pk]
    row.refresh_from_db()
    assert (row.status, row.attempts, row.last_error) == ("sent", 2, "")
    assert len(webhook_only.requests) == 2


@pytest.mark.django_db
def test_the_backoff_doubles_and_it_gives_up_after_the_last_attempt(webhook_only) -> None:
    webhook_only.statuses = [503] * MAX_ATTEMPTS
    [row] = notify(subject="s", body="b", source="test")
    delays = []
    for _attempt in range(MAX_ATTEMPTS - 1):
        before = timezone.now()
        assert notifications_deliver_due().retrying == [row.pk]
        row.refresh_from_db()
        delays.append(round((row.next_attempt_at - before).total_seconds() / RETRY_BASE_DELAY_S))
        make_due(row)

    assert notifications_deliver_due().failed == [row.pk]

    assert delays[:4] == [1, 2, 4, 8]
    row.refresh_from_db()
    assert (row.status, row.attempts) == ("failed", MAX_ATTEMPTS)
    assert list(notifications_failed_recent()) == [row]
    assert notifications_deliver_due().failed == []  # failed rows are left alone


@pytest.mark.django_db
def test_an_unreachable_webhook_is_retried_and_its_url_is_never_shown(settings) -> None:
    port = free_port_for_tests()
    settings.ALERT_EMAILS = []
    settings.ALERT_WEBHOOK_URL = f"http://bot:pw@127.0.0.1:{port}{SECRET_PATH}?token=abc"
    [row] = notify(subject="s", body="b", source="test")

    assert notifications_deliver_due().retrying == [row.pk]

    row.refresh_from_db()
    assert "refused" in row.last_error.lower()
    assert row.recipient_display == f"http://127.0.0.1:{port}/…"
    for shown in (row.last_error, row.recipient_display, str(row)):
        assert "s3cret" not in shown and "pw" not in shown and "token" not in shown


def test_a_webhook_url_is_shown_as_its_scheme_and_host_only() -> None:
    assert webhook_display("https://hooks.slack.com/services/T0/B0/XYZ") == "https://hooks.slack.com/…"
    assert webhook_display("https://u:p@chat.example.com:8443/hook?t=1") == "https://chat.example.com:8443/…"
    assert webhook_display("https://example.com:99999/x") == "webhook (malformed URL)"


# --- Email --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_email_goes_through_djangos_mail_backend(settings) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.DEFAULT_FROM_EMAIL = "billing-ops@example.com"
    settings.ALERT_EMAILS = ["ops@example.com", "finance@example.com"]
    settings.ALERT_WEBHOOK_URL = ""
    rows = notify(subject="[Billing Ops] WARNING: Dev", body="178 runs", source="alert:3")

    assert sorted(notifications_deliver_due().sent) == sorted(r.pk for r in rows)

    assert sorted(m.to[0] for m in mail.outbox) == ["finance@example.com", "ops@example.com"]
    message = mail.outbox[0]
    assert (message.subject, message.body, message.from_email) == (
        "[Billing Ops] WARNING: Dev",
        "178 runs",
        "billing-ops@example.com",
    )
    assert set(Notification.objects.values_list("status", flat=True)) == {"sent"}


@pytest.mark.django_db
def test_an_email_the_server_refuses_is_retried(settings) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = free_port_for_tests()
    settings.EMAIL_TIMEOUT = 2
    settings.ALERT_EMAILS = ["ops@example.com"]
    settings.ALERT_WEBHOOK_URL = ""
    [row] = notify(subject="s", body="b", source="test")

    assert notifications_deliver_due().retrying == [row.pk]

    row.refresh_from_db()
    assert row.status == "pending" and row.attempts == 1
    assert row.last_error.startswith("ConnectionRefusedError")


# --- The claim ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_claimed_row_cannot_be_claimed_again() -> None:
    row = Notification.objects.create(channel="email", recipient="ops@example.com", subject="s", body="b")

    assert notification_claim(notification_id=row.pk, attempts=0) is not None
    assert notification_claim(notification_id=row.pk, attempts=0) is None
    assert notification_claim(notification_id=row.pk, attempts=1) is None  # leased, not due


@pytest.mark.django_db
def test_a_row_whose_worker_died_mid_send_is_sent_after_its_lease(webhook_only) -> None:
    [row] = notify(subject="s", body="b", source="test")
    assert notification_claim(notification_id=row.pk, attempts=0) is not None  # ...and then it died

    assert notifications_deliver_due().sent == []
    make_due(row)  # the lease ran out
    assert notifications_deliver_due().sent == [row.pk]
    assert len(webhook_only.requests) == 1


@pytest.mark.django_db(transaction=True)
def test_two_workers_never_send_the_same_notification(webhook_only) -> None:
    webhook_only.delay_s = 0.5  # both workers see the row as due before either finishes
    # Written directly: notify() would also ask this session's Celery worker, a third contender.
    row = Notification.objects.create(channel="webhook", recipient=webhook_only.url, subject="s", body="b")
    reports = []

    def worker() -> None:
        try:
            reports.append(notifications_deliver_due())
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(webhook_only.requests) == 1
    assert sorted(len(r.sent) for r in reports) == [0, 1]
    assert Notification.objects.get(pk=row.pk).status == NotificationStatus.SENT


# --- Through the real worker and beat's schedule ---------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_committed_notification_is_delivered_by_a_worker(webhook_only, celery_worker) -> None:
    with transaction.atomic():
        [row] = notify(subject="Dev: stuck locks", body="b", source="test")
        assert webhook_only.requests == []  # nothing leaves before the commit

    wait_for(lambda: webhook_only.requests, timeout_s=20, what="the worker to post the webhook")
    assert webhook_only.requests[0]["json"]["text"].startswith("*Dev: stuck locks*")
    wait_for(lambda: Notification.objects.get(pk=row.pk).status == "sent", what="the row to be marked sent")


def test_beat_delivers_due_notifications_every_30_seconds() -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["deliver-notifications"]
    assert entry["task"] == "billing_ops.tasks.deliver_notifications"
    assert entry["schedule"] == 30.0
    celery_app.loader.import_default_modules()
    assert entry["task"] in celery_app.tasks


# --- The outbox page ------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_outbox_page_lists_messages_without_any_webhook_secret(settings, viewer, client_for) -> None:
    settings.ALERT_EMAILS = ["ops@example.com"]
    settings.ALERT_WEBHOOK_URL = f"https://bot:pw@hooks.example.com{SECRET_PATH}?token=abc"
    notify(subject="Dev: lock release #41 succeeded", body="b", source="job:41")
    Notification.objects.filter(channel="email").update(status=NotificationStatus.SENT, attempts=1)

    page = client_for(viewer).get("/notifications/").content.decode()
    assert page.count("Dev: lock release #41 succeeded") == 2
    assert "ops@example.com" in page and "https://hooks.example.com/…" in page
    assert 'href="/jobs/41/"' in page
    for secret in ("s3cret", "token=abc", "bot:pw", SECRET_PATH):
        assert secret not in page

    notify(subject="Dev: stuck locks", body="b", source="alert:12")  # not a job: no link
    assert 'href="/jobs/12/"' not in client_for(viewer).get("/notifications/").content.decode()

    sent_only = client_for(viewer).get("/notifications/?status=sent").content.decode()
    assert "ops@example.com" in sent_only and "hooks.example.com" not in sent_only
