"""Audit pages: the dashboard's trail (browse, CSV export) and the chains' verifications.

Thin views over ``audit.selectors`` and ``audit.verification``. Every signed-in role reads;
operators and approvers ask for a verification (the service checks it too).
"""

from __future__ import annotations

import csv
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST
from django_tables2 import LazyPaginator

from audit.filters import AuditEntryFilter
from audit.selectors import (
    audit_csv_rows,
    chain_verification_active,
    chain_verification_last,
    chain_verifications,
)
from audit.tables import (
    AUDIT_ENTRIES_PER_PAGE,
    VERIFICATIONS_PER_PAGE,
    AuditEntryTable,
    ChainVerificationTable,
)
from audit.verification import chain_label, chain_verify_request
from billing_ops import access
from billing_ops.environments import Environment
from billing_ops.tables import table_configure
from locks.history import alerts_active
from locks.models import AlertKind

# Entries fetched per round trip while the export streams.
EXPORT_CHUNK_ROWS = 2_000


# --- The dashboard's trail -------------------------------------------------------------------


@require_GET
def audit_trail(request: HttpRequest) -> HttpResponse:
    access.require_viewer(request.user)
    trail_filter = AuditEntryFilter(request.GET)
    table = AuditEntryTable(trail_filter.entries())
    # The trail only grows: page through it without counting it.
    table_configure(request, table, per_page=AUDIT_ENTRIES_PER_PAGE, paginator_class=LazyPaginator)
    export_query = request.GET.copy()
    for key in ("page", "sort"):
        export_query.pop(key, None)
    return render(
        request,
        "audit/trail.html",
        {"filter": trail_filter, "table": table, "export_query": export_query.urlencode()},
    )


class _Echo:
    """A file-like object that hands back what csv.writer writes (for streaming)."""

    def write(self, value: str) -> str:
        return value


@require_GET
def audit_trail_export(request: HttpRequest) -> StreamingHttpResponse:
    """The entries the page's filter selects, as CSV, streamed row by row from a
    server-side cursor (``audit_csv_rows`` escapes cells a spreadsheet would run)."""
    access.require_viewer(request.user)
    entries = AuditEntryFilter(request.GET).entries().iterator(chunk_size=EXPORT_CHUNK_ROWS)
    writer = csv.writer(_Echo())
    response = StreamingHttpResponse(
        (writer.writerow(row) for row in audit_csv_rows(entries)), content_type="text/csv; charset=utf-8"
    )
    filename = f"billing-ops-audit-trail-{timezone.localtime():%Y%m%d-%H%M%S}.csv"
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# --- Chain verification -----------------------------------------------------------------------


def _chain_page(request: HttpRequest, env: Environment | None) -> HttpResponse:
    table = ChainVerificationTable(chain_verifications(env))
    table_configure(request, table, per_page=VERIFICATIONS_PER_PAGE)
    user = request.user
    return render(
        request,
        "audit/chain.html",
        {
            "env": env,
            "chain": chain_label(env),
            "last": chain_verification_last(env),
            "active": chain_verification_active(env),
            "alerts": alerts_active(environment=env.key if env is not None else "").filter(
                kind=AlertKind.AUDIT_CHAIN_BROKEN
            ),
            "table": table,
            "can_verify": access.is_operator(user) or access.is_approver(user),
            "interval_h": settings.CHAIN_VERIFY_INTERVAL_S / 3600,
        },
    )


def _verify(request: HttpRequest, env: Environment | None) -> HttpResponse:
    access.require_operator_or_approver(request.user)
    back: tuple[str, dict[str, Any]] = (
        ("environment_chain", {"env_key": env.key}) if env is not None else ("dashboard_chain", {})
    )
    try:
        job = chain_verify_request(actor=request.user, env=env)
    except ValidationError as exc:  # JobConflict: a verification of this chain is still active
        messages.error(request, " ".join(exc.messages))
        return redirect(back[0], **back[1])
    messages.success(
        request,
        _("Verification of %(chain)s queued as job #%(id)s.") % {"chain": chain_label(env), "id": job.pk},
    )
    return redirect("job_detail", job_id=job.pk)


@require_GET
def dashboard_chain(request: HttpRequest) -> HttpResponse:
    access.require_viewer(request.user)
    return _chain_page(request, None)


@require_POST
def dashboard_chain_verify(request: HttpRequest) -> HttpResponse:
    return _verify(request, None)


@require_GET
def environment_chain(request: HttpRequest, env_key: str) -> HttpResponse:
    return _chain_page(request, access.get_environment_for_user(request.user, env_key))


@require_POST
def environment_chain_verify(request: HttpRequest, env_key: str) -> HttpResponse:
    access.require_operator_or_approver(request.user)
    return _verify(request, access.get_environment_for_user(request.user, env_key))
