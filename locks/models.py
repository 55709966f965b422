"""Mirror of ``lock.locks`` in an environment database (unmanaged; use ``.using(env.alias)``)."""

from __future__ import annotations

from django.db import models


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
