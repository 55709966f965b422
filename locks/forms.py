from __future__ import annotations

from typing import Any

from django import forms
from django.http import QueryDict
from django.utils.translation import gettext_lazy as _

from locks.lookup import QUERY_MAX_CHARS

LOCK_CHOICES = [("all", _("All locks")), ("system", _("System locks only"))]
SCOPE_CHOICES = [("selected", _("The selected runs")), ("shown", _("Every run the current filter shows"))]


class ReleasePreviewForm(forms.Form):
    """Which runs' locks to preview for release: chosen ids, or the stuck-runs filter's set."""

    scope = forms.ChoiceField(choices=SCOPE_CHOICES, initial="selected")
    runs = forms.TypedMultipleChoiceField(coerce=int, required=False, choices=())
    filter_query = forms.CharField(required=False, max_length=2000)
    locks = forms.ChoiceField(label=_("Locks"), choices=LOCK_CHOICES, initial="all", widget=forms.RadioSelect)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Any positive integer is a candidate run id; the service checks each one.
        runs = self.fields["runs"]
        assert isinstance(runs, forms.TypedMultipleChoiceField)
        values = self.data.getlist("runs") if isinstance(self.data, QueryDict) else []
        runs.choices = [(v, v) for v in values]

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


def _time_zone_choices() -> list[tuple[str, str]]:
    from zoneinfo import available_timezones

    return [(tz, tz) for tz in sorted(available_timezones())]


class CleanupScheduleForm(forms.Form):
    """When the scheduled cleanup runs: crontab fields in a chosen time zone."""

    enabled = forms.BooleanField(label=_("Run the scheduled cleanup"), required=False)
    minute = forms.CharField(label=_("Minute"), max_length=60, initial="0")
    hour = forms.CharField(label=_("Hour"), max_length=60, initial="2")
    day_of_week = forms.CharField(
        label=_("Days of the week"),
        max_length=60,
        initial="*",
        help_text=_("cron syntax: * for every day, mon-fri, 1,3,5 …"),
    )
    time_zone = forms.ChoiceField(label=_("Time zone"), choices=_time_zone_choices)


class LockLookupForm(forms.Form):
    """The search box on every page: an entity id, a lock key, a billing number or a run id."""

    q = forms.CharField(label=_("Entity id, lock key or billing number"), max_length=QUERY_MAX_CHARS)
