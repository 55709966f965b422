from __future__ import annotations

from typing import Any

import django_tables2 as tables
from django.urls import reverse
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from billing_ops.formats import grouped
from locks.models import Lock

STUCK_RUNS_PER_PAGE = 50
LOCKS_PER_PAGE = 100


class RunsTable(tables.Table):
    """Runs with their lock counts (rows are dicts from locks.selectors)."""

    billing_run_id = tables.Column(verbose_name=_("Run id"))
    billing_number = tables.Column(verbose_name=_("Billing number"))
    status = tables.Column(verbose_name=_("Status"))
    process_stage = tables.Column(verbose_name=_("Process stage"))
    create_date = tables.DateTimeColumn(verbose_name=_("Created"))
    modify_date = tables.DateTimeColumn(verbose_name=_("Modified"))
    lock_count = tables.Column(verbose_name=_("Locks"), attrs={"td": {"class": "num"}})
    locked_entity_types = tables.Column(verbose_name=_("Locked entity types"), orderable=False)

    class Meta:
        template_name = "django_tables2/table.html"
        attrs = {"class": "table"}
        order_by = ("-billing_run_id",)

    def __init__(self, data: Any, *, env_key: str, selectable: bool = False, **kwargs: Any) -> None:
        if selectable:  # operators pick runs to release; the table sits inside the release form
            kwargs["extra_columns"] = [
                (
                    "runs",
                    tables.CheckBoxColumn(
                        accessor="billing_run_id",
                        attrs={"td__input": {"name": "runs"}, "th__input": {"data-select-all": "runs"}},
                    ),
                )
            ]
            kwargs["sequence"] = ("runs", "...")
        super().__init__(data, **kwargs)
        self.env_key = env_key

    def render_billing_run_id(self, value: int) -> str:
        url = reverse("run_detail", kwargs={"env_key": self.env_key, "run_id": value})
        return format_html('<a href="{}">{}</a>', url, value)

    def render_lock_count(self, value: int) -> str:
        return grouped(value)


class LockTable(tables.Table):
    id = tables.Column(verbose_name=_("Lock id"))
    lock_key = tables.Column(verbose_name=_("Lock key"))
    entity_type = tables.Column(verbose_name=_("Entity type"))
    entity_id = tables.Column(verbose_name=_("Entity id"))
    system_lock = tables.BooleanColumn(verbose_name=_("System lock"))

    class Meta:
        model = Lock
        fields = ("id", "lock_key", "entity_type", "entity_id", "system_lock")
        template_name = "django_tables2/table.html"
        attrs = {"class": "table"}
