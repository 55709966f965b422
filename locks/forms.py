from __future__ import annotations

from django import forms
from django.utils.translation import gettext_lazy as _

LOCK_CHOICES = [("all", _("All locks")), ("system", _("System locks only"))]
SCOPE_CHOICES = [("selected", _("The selected runs")), ("shown", _("Every run the current filter shows"))]


class ReleasePreviewForm(forms.Form):
    """Which runs' locks to preview for release: chosen ids, or the stuck-runs filter's set."""

    scope = forms.ChoiceField(choices=SCOPE_CHOICES, initial="selected")
    runs = forms.TypedMultipleChoiceField(coerce=int, required=False, choices=())
    filter_query = forms.CharField(required=False, max_length=2000)
    locks = forms.ChoiceField(label=_("Locks"), choices=LOCK_CHOICES, initial="all", widget=forms.RadioSelect)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Any positive integer is a candidate run id; the service checks each one.
        self.fields["runs"].choices = [(v, v) for v in self.data.getlist("runs")] if self.data else []

    def clean_runs(self) -> list[int]:
        runs = self.cleaned_data["runs"]
        if any(r <= 0 for r in runs):
            raise forms.ValidationError(_("Run ids are positive integers."))
        return runs

    def clean(self) -> dict[str, object]:
        data = super().clean() or {}
        if data.get("scope") == "selected" and not data.get("runs"):
            raise forms.ValidationError(_("Select at least one run."))
        return data
