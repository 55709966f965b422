"""The notification outbox: tell people by email or webhook, reliably and once.

``notify()`` only writes rows — in the caller's transaction, so a notice exists exactly
when the change it tells of was committed — and asks a worker to deliver them after the
commit. Beat also runs the delivery every ``NOTIFICATION_DELIVER_INTERVAL_S``, so rows
written while Redis or every worker was down go out when they are back.

Delivery claims a row before sending it, with a conditional UPDATE that moves its
``next_attempt_at`` a lease into the future (``... WHERE status = 'pending' AND
next_attempt_at <= now() AND attempts = <seen>``): of two workers looking at the same row,
one updates it and the other updates nothing and moves on. A worker that dies while
sending leaves the row pending; it is due again when the lease runs out, so a message can
be sent twice in that rare case but is never lost. A failed send is retried with
exponential backoff until ``MAX_ATTEMPTS``, then marked failed for people to see.

Webhook URLs are credentials: they are stored, but only ``webhook_display()`` of one is
ever shown, and error texts are scrubbed of it.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from billing_ops.models import Notification, NotificationChannel, NotificationStatus

logger = logging.getLogger(__name__)

WEBHOOK_TIMEOUT_S = 5
# A claimed row is due again after this long: above the slowest send (SMTP timeout 10 s,
# webhook 5 s), so only a worker that died mid-send lets a second one retry it.
CLAIM_LEASE_S = 120
RETRY_BASE_DELAY_S = 30
RETRY_MAX_DELAY_S = 3600
MAX_ATTEMPTS = 8  # 30 s, 1, 2, 4, 8, 16, 32 min between them: about an hour in all
DELIVER_BATCH_SIZE = 50
SUBJECT_MAX_CHARS = 200
ERROR_MAX_CHARS = 1000
WEBHOOK_RESPONSE_MAX_BYTES = 64 * 1024
FAILED_RECENT_DAYS = 7


# --- Writing ------------------------------------------------------------------------------


def notify(*, subject: str, body: str, source: str) -> list[Notification]:
    """Queue an alert for every configured alert recipient (``ALERT_EMAILS`` and
    ``ALERT_WEBHOOK_URL``); delivered after the commit. See ``_queue``."""
    return _queue(
        emails=settings.ALERT_EMAILS,
        email_subject=subject,
        email_body=body,
        webhook_url=settings.ALERT_WEBHOOK_URL,
        webhook_text=f"*{' '.join(subject.split())[:SUBJECT_MAX_CHARS]}*\n{body}",
        source=source,
    )


def notify_stakeholders(
    *, email_subject: str, email_body: str, ops_text: str, source: str
) -> list[Notification]:
    """Tell the people runbook §6.3 names that data was put back (a rollback, a restore):
    the ops channel (``OPS_WEBHOOK_URL``) gets ``ops_text`` as it is (one line, e.g.
    ``🔴 Rollback executed for run <RUN_ID>. Reason: <reason>``); the product owner and
    finance (``STAKEHOLDER_EMAILS``) get the email. Call it in the transaction that
    records the change."""
    return _queue(
        emails=settings.STAKEHOLDER_EMAILS,
        email_subject=email_subject,
        email_body=email_body,
        webhook_url=settings.OPS_WEBHOOK_URL,
        webhook_text=ops_text,
        source=source,
    )


def _queue(
    *,
    emails: list[str],
    email_subject: str,
    email_body: str,
    webhook_url: str,
    webhook_text: str,
    source: str,
) -> list[Notification]:
    """Write one outbox row per recipient, so that a refused address is retried on its
    own, and ask for delivery after the commit. With nobody configured, nothing is written."""
    # Email headers cannot carry line breaks, and chat titles should stay one line.
    subject = " ".join(email_subject.split())[:SUBJECT_MAX_CHARS]
    rows = [
        Notification(channel=NotificationChannel.EMAIL, recipient=address, subject=subject, body=email_body)
        for address in emails
    ]
    if webhook_url:
        rows.append(
            Notification(
                channel=NotificationChannel.WEBHOOK,
                recipient=webhook_url,
                subject=subject,
                body=email_body,
                payload={"text": webhook_text},  # Slack's (and Mattermost's) format
            )
        )
    if not rows:
        logger.info("no notification recipients configured; not sending %r", subject)
        return []
    for row in rows:
        row.source = source[:100]
    created = Notification.objects.bulk_create(rows)
    transaction.on_commit(_deliver_soon)
    return created


def _deliver_soon() -> None:
    """Ask a worker to deliver now. Never raises: beat delivers later if this fails."""
    from billing_ops.celery import app
    from billing_ops.tasks import deliver_notifications

    try:
        # Its own connection with the broker's short connect timeout (see job_dispatch).
        with app.connection_for_write() as connection:
            deliver_notifications.apply_async(connection=connection, retry=False)  # type: ignore[call-arg]
    except Exception as exc:  # kombu/redis errors: the broker is unreachable
        logger.warning("could not ask for notification delivery now (beat will): %s", exc)


# --- Delivering ---------------------------------------------------------------------------


@dataclass
class DeliveryReport:
    sent: list[int] = field(default_factory=list)
    retrying: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


def notifications_deliver_due(*, limit: int = DELIVER_BATCH_SIZE) -> DeliveryReport:
    """Send the pending notifications that are due, oldest first; return what happened."""
    report = DeliveryReport()
    due = list(
        Notification.objects.filter(status=NotificationStatus.PENDING, next_attempt_at__lte=timezone.now())
        .order_by("next_attempt_at", "id")
        .values_list("pk", "attempts")[:limit]
    )
    for notification_id, attempts in due:
        notification = notification_claim(notification_id=notification_id, attempts=attempts)
        if notification is None:
            continue  # another worker has it
        outcome = notification_send(notification=notification)
        {"sent": report.sent, "retrying": report.retrying, "failed": report.failed}[outcome].append(
            notification_id
        )
    return report


def notification_claim(*, notification_id: int, attempts: int) -> Notification | None:
    """Take a due row for this worker (see the module docstring); None if someone else did."""
    now = timezone.now()
    claimed = Notification.objects.filter(
        pk=notification_id,
        status=NotificationStatus.PENDING,
        next_attempt_at__lte=now,
        attempts=attempts,
    ).update(attempts=F("attempts") + 1, next_attempt_at=now + timedelta(seconds=CLAIM_LEASE_S))
    if not claimed:
        return None
    return Notification.objects.get(pk=notification_id)


def notification_send(*, notification: Notification) -> str:
    """Send one claimed notification and record the outcome: 'sent', 'retrying' or 'failed'."""
    try:
        if notification.channel == NotificationChannel.EMAIL:
            _send_email(notification)
        else:
            _post_webhook(notification)
    except Exception as exc:  # every failure of a send is recorded on the row, none escapes
        error = _describe_send_error(exc, notification)
        # The row is ours until the lease ends; match `attempts` so a late write of a worker
        # whose lease ran out cannot overwrite what a newer attempt recorded.
        mine = Notification.objects.filter(
            pk=notification.pk, status=NotificationStatus.PENDING, attempts=notification.attempts
        )
        if notification.attempts >= MAX_ATTEMPTS:
            mine.update(status=NotificationStatus.FAILED, last_error=error)
            logger.error("notification %s failed for good: %s", notification.pk, error)
            return "failed"
        mine.update(last_error=error, next_attempt_at=timezone.now() + retry_delay(notification.attempts))
        logger.warning("notification %s attempt %s failed: %s", notification.pk, notification.attempts, error)
        return "retrying"
    Notification.objects.filter(pk=notification.pk, attempts=notification.attempts).update(
        status=NotificationStatus.SENT, sent_at=timezone.now(), last_error=""
    )
    return "sent"


def retry_delay(attempts: int) -> timedelta:
    """Exponential backoff after the ``attempts``-th failed attempt (1 -> 30 s, 2 -> 60 s...)."""
    return timedelta(seconds=min(RETRY_BASE_DELAY_S * 2 ** max(attempts - 1, 0), RETRY_MAX_DELAY_S))


def _send_email(notification: Notification) -> None:
    send_mail(
        notification.subject,
        notification.body,
        settings.DEFAULT_FROM_EMAIL,
        [notification.recipient],
        fail_silently=False,
    )


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A webhook that redirects is misconfigured; following it would re-post the message
    (and the URL's secret path) wherever the redirect points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_webhook_opener = urllib.request.build_opener(_NoRedirects)


def _post_webhook(notification: Notification) -> None:
    parts = urlsplit(notification.recipient)
    if parts.scheme not in ("http", "https"):  # urllib would also open file:// URLs
        raise ValueError("the webhook URL is not http(s)")
    headers = {"Content-Type": "application/json", "User-Agent": "billing-ops"}
    if parts.username is not None:
        # urllib cannot read credentials in a URL (it takes them for part of the host name).
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        urlunsplit(parts), data=json.dumps(notification.payload).encode(), headers=headers, method="POST"
    )
    # urllib raises HTTPError for 4xx/5xx (and, with redirects refused, for 3xx).
    with _webhook_opener.open(request, timeout=WEBHOOK_TIMEOUT_S) as response:
        response.read(WEBHOOK_RESPONSE_MAX_BYTES)


def _describe_send_error(exc: BaseException, notification: Notification) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        text = f"HTTP {exc.code} {exc.reason}"
    elif isinstance(exc, urllib.error.URLError):
        text = f"{type(exc).__name__}: {exc.reason}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    # No library we use puts the URL in its message; this makes sure of it.
    text = text.replace(notification.recipient, notification.recipient_display)
    return text[:ERROR_MAX_CHARS]


# --- Display and reads ----------------------------------------------------------------------


def webhook_display(url: str) -> str:
    """A webhook URL without its secret parts: scheme and host only (no path, no userinfo)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed port
        return "webhook (malformed URL)"
    return f"{parts.scheme}://{host}{port}/…"


def notifications_failed_recent(*, days: int = FAILED_RECENT_DAYS) -> QuerySet[Notification]:
    """Notifications that were given up on in the last ``days`` days, newest first."""
    since: datetime = timezone.now() - timedelta(days=days)
    return Notification.objects.filter(status=NotificationStatus.FAILED, created_at__gte=since).order_by(
        "-id"
    )
