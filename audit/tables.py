from __future__ import annotations

import json
from typing import Any

import django_tables2 as tables
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from audit.models import AuditEntry
from billing_ops.environments import environment_label
from billing_ops.formats import grouped
from billing_ops.models import Job

AUDIT_ENTRIES_PER_PAGE = 50
VERIFICATIONS_PER_PAGE = 25
# params and outcome are shown compact and cut; the CSV export has them whole.
JSON_SHOWN_CHARS = 160
HASH_SHOWN_CHARS = 12


def _compact_json(value: Any) -> str:
    if not value:
        return ""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= JSON_SHOWN_CHARS else text[: JSON_SHOWN_CHARS - 1] + "…"


def _short_hash(value: str | None) -> SafeString | str:
    if not value:
        return "—"
    return format_html('<code title="{}">{}…</code>', value, value[:HASH_SHOWN_CHARS])


class AuditEntryTable(tables.Table):
    """The dashboard's audit trail; only the time is sortable (its unique index orders it)."""

    id = tables.Column(
        verbose_name="#", orderable=False, attrs={"td": {"data-entry": lambda record: record.pk}}
    )
    created_at = tables.DateTimeColumn(verbose_name=_("When"), format="Y-m-d H:i:s.u")
    actor_name = tables.Column(verbose_name=_("Actor"), orderable=False)
    action = tables.Column(verbose_name=_("Action"), orderable=False)
    environment = tables.Column(verbose_name=_("Environment"), orderable=False)
    object = tables.Column(verbose_name=_("Object"), accessor="object_id", orderable=False, empty_values=())
    params = tables.Column(verbose_name=_("Parameters"), orderable=False)
    outcome = tables.Column(verbose_name=_("Outcome"), orderable=False)
    hash = tables.Column(verbose_name=_("Hash"), orderable=False)

    class Meta:
        model = AuditEntry
        fields = (
            "id",
            "created_at",
            "actor_name",
            "action",
            "environment",
            "object",
            "params",
            "outcome",
            "hash",
        )
        template_name = "django_tables2/table.html"
        attrs = {"class": "table audit-trail"}
        order_by = ("-created_at",)

    def render_environment(self, value: str) -> str:
        return environment_label(value)

    def render_object(self, record: AuditEntry) -> SafeString | str:
        if not (record.object_type or record.object_id):
            return "—"
        if record.object_type == "job" and record.object_id.isdigit():
            url = reverse("job_detail", kwargs={"job_id": int(record.object_id)})
            return format_html('job <a href="{}">#{}</a>', url, record.object_id)
        return f"{record.object_type}:{record.object_id}"

    def render_params(self, value: Any) -> str:
        return _compact_json(value)

    def render_outcome(self, value: Any) -> str:
        return _compact_json(value)

    def render_hash(self, value: str) -> SafeString | str:
        return _short_hash(value)


class ChainVerificationTable(tables.Table):
    """A chain's verifications (jobs of kind chain_verify), their figures read from each
    job's result; a job that did not finish shows its status and error instead."""

    id = tables.Column(linkify=("job_detail", {"job_id": tables.A("pk")}), verbose_name="#")
    requested_at = tables.DateTimeColumn(verbose_name=_("Requested"))
    requested_by = tables.Column(verbose_name=_("Requested by"), orderable=False)
    status = tables.TemplateColumn(
        '<span class="status status-{{ record.status }}">{{ record.get_status_display }}</span>',
        verbose_name=_("Job"),
        orderable=False,
    )
    verdict = tables.Column(verbose_name=_("Chain"), accessor="result", orderable=False, empty_values=())
    entries = tables.Column(
        verbose_name=_("Entries"), accessor="result__entries", orderable=False, attrs={"td": {"class": "num"}}
    )
    linkage_only = tables.Column(
        verbose_name=_("Linkage only"),
        accessor="result__linkage_only",
        orderable=False,
        attrs={"td": {"class": "num"}},
    )
    damaged = tables.Column(
        verbose_name=_("Damaged"),
        accessor="result__damaged_entries",
        orderable=False,
        attrs={"td": {"class": "num"}},
    )
    first_broken = tables.Column(
        verbose_name=_("First broken entry"), accessor="result__first_broken", orderable=False
    )
    verified_head = tables.Column(
        verbose_name=_("Last verified head"), accessor="result__verified_head", orderable=False
    )
    duration = tables.Column(
        verbose_name=_("Duration (s)"),
        accessor="result__duration_s",
        orderable=False,
        attrs={"td": {"class": "num"}},
    )
    rows_per_s = tables.Column(
        verbose_name=_("Rows/s"),
        accessor="result__rows_per_s",
        orderable=False,
        attrs={"td": {"class": "num"}},
    )

    class Meta:
        model = Job
        fields = ("id", "requested_at", "requested_by", "status")
        sequence = (
            "id",
            "requested_at",
            "requested_by",
            "status",
            "verdict",
            "entries",
            "linkage_only",
            "damaged",
            "first_broken",
            "verified_head",
            "duration",
            "rows_per_s",
        )
        template_name = "django_tables2/table.html"
        attrs = {"class": "table"}
        order_by = ("-id",)

    def render_verdict(self, record: Job) -> SafeString | str:
        result = record.result or {}
        if "intact" not in result:
            return format_html('<span class="muted">{}</span>', record.error[:200] or "—")
        if result["intact"]:
            return format_html('<span class="good" data-intact="yes">{}</span>', _("intact"))
        return format_html('<strong class="bad" data-intact="no">{}</strong>', _("DAMAGED"))

    def render_entries(self, value: int) -> str:
        return grouped(value)

    def render_linkage_only(self, value: int) -> str:
        return grouped(value)

    def render_rows_per_s(self, value: int) -> str:
        return grouped(value)

    def render_first_broken(self, value: dict[str, Any]) -> SafeString:
        return format_html("#{}", value["entry_id"])

    def render_verified_head(self, value: dict[str, Any]) -> SafeString:
        return format_html("#{} {}", value["entry_id"], _short_hash(value["hash"]))
