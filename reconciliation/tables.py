from __future__ import annotations

import django_tables2 as tables
from django.utils.translation import gettext_lazy as _

from reconciliation.models import UpsertRun


class UpsertRunTable(tables.Table):
    run_id = tables.Column(verbose_name=_("Run id"))
    job = tables.Column(
        linkify=lambda record: ("job_detail", {"job_id": record.job_id}) if record.job_id else None,
        verbose_name=_("Job"),
        accessor="job_id",
    )
    status = tables.TemplateColumn(
        '<span class="status status-{{ record.status }}">{{ record.get_status_display }}</span>'
        '{% if record.dry_run %} <span class="badge">{{ dry_run_label }}</span>{% endif %}',
        verbose_name=_("Status"),
        extra_context={"dry_run_label": _("dry run")},
    )
    inserted = tables.Column(verbose_name=_("Inserted"))
    updated = tables.Column(verbose_name=_("Updated"))
    unchanged = tables.Column(verbose_name=_("Unchanged"))
    duplicates = tables.Column(verbose_name=_("Duplicates in file"))
    duration_ms = tables.Column(verbose_name=_("Duration (ms)"))
    csv_name = tables.TemplateColumn(
        '{{ record.csv_name }}<br><code class="muted" title="sha256 {{ record.csv_sha256 }}">'
        "{{ record.csv_sha256|slice:':12' }}…</code> · {{ record.csv_bytes|filesizeformat }}",
        verbose_name=_("File"),
    )
    requested_by = tables.Column(verbose_name=_("Run by"))
    started_at = tables.DateTimeColumn(verbose_name=_("Started"))
    audit = tables.TemplateColumn(
        "{% if not record.dry_run and record.inserted|add:record.updated %}"
        '<a href="{% url "upsert_audit_rows" record.environment record.pk %}">{{ label }}</a>'
        '{% if record.status == "succeeded" %} · {% endif %}{% endif %}'
        '{% if not record.dry_run and record.status == "succeeded" %}'
        '<a href="{% url "reconciliation_home" record.environment %}'
        '?run_id={{ record.run_id|urlencode }}#verify">'
        "{{ verify_label }}</a>{% endif %}",
        verbose_name=_("Audit and verification"),
        extra_context={"label": _("audit rows"), "verify_label": _("verify (§4)")},
        orderable=False,
        empty_values=(),
    )

    rollback = tables.TemplateColumn(
        "{% if record.rollback_status == 'succeeded' %}"
        '<a href="{% url "job_detail" record.rollback_job_id %}">{{ rolled_back_label }}</a>'
        "{% elif record.rollback_status == 'requested' %}"
        '<a href="{% url "job_detail" record.rollback_job_id %}">{{ requested_label }}</a>'
        "{% elif not record.dry_run and record.status == 'succeeded'"
        " and record.inserted|add:record.updated %}"
        '<a href="{% url "rollback_preview" record.environment %}?run_id={{ record.run_id|urlencode }}">'
        "{{ preview_label }}</a>{% endif %}",
        verbose_name=_("Rollback"),
        extra_context={
            "rolled_back_label": _("rolled back"),
            "requested_label": _("rollback requested"),
            "preview_label": _("roll back…"),
        },
        orderable=False,
        empty_values=(),
    )

    class Meta:
        model = UpsertRun
        fields = (
            "run_id",
            "job",
            "status",
            "inserted",
            "updated",
            "unchanged",
            "duplicates",
            "duration_ms",
            "csv_name",
            "requested_by",
            "started_at",
        )
        template_name = "django_tables2/table.html"
        attrs = {"class": "table"}
        order_by = ("-started_at",)
