"""Mirror of ``public.invoice_lines`` in an environment database (unmanaged)."""

from __future__ import annotations

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
