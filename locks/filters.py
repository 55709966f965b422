"""The stuck-runs filter: a django-filter form in the URL, turned into RunFilters.

The runs are aggregated in SQL (locks/selectors.py), not filtered as a queryset, so this
FilterSet only parses and validates the query string; run_filters() hands the cleaned
values to the selector.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django import forms
from django.utils.translation import gettext_lazy as _

from billing_ops.models import BillingRun
from locks.selectors import RunFilters

LOCK_KIND_CHOICES = [("system", _("System locks only")), ("user", _("User locks only"))]


class StuckRunFilter(django_filters.FilterSet):
    entity_type = django_filters.ChoiceFilter(label=_("Entity type"), choices=[], method="_noop")
    min_locks = django_filters.NumberFilter(
        label=_("At least N locks"), method="_noop", widget=forms.NumberInput(attrs={"min": 1})
    )
    created = django_filters.DateFromToRangeFilter(
        label=_("Run created between"),
        method="_noop",
        widget=django_filters.widgets.DateRangeWidget(attrs={"type": "date"}),
    )
    lock_kind = django_filters.ChoiceFilter(label=_("Locks"), choices=LOCK_KIND_CHOICES, method="_noop")

    class Meta:
        model = BillingRun
        fields: list[str] = []

    def __init__(self, data: Any, *, entity_types: list[str]) -> None:
        super().__init__(data, queryset=BillingRun.objects.none())
        self.filters["entity_type"].extra["choices"] = [(t, t) for t in entity_types]

    def _noop(self, queryset: Any, name: str, value: Any) -> Any:  # pragma: no cover - never a queryset
        return queryset

    def run_filters(self) -> RunFilters:
        """The valid part of the query string; an invalid value is ignored and shown as an error."""
        self.form.is_valid()
        data = getattr(self.form, "cleaned_data", {})
        created = data.get("created")
        lock_kind = data.get("lock_kind")
        min_locks = data.get("min_locks")
        return RunFilters(
            entity_type=data.get("entity_type") or None,
            system_lock={"system": True, "user": False}.get(lock_kind or ""),
            min_locks=int(min_locks) if min_locks else None,
            created_from=created.start.date() if created and created.start else None,
            created_to=created.stop.date() if created and created.stop else None,
        )
