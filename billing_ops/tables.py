from __future__ import annotations

from typing import Any

import django_tables2 as tables
from django.core.paginator import PageNotAnInteger
from django.utils.translation import gettext_lazy as _

from billing_ops.environments import environment_label
from billing_ops.job_kinds import kind_label
from billing_ops.models import Job, Notification

# PostgreSQL's OFFSET is a bigint.
MAX_OFFSET = 2**63 - 1


class UncountedPaginator(tables.LazyPaginator):
    """django-tables2's LazyPaginator (pages through a table without counting it), but a
    page number whose offset PostgreSQL cannot hold shows the first page, as any other
    page number that is not one does, instead of failing the request."""

    def validate_number(self, number: Any) -> int:
        number = int(super().validate_number(number))
        if (number - 1) * int(self.per_page) > MAX_OFFSET:
            raise PageNotAnInteger(self.error_messages["invalid_page"])
        return number


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


class NotificationTable(tables.Table):
    """The outbox: what was told to whom, and whether it got there. A webhook's URL is a
    credential, so only its ``recipient_display`` is shown."""

    created_at = tables.DateTimeColumn(verbose_name=_("Queued"))
    subject = tables.Column(verbose_name=_("Subject"))
    channel = tables.Column(verbose_name=_("Channel"))
    recipient = tables.Column(accessor="recipient_display", verbose_name=_("Recipient"), orderable=False)
    status = tables.TemplateColumn(
        '<span class="status status-{{ record.status }}">{{ record.get_status_display }}</span>',
        verbose_name=_("Status"),
    )
    attempts = tables.Column(verbose_name=_("Attempts"))
    sent_at = tables.DateTimeColumn(verbose_name=_("Sent"))
    last_error = tables.Column(verbose_name=_("Last error"), attrs={"td": {"class": "error"}})
    source = tables.TemplateColumn(
        "{% if record.job_id %}<a href=\"{% url 'job_detail' record.job_id %}\">{{ record.source }}</a>"
        "{% elif record.source %}{{ record.source }}{% else %}—{% endif %}",
        verbose_name=_("About"),
        orderable=False,
    )

    class Meta:
        model = Notification
        fields = ("created_at", "subject", "channel", "status", "attempts", "sent_at", "last_error")
        sequence = (
            "created_at",
            "subject",
            "channel",
            "recipient",
            "status",
            "attempts",
            "sent_at",
            "last_error",
            "source",
        )
        template_name = "django_tables2/table.html"
        attrs = {"class": "table"}
        order_by = ("-created_at",)
