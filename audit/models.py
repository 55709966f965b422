"""Mirror of ``public.audit_logs`` in an environment database (unmanaged)."""

from __future__ import annotations

from django.db import models


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
