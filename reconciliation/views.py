"""Reconciliation pages (runbook §1 to §5): thin views over reconciliation's services."""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_http_methods
from django_tables2 import RequestConfig

from billing_ops import access
from reconciliation import selectors
from reconciliation.forms import UpsertForm
from reconciliation.models import UpsertRun
from reconciliation.services import upsert_request
from reconciliation.tables import UpsertRunTable

RUNS_PER_PAGE = 25


@require_GET
def reconciliation_home(request: HttpRequest, env_key: str) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    recent = (
        UpsertRun.objects.filter(environment=env.key).select_related("requested_by").order_by("-started_at")
    )
    runs = UpsertRunTable(list(recent[:5]), orderable=False)
    return render(
        request,
        "reconciliation/home.html",
        {
            "env": env,
            "can_queue": access.is_operator(request.user),
            "can_approve": access.is_approver(request.user),
            "recent_runs": runs,
        },
    )


@require_http_methods(["GET", "POST"])
def upsert_new(request: HttpRequest, env_key: str) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    access.require_operator(request.user)
    form = UpsertForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        upload = form.cleaned_data["csv"]
        try:
            job = upsert_request(
                actor=request.user,
                environment=env.key,
                chunks=upload.chunks(),
                csv_name=upload.name,
                run_id=form.cleaned_data["run_id"],
                batch_size=form.cleaned_data["batch_size"],
                dry_run=form.cleaned_data["dry_run"],
            )
        except ValidationError as exc:  # refused (also JobConflict: the run id is being worked on)
            form.add_error(None, exc)
        else:
            messages.success(request, _("Upsert queued as job #%(id)s.") % {"id": job.pk})
            return redirect("job_detail", job_id=job.pk)
    return render(request, "reconciliation/upsert_new.html", {"env": env, "form": form}, status=200)


@require_GET
def upsert_runs(request: HttpRequest, env_key: str) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    table = UpsertRunTable(UpsertRun.objects.filter(environment=env.key).select_related("requested_by"))
    RequestConfig(request, paginate={"per_page": RUNS_PER_PAGE}).configure(table)
    return render(request, "reconciliation/upsert_runs.html", {"env": env, "table": table})


@require_GET
def upsert_audit_rows(request: HttpRequest, env_key: str, run_pk: int) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    run = get_object_or_404(UpsertRun, pk=run_pk, environment=env.key)
    if run.dry_run:
        raise Http404("A dry run writes no audit rows.")
    try:
        page = max(1, int(request.GET.get("page", "1")))
    except ValueError:
        page = 1
    rows, more = selectors.run_audit_rows(env, run.run_id, page=page)
    return render(
        request,
        "reconciliation/upsert_audit_rows.html",
        {
            "env": env,
            "run": run,
            "rows": rows,
            "page": page,
            "more": more,
            "counts": selectors.run_audit_counts(env, run.run_id),
        },
    )
