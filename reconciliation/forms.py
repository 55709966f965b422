from __future__ import annotations

from datetime import datetime
from typing import Any

from django import forms
from django.utils.translation import gettext_lazy as _


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
