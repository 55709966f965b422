"""The billing-run mirror and the job/approval core shared by every app.

``BillingRun`` mirrors ``billing.billings`` in an environment database (unmanaged, never
migrated, always queried with ``.using(env.alias)``). ``Job`` and ``JobLogLine`` are the
dashboard's own and live only in ``default``.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class BillingRun(models.Model):
    environment_mirror = True

    id = models.BigIntegerField(primary_key=True)
    billing_number = models.TextField()
    # A PostgreSQL enum (billing.billing_status); its labels are read from the database
    # (selectors.billing_statuses), never hard-coded here.
    status = models.TextField()
    process_stage = models.TextField()
    create_date = models.DateTimeField()
    modify_date = models.DateTimeField()

    class Meta:
        managed = False
        db_table = 'billing"."billings'
        ordering = ["-id"]

    def __str__(self) -> str:
        return self.billing_number


class JobStatus(models.TextChoices):
    AWAITING_APPROVAL = "awaiting_approval", _("Awaiting approval")
    QUEUED = "queued", _("Queued")
    RUNNING = "running", _("Running")
    SUCCEEDED = "succeeded", _("Succeeded")
    FAILED = "failed", _("Failed")
    CANCELLED = "cancelled", _("Cancelled")
    REFUSED = "refused", _("Refused")


ACTIVE_STATUSES = (JobStatus.AWAITING_APPROVAL, JobStatus.QUEUED, JobStatus.RUNNING)
FINISHED_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.REFUSED)


class Job(models.Model):
    """One unit of heavy work, recorded before it is sent to Celery.

    The row is the truth: Celery messages only carry its id. A worker claims it with a
    conditional UPDATE (queued -> running), so a redelivered message never runs it twice;
    the sweeper re-sends jobs whose message was lost and fails (or resumes) jobs whose
    worker stopped sending heartbeats.
    """

    kind = models.CharField(max_length=64)
    environment = models.CharField(max_length=32, blank=True)
    params = models.JSONField(default=dict)
    # sha256 of the canonical JSON of (kind, environment, params): an approval is for this.
    params_digest = models.CharField(max_length=64)
    status = models.CharField(max_length=32, choices=JobStatus.choices, default=JobStatus.QUEUED)

    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, related_name="+"
    )
    requested_at = models.DateTimeField(auto_now_add=True)
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    approved_at = models.DateTimeField(null=True, blank=True)
    approved_digest = models.CharField(max_length=64, blank=True)
    decision_comment = models.TextField(blank=True)

    dispatched_at = models.DateTimeField(null=True, blank=True)
    dispatch_count = models.PositiveIntegerField(default=0)
    dispatch_error = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=255, blank=True)
    cancel_requested = models.BooleanField(default=False)

    progress_done = models.BigIntegerField(default=0)
    progress_total = models.BigIntegerField(null=True, blank=True)
    progress_message = models.CharField(max_length=500, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["status", "dispatched_at"], name="job_status_dispatched_idx"),
            models.Index(fields=["environment", "kind", "status"], name="job_env_kind_status_idx"),
        ]
        permissions = [
            ("view_dashboard", "Can view the dashboard (viewer)"),
            ("queue_job", "Can queue jobs (operator)"),
            ("approve_job", "Can approve or refuse jobs (approver)"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(status__in=[s.value for s in JobStatus]), name="job_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.kind} {self.environment}"

    @property
    def kind_label(self) -> str:
        from billing_ops.job_kinds import kind_label

        return str(kind_label(self.kind))

    @property
    def environment_label(self) -> str:
        from billing_ops.environments import environment_label

        return environment_label(self.environment) if self.environment else ""

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def progress_percent(self) -> int | None:
        if self.status == JobStatus.SUCCEEDED:
            return 100
        if not self.progress_total:
            return None
        return min(100, int(100 * self.progress_done / self.progress_total))


class JobClaim(models.Model):
    """A unique key an active job holds, e.g. ``lock-release:dev:run:36870``.

    The unique index is the database-level guard that two active jobs never work on the
    same thing (one cleanup per environment and run); a second request fails to insert and
    is told which job holds the key. Claims are deleted when their job settles.
    """

    key = models.CharField(max_length=200, unique=True)
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="claims")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.key


class JobLogLine(models.Model):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="log_lines")
    at = models.DateTimeField(auto_now_add=True)
    level = models.CharField(max_length=10, default="info")
    message = models.TextField()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.message


# --- Notification outbox -------------------------------------------------------------------


class NotificationChannel(models.TextChoices):
    EMAIL = "email", _("Email")
    WEBHOOK = "webhook", _("Webhook")


class NotificationStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    SENT = "sent", _("Sent")
    FAILED = "failed", _("Failed")


class Notification(models.Model):
    """One message to one recipient, written in the same transaction as the change it tells
    of and delivered afterwards by ``billing_ops.notifications`` (see there for the claim
    and the retries). A worker that is down delays a message; it never loses one."""

    channel = models.CharField(max_length=16, choices=NotificationChannel.choices)
    # An email address, or a webhook URL: the URL is a credential (whoever has it can post),
    # so pages, logs and errors show only ``recipient_display``.
    recipient = models.TextField()
    subject = models.CharField(max_length=255)
    body = models.TextField()
    payload = models.JSONField(default=dict, blank=True)  # what a webhook receives
    status = models.CharField(
        max_length=16, choices=NotificationStatus.choices, default=NotificationStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    source = models.CharField(max_length=100, blank=True)  # e.g. "alert:12"

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(status="pending"),
                name="notification_due_idx",
            ),
            models.Index(fields=["source"], name="notification_source_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(channel__in=[c.value for c in NotificationChannel]),
                name="notification_channel_valid",
            ),
            models.CheckConstraint(
                condition=models.Q(status__in=[s.value for s in NotificationStatus]),
                name="notification_status_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.channel} to {self.recipient_display}: {self.subject}"

    @property
    def job_id(self) -> int | None:
        """The job this message tells of (source ``job:N``), if any."""
        kind, _sep, number = self.source.partition(":")
        return int(number) if kind == "job" and number.isdigit() else None

    @property
    def recipient_display(self) -> str:
        if self.channel == NotificationChannel.WEBHOOK:
            from billing_ops.notifications import webhook_display

            return webhook_display(self.recipient)
        return self.recipient


# --- Per-user display preferences -------------------------------------------------------------


class UserPreference(models.Model):
    """How one user reads the dashboard: language and display time zone. Empty means the
    deployment's default (``LANGUAGE_CODE``, ``TIME_ZONE``); see ``billing_ops.preferences``."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="preference")
    language = models.CharField(max_length=8, blank=True)
    time_zone = models.CharField(max_length=64, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.user_id}: {self.language or '-'} {self.time_zone or '-'}"
