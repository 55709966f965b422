from __future__ import annotations

from datetime import datetime
from typing import Any

from django import forms
from django.conf import settings
from django.utils.translation import gettext_lazy as _

from reconciliation.artifacts import RunFolder
from reconciliation.verification import RUN_ID_MAX_LENGTH


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


class DuplicateResolveForm(forms.Form):
    # The precheck job whose groups are to be resolved; the service checks it.
    precheck_job = forms.IntegerField(min_value=1, widget=forms.HiddenInput)


class SessionSignalForm(forms.Form):
    pid = forms.IntegerField(min_value=1, widget=forms.HiddenInput)
    # When the backend started, as the list showed it: a pid reused by another backend since
    # is refused.
    backend_start = forms.CharField(max_length=64, widget=forms.HiddenInput)
    terminate = forms.BooleanField(required=False, label=_("Terminate the session"))

    def clean_backend_start(self) -> datetime:
        value: Any = self.cleaned_data["backend_start"]
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise forms.ValidationError(_("Not a backend start time.")) from None
        if parsed.tzinfo is None:
            raise forms.ValidationError(_("Not a backend start time."))
        return parsed


class ArtifactValidateForm(forms.Form):
    """A run folder, chosen from the reconciliations directory's list: never a typed path."""

    run_folder = forms.ChoiceField(label=_("Run folder"), choices=())

    def __init__(self, *args: Any, folders: list[RunFolder], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["run_folder"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [(f.name, f.name) for f in folders]


class UpsertVerifyForm(forms.Form):
    # Any run id: runs of the old script are verified too. It is only ever a bound parameter.
    run_id = forms.CharField(label=_("Run id"), max_length=RUN_ID_MAX_LENGTH, strip=True)


class RollbackRequestForm(forms.Form):
    """The rollback of a run as previewed: the digest ties the request to that preview."""

    run_id = forms.CharField(max_length=RUN_ID_MAX_LENGTH, widget=forms.HiddenInput)
    digest = forms.CharField(max_length=64, min_length=64, widget=forms.HiddenInput)
    reason = forms.CharField(
        label=_("Reason"),
        max_length=1000,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text=_("Sent to the ops channel and the stakeholders with the result (runbook §6.3)."),
    )
    confirmation = forms.CharField(label=_("Type the environment's name to confirm"), required=False)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        # The hidden fields come from the preview; their own errors would not show on the page.
        if any(name in self.errors for name in ("run_id", "digest")):
            self.add_error(None, _("This request does not match a preview: preview the run again."))
        return data


class RestoreForm(forms.Form):
    # Checked against the environment's label by the service (reconciliation.restore).
    confirmation = forms.CharField(label=_("Type the environment's name to confirm"), max_length=200)
    reason = forms.CharField(
        label=_("Reason"),
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text=_("Sent to the ops channel and the stakeholders, and kept in the audit trail."),
    )
