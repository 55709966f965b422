from __future__ import annotations

import django_tables2 as tables
from django.utils.translation import gettext_lazy as _

from billing_ops.environments import environment_label
from billing_ops.job_kinds import kind_label
from billing_ops.models import Job


class JobTable(tables.Table):
    id = tables.Column(linkify=("job_detail", {"job_id": tables.A("pk")}), verbose_name="#")
    kind = tables.Column(verbose_name=_("Kind"))
    environment = tables.Column(verbose_name=_("Environment"))

    def render_kind(self, value: str) -> str:
        return str(kind_label(value))

    def render_environment(self, value: str) -> str:
        return environment_label(value)

    status = tables.TemplateColumn(
        '<span class="status status-{{ record.status }}">{{ record.get_status_display }}</span>',
        verbose_name=_("Status"),
    )
    requested_by = tables.Column(verbose_name=_("Requested by"))
    requested_at = tables.DateTimeColumn(verbose_name=_("Requested"))
    finished_at = tables.DateTimeColumn(verbose_name=_("Finished"))

    class Meta:
        model = Job
        fields = ("id", "kind", "environment", "status", "requested_by", "requested_at", "finished_at")
        template_name = "django_tables2/table.html"
        attrs = {"class": "table"}
        order_by = ("-id",)
