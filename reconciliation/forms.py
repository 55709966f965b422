from __future__ import annotations

from django import forms
from django.conf import settings
from django.utils.translation import gettext_lazy as _


class UpsertForm(forms.Form):
    csv = forms.FileField(
        label=_("CSV of missing lines"),
        help_text=_("Columns invoice_id, unit_id, line_type, description, quantity, amount (any order)."),
    )
    run_id = forms.CharField(
        label=_("Run id"),
        max_length=100,
        help_text=_("Unique in this environment; a retry needs a new one (runbook §5.3)."),
    )
    batch_size = forms.IntegerField(
        label=_("Batch size"), min_value=1, max_value=1_000_000, initial=settings.RECONCILIATION_BATCH_SIZE
    )
    dry_run = forms.BooleanField(
        label=_("Dry run (run everything, then roll back)"), required=False, initial=False
    )
