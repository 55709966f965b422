"""Mirror of ``lock.locks`` in an environment database (unmanaged; use ``.using(env.alias)``),
and the stuck-lock monitor's own records (snapshots and alerts), which live in ``default``."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class Lock(models.Model):
    environment_mirror = True

    id = models.TextField(primary_key=True)
    lock_key = models.TextField()
    entity_type = models.TextField()
    entity_id = models.TextField()
    # No foreign key: the platform has none, and a lock may outlive its run.
    billing_id = models.BigIntegerField(null=True)
    system_lock = models.BooleanField()

    class Meta:
        managed = False
        db_table = 'lock"."locks'

    def __str__(self) -> str:
        return self.lock_key


# --- The monitor's own records (managed, in `default`) ------------------------------------


class VerdictColour(models.TextChoices):
    GREEN = "green", _("Green")
    AMBER = "amber", _("Amber")
    RED = "red", _("Red")


# The figures a snapshot copies from locks.selectors.LockFigures, by the same names.
SNAPSHOT_FIGURE_FIELDS = (
    "total_runs",
    "completed_runs",
    "completed_with_locks",
    "total_locks",
    "locks_without_billing",
    "stuck_locks",
    "stale_runs",
    "stale_runs_locks",
    "error_path_runs_with_locks",
    "unreal_completed_runs",
    "oldest_stuck_lock_at",
)


class LockSnapshot(models.Model):
    """One environment's stuck-lock figures at one moment, for history and trends.

    Every snapshot round writes one row per configured environment, unreachable ones too
    (``reachable`` False, the error kept, figures NULL): a gap in the history is then a
    fact on record, not a missing row.
    """

    environment = models.CharField(max_length=32)
    taken_at = models.DateTimeField(default=timezone.now)
    reachable = models.BooleanField()
    error = models.TextField(blank=True)
    verdict = models.CharField(max_length=8, choices=VerdictColour.choices)

    total_runs = models.IntegerField(null=True)
    completed_runs = models.IntegerField(null=True)
    completed_with_locks = models.IntegerField(null=True)
    total_locks = models.BigIntegerField(null=True)
    locks_without_billing = models.BigIntegerField(null=True)
    stuck_locks = models.BigIntegerField(null=True)  # locks held by COMPLETED runs
    stale_runs = models.IntegerField(null=True)
    stale_runs_locks = models.BigIntegerField(null=True)
    error_path_runs_with_locks = models.IntegerField(null=True)
    unreal_completed_runs = models.IntegerField(null=True)
    oldest_stuck_lock_at = models.DateTimeField(null=True)
    # NULL when unreachable (unknown); False also when the procedure is missing.
    procedure_deletes_locks = models.BooleanField(null=True)

    class Meta:
        ordering = ["-taken_at", "environment"]
        indexes = [
            models.Index(fields=["environment", "-taken_at"], name="locksnapshot_env_taken_idx"),
            # Retention deletes by age across environments.
            models.Index(fields=["taken_at"], name="locksnapshot_taken_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(verdict__in=[v.value for v in VerdictColour]),
                name="locksnapshot_verdict_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.environment} at {self.taken_at.isoformat(timespec='seconds')}"

    @property
    def environment_label(self) -> str:
        from billing_ops.environments import environment_label

        return environment_label(self.environment)


class AlertKind(models.TextChoices):
    COMPLETED_WITH_LOCKS = "completed_with_locks", _("COMPLETED runs still holding locks")
    STALE_RUNS = "stale_runs", _("IN_PROGRESS_ACCOUNTING runs unchanged for too long")
    # Raised by a chain verification (audit.verification), not by the snapshots; its
    # environment is "" for the dashboard's own audit trail.
    AUDIT_CHAIN_BROKEN = "audit_chain_broken", _("Audit hash chain broken")


class AlertSeverity(models.TextChoices):
    WARNING = "warning", _("Warning")
    CRITICAL = "critical", _("Critical")


class AlertStatus(models.TextChoices):
    OPEN = "open", _("Open")
    ACKNOWLEDGED = "acknowledged", _("Acknowledged")
    RESOLVED = "resolved", _("Resolved")


ACTIVE_ALERT_STATUSES = (AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED)


class Alert(models.Model):
    """A problem in one environment (or, with ``environment`` empty, in the dashboard's own
    audit trail), for as long as it lasts.

    One row per (environment, kind) while it is active, however many runs are involved:
    Dev's 178 stuck runs are one alert and one notification, not 178. The database holds
    that rule (a partial unique constraint), so two evaluations racing cannot open two.
    ``updated_at`` is the time of the snapshot that last changed it (not acknowledgements).
    """

    environment = models.CharField(max_length=32)
    kind = models.CharField(max_length=32, choices=AlertKind.choices)
    severity = models.CharField(max_length=16, choices=AlertSeverity.choices)
    status = models.CharField(max_length=16, choices=AlertStatus.choices, default=AlertStatus.OPEN)
    opened_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    resolved_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    summary = models.TextField()
    # The figures and up to 20 runs (id, number, lock_count), as of the last update.
    details = models.JSONField(default=dict)
    # The highest severity anyone was told about: a later rise to it notifies nobody again.
    notified_severity = models.CharField(max_length=16, choices=AlertSeverity.choices, blank=True)

    class Meta:
        ordering = ["-opened_at"]
        indexes = [
            models.Index(fields=["status", "-opened_at"], name="alert_status_opened_idx"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["environment", "kind"],
                condition=~models.Q(status=AlertStatus.RESOLVED),
                name="alert_one_active_per_env_kind",
            ),
            models.CheckConstraint(
                condition=models.Q(kind__in=[k.value for k in AlertKind]), name="alert_kind_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(severity__in=[s.value for s in AlertSeverity]), name="alert_severity_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(status__in=[s.value for s in AlertStatus]), name="alert_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.environment} {self.kind} ({self.status})"

    @property
    def environment_label(self) -> str:
        from billing_ops.environments import environment_label

        return environment_label(self.environment)

    @property
    def is_active(self) -> bool:
        return self.status != AlertStatus.RESOLVED


# --- Lock release (cleanup) -----------------------------------------------------------------


class ReleasePlanStatus(models.TextChoices):
    DRAFT = "draft", _("Preview")
    REQUESTED = "requested", _("Requested")


class LockReleasePlan(models.Model):
    """What a cleanup will delete, fixed when it is previewed.

    The preview materialises the exact lock rows (LockReleaseItem) so that the job deletes
    exactly what the requester — and in protected environments the approver — saw, never
    rows that appeared or changed since. ``digest`` is a sha256 over those rows; the job's
    parameters carry it, so an approval is an approval of these rows.
    """

    environment = models.CharField(max_length=32)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    system_only = models.BooleanField(default=False)
    scheduled = models.BooleanField(default=False)
    status = models.CharField(
        max_length=16, choices=ReleasePlanStatus.choices, default=ReleasePlanStatus.DRAFT
    )
    run_ids = models.JSONField(default=list)
    # Per run: number, status, process stage and lock counts by entity type; and the runs
    # that were asked for but are not eligible, with the reason.
    summary = models.JSONField(default=dict)
    lock_count = models.BigIntegerField(default=0)
    digest = models.CharField(max_length=64)
    # The lock table had a create_date column when the plan was made (restore puts it back).
    has_create_date = models.BooleanField(default=False)
    # The oldest transaction still running when the preview read the rows (its snapshot's
    # xmin, as a 32-bit xid) and the lock table's file node then: a tuple at a planned ctid
    # whose xmin precedes the horizon, in the same file, is the very tuple the preview read,
    # unchanged (any update or re-insert makes a tuple with a newer xmin). NULL: plans made
    # before this existed; their batches are compared row by row.
    xmin_horizon = models.BigIntegerField(null=True, blank=True)
    table_filenode = models.BigIntegerField(null=True, blank=True)
    restored_by_job = models.ForeignKey(
        "billing_ops.Job", on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"release plan #{self.pk} ({self.environment}, {self.lock_count} locks)"


class LockReleaseItem(models.Model):
    """One lock row of a plan, as it was when previewed (and as it is restored)."""

    plan = models.ForeignKey(LockReleasePlan, on_delete=models.CASCADE, related_name="items")
    billing_id = models.BigIntegerField()
    batch_no = models.IntegerField()
    lock_id = models.TextField()
    lock_key = models.TextField()
    entity_type = models.TextField()
    entity_id = models.TextField()
    system_lock = models.BooleanField()
    create_date = models.DateTimeField(null=True)
    # Where the row was at preview time (its ctid: heap block and line pointer).
    block = models.BigIntegerField(default=0)
    line = models.IntegerField(default=0)

    class Meta:
        indexes = [models.Index(fields=["plan", "billing_id", "batch_no"], name="release_item_batch_idx")]
        constraints = [models.UniqueConstraint(fields=["plan", "lock_id"], name="release_item_unique_lock")]

    def __str__(self) -> str:
        return self.lock_key


class ReleaseBatchStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    DELETING = "deleting", _("Deleting")  # started; if the worker died here, resume settles it
    DONE = "done", _("Done")
    SKIPPED = "skipped", _("Skipped")


class LockReleaseBatch(models.Model):
    """A slice of one run's planned locks, deleted in one short transaction."""

    plan = models.ForeignKey(LockReleasePlan, on_delete=models.CASCADE, related_name="batches")
    billing_id = models.BigIntegerField()
    batch_no = models.IntegerField()
    size = models.IntegerField()
    # Where the batch's rows were at preview time: their ctids, as a PostgreSQL tid[]
    # literal, so that the job finds them by a TID scan of exactly those tuples; and how
    # many of each entity type they are (see locks.release).
    tids = models.TextField(default="")
    by_entity_type = models.JSONField(default=dict)
    status = models.CharField(
        max_length=16, choices=ReleaseBatchStatus.choices, default=ReleaseBatchStatus.PENDING
    )
    deleted_count = models.IntegerField(default=0)
    # Planned rows that were no longer there (or had changed) when the batch ran.
    gone_ids = models.JSONField(default=list)
    note = models.TextField(blank=True)
    done_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["billing_id", "batch_no"]
        constraints = [
            models.UniqueConstraint(fields=["plan", "billing_id", "batch_no"], name="release_batch_unique"),
        ]

    def __str__(self) -> str:
        return f"plan {self.plan_id} run {self.billing_id} batch {self.batch_no}"


class CleanupPolicy(models.Model):
    """Whether the scheduled cleanup releases an environment's eligible locks.

    Without a row: on in unprotected environments, off in protected ones. Enabled in a
    protected environment, the schedule only opens requests an approver must decide on.
    """

    environment = models.CharField(max_length=32, unique=True)
    enabled = models.BooleanField()
    system_only = models.BooleanField(default=False)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.environment}: {'on' if self.enabled else 'off'}"
