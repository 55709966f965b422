"""The audit models: the mirror of an environment's ``public.audit_logs`` (unmanaged), and
the dashboard's own audit trail of operator actions (``AuditEntry``, in ``default``)."""

from __future__ import annotations

from typing import Any, NoReturn

from django.conf import settings
from django.db import models
from django.db.models.functions import Coalesce
from django.utils.translation import gettext_lazy as _


class AuditLog(models.Model):
    environment_mirror = True

    id = models.BigIntegerField(primary_key=True)
    action = models.TextField()
    record_id = models.TextField(null=True)
    old_data = models.JSONField(null=True)
    new_data = models.JSONField(null=True)
    hash = models.TextField()
    previous_hash = models.TextField(null=True)
    created_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "audit_logs"

    def __str__(self) -> str:
        return f"{self.action} {self.record_id}"


class AuditAction(models.TextChoices):
    """Every action the dashboard records, with the label the trail and its filter show.
    audit_record refuses any other, so a new action is named (and translated) here first;
    the column stays free text, so adding one needs no migration."""

    JOB_REQUESTED = "job.requested", _("Job requested")
    JOB_APPROVED = "job.approved", _("Job approved")
    JOB_REFUSED = "job.refused", _("Job refused")
    JOB_CANCELLED = "job.cancelled", _("Job cancelled")
    JOB_FINISHED = "job.finished", _("Job finished")
    LOCKS_RELEASED = "locks.released", _("Locks released")
    LOCKS_RESTORED = "locks.restored", _("Locks restored")
    SCHEDULE_CHANGED = "schedule.changed", _("Schedule changed")
    ALERT_ACKNOWLEDGED = "alert.acknowledged", _("Alert acknowledged")
    LOGIN_FAILED = "auth.login_failed", _("Login failed")
    LOGIN_THROTTLED = "auth.login_throttled", _("Sign-ins locked out after repeated failures")
    UPSERT_ADHOC = "upsert.adhoc", _("Upsert run from the command line")
    UPSERT_ROLLED_BACK = "upsert.rolled_back", _("Upsert run rolled back")
    DUPLICATES_DELETED = "invoice_lines.duplicates_deleted", _("Duplicate invoice lines deleted")
    INDEX_CREATED = "index.created", _("Index created")
    INDEX_BUILD_FAILED = "index.build_failed", _("Index build failed")
    INDEX_DROPPED_INVALID = "index.dropped_invalid", _("Invalid index dropped")
    BACKEND_CANCELLED = "backend.cancelled", _("Database session's query cancelled")
    BACKEND_TERMINATED = "backend.terminated", _("Database session terminated")
    DATABASE_RESTORED = "database.restored", _("Database restored from a backup")
    DATABASE_RESTORE_FAILED = "database.restore_failed", _("Database restore failed")


class AppendOnlyError(Exception):
    """Something tried to change or remove an audit entry, or to add one beside the chain."""


APPEND_ONLY_MESSAGE = (
    "The audit trail is append-only: entries are added with audit.services.audit_record "
    "and never changed or deleted."
)


class AuditEntryQuerySet(models.QuerySet["AuditEntry"]):
    """Reads as usual; every bulk write path raises (appends go through audit_record)."""

    def update(self, **kwargs: Any) -> NoReturn:
        raise AppendOnlyError(APPEND_ONLY_MESSAGE)

    def delete(self) -> NoReturn:
        raise AppendOnlyError(APPEND_ONLY_MESSAGE)

    def bulk_update(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise AppendOnlyError(APPEND_ONLY_MESSAGE)

    def bulk_create(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise AppendOnlyError(APPEND_ONLY_MESSAGE)

    def create(self, **kwargs: Any) -> NoReturn:
        raise AppendOnlyError(APPEND_ONLY_MESSAGE)

    def get_or_create(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise AppendOnlyError(APPEND_ONLY_MESSAGE)

    def update_or_create(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise AppendOnlyError(APPEND_ONLY_MESSAGE)


class AuditEntry(models.Model):
    """One operator (or system) action, in the dashboard's own hash-chained audit trail.

    Written only by ``audit.services.audit_record``, which extends a single linear chain:
    ``created_at`` strictly increases along it, each ``previous_hash`` is the ``hash`` of
    the entry before, and ``hash`` is recomputable from the row with the canonical form of
    ``audit.chain`` (mapping: ``audit.chain.dashboard_entry_fields``).
    ``audit.selectors.dashboard_chain_verify`` (``manage.py verify_audit_chain --dashboard``)
    checks both.

    Append-only, in three layers:

    1. the application: ``save()`` refuses to update an existing row, ``delete()`` refuses,
       and the manager's bulk paths (``update``, ``delete``, ``bulk_create``, ``create``,
       ...) raise ``AppendOnlyError``;
    2. the database (migration 0002): a row trigger refuses every UPDATE and DELETE on the
       table with SQLSTATE 42501 (insufficient_privilege), whoever sends it; a statement
       trigger refuses TRUNCATE too, except in Django's test databases (named ``test_...``,
       whose runner flushes every table between transactional tests) or in a session that
       deliberately ran ``SET billing_ops.allow_audit_truncate = on``; ``= off`` refuses it
       even in a test database;
    3. the deployment, which can go further than a trigger the table's owner could drop: run
       migrations as an owner role and the web and worker processes as another role, then
       ``REVOKE UPDATE, DELETE, TRUNCATE ON audit_entry FROM <web role>`` and grant it only
       ``SELECT, INSERT`` on the table (and ``USAGE`` on its id sequence). The web role then
       cannot alter the trail even with raw SQL, nor disable the trigger.

    ``actor`` keeps no database constraint and is never updated: deleting a user leaves
    ``actor_id`` as it was (a user that no longer exists) and ``actor_name`` tells who it
    was. System actions have no user and an ``actor_name`` like ``system:scheduler``.
    """

    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField()
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        blank=True,
        related_name="+",
    )
    actor_name = models.TextField()
    action = models.TextField()
    environment = models.TextField(blank=True, default="")
    object_type = models.TextField(blank=True, default="")
    object_id = models.TextField(blank=True, default="")
    # Leaves are strings (or null) as audit.chain requires; see audit.services.audit_values.
    params = models.JSONField(default=dict)
    outcome = models.JSONField(default=dict)
    hash = models.TextField()
    previous_hash = models.TextField(null=True, blank=True)

    objects = AuditEntryQuerySet.as_manager()

    class Meta:
        db_table = "audit_entry"
        verbose_name_plural = "audit entries"
        indexes = [
            models.Index(fields=["action", "-created_at"], name="audit_entry_action_idx"),
            models.Index(fields=["environment", "-created_at"], name="audit_entry_env_idx"),
            models.Index(fields=["object_type", "object_id"], name="audit_entry_object_idx"),
        ]
        constraints = [
            # The chain's order: no two entries share a moment.
            models.UniqueConstraint(fields=["created_at"], name="audit_entry_created_at_unique"),
            models.UniqueConstraint(fields=["hash"], name="audit_entry_hash_unique"),
            # One linear chain: at most one entry follows each hash, and one entry starts it.
            models.UniqueConstraint(
                Coalesce("previous_hash", models.Value("")), name="audit_entry_one_successor"
            ),
            models.CheckConstraint(
                condition=models.Q(hash__regex=r"^[0-9a-f]{64}$"), name="audit_entry_hash_hex"
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.action} by {self.actor_name}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AppendOnlyError(APPEND_ONLY_MESSAGE)
        kwargs["force_insert"] = True
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise AppendOnlyError(APPEND_ONLY_MESSAGE)
