"""Mirror of ``public.invoice_lines`` in an environment database (unmanaged)."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class InvoiceLine(models.Model):
    environment_mirror = True

    id = models.UUIDField(primary_key=True)
    invoice_id = models.TextField()
    unit_id = models.TextField()
    line_type = models.TextField()
    description = models.TextField()
    normalized_description = models.TextField()
    quantity = models.DecimalField(max_digits=18, decimal_places=6)
    amount = models.DecimalField(max_digits=18, decimal_places=2)
    created_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "invoice_lines"

    def __str__(self) -> str:
        return f"{self.invoice_id}/{self.unit_id}/{self.line_type}"


class UpsertRunStatus(models.TextChoices):
    PENDING = "pending", "pending"
    RUNNING = "running", "running"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"


class UpsertRun(models.Model):
    """One batch upsert of missing invoice lines (runbook §3), in the dashboard's database.

    A real run's ``run_id`` is unique per environment, whether it succeeded or failed
    (runbook §5.3: a retry takes a new run id); dry runs reserve nothing.
    """

    environment = models.CharField(max_length=200)
    run_id = models.CharField(max_length=200)
    dry_run = models.BooleanField(default=False)
    job = models.ForeignKey(
        "billing_ops.Job", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    status = models.CharField(max_length=16, choices=UpsertRunStatus.choices, default=UpsertRunStatus.PENDING)
    csv_name = models.CharField(max_length=500)
    csv_sha256 = models.CharField(max_length=64, blank=True)
    csv_bytes = models.BigIntegerField(default=0)
    batch_size = models.PositiveIntegerField()
    rows_streamed = models.BigIntegerField(default=0)
    inserted = models.BigIntegerField(default=0)
    updated = models.BigIntegerField(default=0)
    unchanged = models.BigIntegerField(default=0)
    duplicates = models.BigIntegerField(default=0)
    duration_ms = models.BigIntegerField(null=True, blank=True)
    started_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["environment", "run_id"],
                condition=models.Q(dry_run=False),
                name="upsert_run_id_unique_per_environment",
            )
        ]

    def __str__(self) -> str:
        return f"{self.environment}:{self.run_id}"


class RollbackStatus(models.TextChoices):
    REQUESTED = "requested", "requested"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"


class RunRollback(models.Model):
    """A rollback of one upsert run (runbook §6.2), requested with its preview's digest.

    At most one per run is requested or done (a partial unique constraint): a second
    rollback of a run is refused by the database, not only by a check. A rollback that
    failed, was refused or cancelled frees the run for a new request. Runs of the old
    script, recorded only in ``audit_logs``, are rolled back the same way: the run is named
    by its run id, not by an ``UpsertRun``.
    """

    environment = models.CharField(max_length=200)
    run_id = models.CharField(max_length=200)
    job = models.OneToOneField("billing_ops.Job", on_delete=models.PROTECT, related_name="+")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    reason = models.TextField()
    # sha256 over the preview (reconciliation.rollback): what the approver approves.
    preview_digest = models.CharField(max_length=64)
    planned_delete = models.BigIntegerField(default=0)
    planned_restore = models.BigIntegerField(default=0)
    planned_conflicts = models.BigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=RollbackStatus.choices, default=RollbackStatus.REQUESTED)
    deleted = models.BigIntegerField(default=0)
    restored = models.BigIntegerField(default=0)
    skipped = models.BigIntegerField(default=0)
    requested_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["environment", "run_id"],
                condition=models.Q(status__in=["requested", "succeeded"]),
                name="rollback_once_per_run",
            ),
            models.CheckConstraint(
                condition=models.Q(status__in=["requested", "succeeded", "failed"]),
                name="rollback_status_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"rollback of {self.environment}:{self.run_id} ({self.status})"
