"""The audit trail's filter: a django-filter form in the URL, handed to the selector.

Like the stuck-runs filter, this FilterSet only parses and validates the query string;
``entries()`` passes the cleaned values to ``audit.selectors.audit_entries``, so that the
page and its CSV export select exactly the same entries.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any

import django_filters
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from audit.models import AuditAction, AuditEntry
from audit.selectors import audit_actions, audit_entries
from billing_ops.forms import environment_choices

# The text filters match exactly, as the selector does; longer input cannot match anything.
TEXT_FILTER_MAX_CHARS = 200


def action_choices() -> list[tuple[str, str]]:
    """The named actions, and any other action the trail holds (written by newer code)."""
    labels = dict(AuditAction.choices)
    return [
        (action, f"{labels[action]} ({action})" if action in labels else action)
        for action in sorted(set(labels) | set(audit_actions()))
    ]


class AuditEntryFilter(django_filters.FilterSet):
    action = django_filters.ChoiceFilter(label=_("Action"), choices=action_choices, method="_noop")
    actor = django_filters.CharFilter(
        label=_("Actor (user name)"), method="_noop", max_length=TEXT_FILTER_MAX_CHARS
    )
    environment = django_filters.ChoiceFilter(
        label=_("Environment"), choices=environment_choices, method="_noop"
    )
    object_type = django_filters.CharFilter(
        label=_("Object type"), method="_noop", max_length=TEXT_FILTER_MAX_CHARS
    )
    object_id = django_filters.CharFilter(
        label=_("Object id"), method="_noop", max_length=TEXT_FILTER_MAX_CHARS
    )
    date = django_filters.DateFromToRangeFilter(
        label=_("Between (days, inclusive)"),
        method="_noop",
        widget=django_filters.widgets.DateRangeWidget(attrs={"type": "date"}),
    )

    class Meta:
        model = AuditEntry
        fields: list[str] = []

    def __init__(self, data: Any) -> None:
        super().__init__(data, queryset=AuditEntry.objects.none())

    def _noop(self, queryset: Any, name: str, value: Any) -> Any:  # pragma: no cover - never a queryset
        return queryset

    def entries(self) -> QuerySet[AuditEntry]:
        """The entries the valid part of the query string selects, newest first; an invalid
        value is ignored (and shown as an error by the page)."""
        self.form.is_valid()
        data = getattr(self.form, "cleaned_data", {})
        days = data.get("date")
        return audit_entries(
            action=data.get("action") or "",
            actor_name=(data.get("actor") or "").strip(),
            environment=data.get("environment") or "",
            object_type=(data.get("object_type") or "").strip(),
            object_id=(data.get("object_id") or "").strip(),
            since=_day_start(days.start) if days and days.start else None,
            until=_day_start(days.stop, next_day=True) if days and days.stop else None,
        )


def _day_start(day: date | datetime, *, next_day: bool = False) -> datetime:
    """Midnight starting ``day`` (or the day after) in the time zone pages show."""
    if isinstance(day, datetime):
        day = day.date()
    if next_day:
        day += timedelta(days=1)
    return timezone.make_aware(datetime.combine(day, time.min))
