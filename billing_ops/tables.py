from __future__ import annotations

from typing import Any

import django_tables2 as tables
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from billing_ops.environments import environment_label
from billing_ops.job_kinds import kind_label
from billing_ops.models import Job, Notification

# A page number beyond this is page 1: page x rows per page must stay inside PostgreSQL's
# bigint OFFSET (a ?page=99999999999999999999 was a server error).
MAX_PAGE = 10**9


def page_number(request: HttpRequest, field: str = "page") -> int:
    """The request's ``?page=``: 1 when missing, not a number or out of range."""
    try:
        number = int(request.GET.get(field, "1"))
    except ValueError:
        return 1
    return number if 1 <= number <= MAX_PAGE else 1


def table_configure(request: HttpRequest, table: tables.Table, *, per_page: int, **paginate: Any) -> None:
    """Sort and page ``table`` as the request asks (``?sort=``, ``?page=``), ``per_page`` rows
    a page. The page size is the view's: django-tables2 would take ``?per_page=`` from the
    URL, where 0 or -1 was a server error and a huge one the whole table on one page; a page
    number past ``MAX_PAGE`` is page 1."""
    query = request.GET.copy()
    query.pop(table.prefixed_per_page_field, None)
    if table.prefixed_page_field in query and page_number(request, table.prefixed_page_field) == 1:
        del query[table.prefixed_page_field]
    if query != request.GET:
        query._mutable = False
        request.GET = query  # type: ignore[assignment]  # a QueryDict, immutable again
    tables.RequestConfig(request, paginate={**paginate, "per_page": per_page}).configure(table)


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
