"""Pages of the stuck-lock monitor: parse, check access, call selectors, render."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_not_required
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_tables2 import LazyPaginator

from billing_ops import access
from billing_ops.environments import Environment, all_environments
from billing_ops.models import BillingRun, Job
from billing_ops.notifications import notifications_failed_recent
from billing_ops.selectors import LOCK_RELEASE_KIND, last_finished_jobs
from billing_ops.tables import table_configure
from locks import lookup, release, schedule, selectors, services
from locks.charts import stuck_locks_svg
from locks.filters import StuckRunFilter
from locks.forms import CleanupScheduleForm, LockLookupForm, ReleasePreviewForm
from locks.history import SnapshotChange, alerts_active, alerts_recent, latest_snapshots, stuck_locks_series
from locks.metrics import render_metrics
from locks.models import Alert, Lock, LockReleasePlan
from locks.reports import lock_report, render_csv, render_json, render_markdown
from locks.tables import LOCKS_PER_PAGE, STUCK_RUNS_PER_PAGE, LockTable, RunsTable


@dataclass(frozen=True)
class OverviewRow:
    status: selectors.EnvironmentStatus
    last_cleanup: Job | None
    history: SnapshotChange | None
    chart: str
    alerts: list[Alert]


# The overview's chart shows this much history.
CHART_DAYS = 7


# Listing an environment's entity types reads every lock; the filter's choices can be
# a few minutes old.
ENTITY_TYPES_CACHE_S = 600


def _entity_types(env: Environment) -> list[str]:
    key = f"locks:entity-types:{env.key}"
    types = cache.get(key)
    if types is None:
        types = selectors.locked_entity_types(env)
        cache.set(key, types, ENTITY_TYPES_CACHE_S)
    return list(types)


@require_GET
def overview(request: HttpRequest) -> HttpResponse:
    access.require_viewer(request.user)
    envs = all_environments()
    statuses = selectors.environments_status(envs, max_age_s=settings.OVERVIEW_MAX_AGE_S)
    keys = [e.key for e in envs]
    cleanups = last_finished_jobs(kind=LOCK_RELEASE_KIND, environments=keys)
    snapshots = latest_snapshots(keys)
    since = timezone.now() - timedelta(days=CHART_DAYS)
    alerts: dict[str, list[Alert]] = {}
    for alert in alerts_active():
        alerts.setdefault(alert.environment, []).append(alert)
    rows = [
        OverviewRow(
            status=s,
            last_cleanup=cleanups.get(s.env.key),
            history=snapshots.get(s.env.key),
            chart=stuck_locks_svg(stuck_locks_series(s.env.key, since), width=300, height=70),
            alerts=alerts.get(s.env.key, []),
        )
        for s in statuses
    ]
    return render(request, "locks/overview.html", {"rows": rows, "chart_days": CHART_DAYS})


@require_GET
def alert_list(request: HttpRequest) -> HttpResponse:
    access.require_viewer(request.user)
    return render(
        request,
        "locks/alerts.html",
        {
            "active": alerts_active(),
            "recent": alerts_recent(),
            "failed_notifications": notifications_failed_recent(),
            "can_acknowledge": access.is_operator(request.user) or access.is_approver(request.user),
        },
    )


@require_POST
def alert_acknowledge(request: HttpRequest, alert_id: int) -> HttpResponse:
    access.require_operator_or_approver(request.user)
    try:
        alert = services.alert_acknowledge(actor=request.user, alert_id=alert_id)
    except Alert.DoesNotExist:
        raise Http404("No such alert.") from None
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(request, _("Alert acknowledged: %(summary)s") % {"summary": alert.summary})
    return redirect("alert_list")


@require_GET
def stuck_runs(request: HttpRequest, env_key: str) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    run_filter = StuckRunFilter(request.GET, entity_types=_entity_types(env))
    rows = selectors.stuck_runs(env, run_filter.run_filters())
    table = RunsTable(rows, env_key=env.key, selectable=access.is_operator(request.user))
    table_configure(request, table, per_page=STUCK_RUNS_PER_PAGE)
    return render(
        request,
        "locks/stuck_runs.html",
        {
            "env": env,
            "filter": run_filter,
            "table": table,
            "run_count": len(rows),
            "lock_count": sum(r["lock_count"] for r in rows),
        },
    )


@require_GET
def suspicious_runs(request: HttpRequest, env_key: str) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    sections = [
        ("error", selectors.error_path_runs(env)),
        ("stale", selectors.stale_runs(env)),
        ("unreal", selectors.unreal_completed_runs(env)),
    ]
    tables = {name: RunsTable(rows, env_key=env.key, prefix=f"{name}-") for name, rows in sections}
    for table in tables.values():
        table_configure(request, table, per_page=STUCK_RUNS_PER_PAGE)
    return render(
        request,
        "locks/suspicious_runs.html",
        {
            "env": env,
            "tables": tables,
            "stale_after_min": settings.STALE_RUN_AFTER_MIN,
        },
    )


def _lock_rows(request: HttpRequest, locks: QuerySet[Lock]) -> LockTable:
    """Lock rows, a page at a time, never counted: a run can hold 150,000 of them."""
    table = LockTable(locks.order_by("id"))
    table_configure(request, table, per_page=LOCKS_PER_PAGE, paginator_class=LazyPaginator)
    return table


@require_GET
def run_detail(request: HttpRequest, env_key: str, run_id: int) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    run = BillingRun.objects.using(env.alias).filter(pk=run_id).first()
    if run is None:
        raise Http404("No such billing run in this environment.")
    summary = selectors.run_locks_summary(env, run_id)
    table = _lock_rows(request, Lock.objects.using(env.alias).filter(billing_id=run_id))
    return render(
        request,
        "locks/run_detail.html",
        {
            "env": env,
            "run": run,
            "created": selectors.aware(env, run.create_date),
            "modified": selectors.aware(env, run.modify_date),
            "summary": summary,
            "problem": selectors.run_problem(env, run, summary.total),
            "table": table,
        },
    )


@require_GET
def locks_without_run(request: HttpRequest, env_key: str) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    groups, shape = selectors.locks_without_run(env)
    table = _lock_rows(request, Lock.objects.using(env.alias).filter(billing_id__isnull=True))
    return render(
        request,
        "locks/locks_without_run.html",
        {
            "env": env,
            "groups": groups,
            "shape": shape,
            "total": sum(g.count for g in groups),
            "table": table,
        },
    )


@require_GET
def lock_lookup(request: HttpRequest) -> HttpResponse:
    """Who holds this lock? The query in every environment at once."""
    access.require_viewer(request.user)
    form = LockLookupForm(request.GET if "q" in request.GET else None)
    result = lookup.lock_lookup(form.cleaned_data["q"], all_environments()) if form.is_valid() else None
    return render(
        request,
        "locks/lock_lookup.html",
        {"form": form, "result": result, "row_limit": lookup.LOCK_ROWS_LIMIT},
    )


@require_GET
def procedure(request: HttpRequest, env_key: str) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    return render(request, "locks/procedure.html", {"env": env, "procedure": selectors.procedure_health(env)})


REPORT_FORMATS = {
    "md": ("text/markdown; charset=utf-8", "markdown"),
    "csv": ("text/csv; charset=utf-8", "csv"),
    "json": ("application/json", "json"),
}


@require_GET
def report_download(request: HttpRequest, fmt: str) -> HttpResponse:
    """The seed report's structure from live data, for every environment."""
    access.require_viewer(request.user)
    if fmt not in REPORT_FORMATS:
        raise Http404("Unknown report format.")
    content_type, _name = REPORT_FORMATS[fmt]
    now = timezone.localtime()
    report = lock_report(all_environments())
    if fmt == "json":
        body = render_json(report)
    elif fmt == "csv":
        body = render_csv(report)
    else:
        body = render_markdown(report, generated_at=now)
    response = HttpResponse(body, content_type=content_type)
    filename = f"billing-run-lock-analysis-{now:%Y%m%d-%H%M}.{fmt}"
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@login_not_required
@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format. Scrapers present BILLING_OPS_METRICS_TOKEN as a bearer token;
    without a configured token only a signed-in viewer may read it."""
    token = settings.METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return HttpResponse("a valid bearer token is required\n", status=401, content_type="text/plain")
    elif not access.is_viewer(request.user):
        return HttpResponse(
            "sign in, or configure BILLING_OPS_METRICS_TOKEN\n", status=401, content_type="text/plain"
        )
    body, content_type = render_metrics(selectors.environments_status(all_environments()))
    return HttpResponse(body, content_type=content_type)


# --- Lock release ------------------------------------------------------------------------------


@require_POST
def release_preview(request: HttpRequest, env_key: str) -> HttpResponse:
    """Fix a preview of the locks a release would delete: chosen runs, or every run the
    stuck-runs filter shows."""
    access.require_operator(request.user)
    env = access.get_environment_for_user(request.user, env_key)
    form = ReleasePreviewForm(request.POST)
    back = access.local_path(
        request, request.POST.get("back", ""), reverse("stuck_runs", kwargs={"env_key": env.key})
    )
    if not form.is_valid():
        messages.error(request, _("Choose the runs and which locks to release."))
        return redirect(back)
    if form.cleaned_data["scope"] == "shown":
        shown = StuckRunFilter(QueryDict(form.cleaned_data["filter_query"]), entity_types=_entity_types(env))
        run_ids = [row["billing_run_id"] for row in selectors.stuck_runs(env, shown.run_filters())]
    else:
        run_ids = form.cleaned_data["runs"]
    try:
        plan = release.release_plan_prepare(
            actor=request.user, env=env, run_ids=run_ids, system_only=form.cleaned_data["locks"] == "system"
        )
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect(back)
    return redirect("release_plan", env_key=env.key, plan_id=plan.pk)


@require_GET
def release_plan(request: HttpRequest, env_key: str, plan_id: int) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    plan = get_object_or_404(LockReleasePlan, pk=plan_id, environment=env.key)
    job = Job.objects.filter(kind=release.RELEASE_KIND, params__plan_id=plan.pk).first()
    return render(
        request,
        "locks/release_plan.html",
        {
            "env": env,
            "plan": plan,
            "job": job,
            "can_request": plan.status == "draft"
            and plan.created_by_id == request.user.pk
            and access.is_operator(request.user),
        },
    )


@require_POST
def release_confirm(request: HttpRequest, env_key: str, plan_id: int) -> HttpResponse:
    access.require_operator(request.user)
    env = access.get_environment_for_user(request.user, env_key)
    plan = get_object_or_404(LockReleasePlan, pk=plan_id, environment=env.key)
    try:
        job = release.release_request(
            actor=request.user,
            plan_id=plan.pk,
            digest=request.POST.get("digest", ""),
            confirmation=request.POST.get("confirmation", ""),
        )
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("release_plan", env_key=env.key, plan_id=plan.pk)
    if job.status == "awaiting_approval":
        messages.success(
            request, _("Release requested as job #%(id)s; it waits for an approver.") % {"id": job.pk}
        )
    else:
        messages.success(request, _("Release queued as job #%(id)s.") % {"id": job.pk})
    return redirect("job_detail", job_id=job.pk)


@require_POST
def release_restore(request: HttpRequest, job_id: int) -> HttpResponse:
    access.require_approver(request.user)
    get_object_or_404(Job, pk=job_id, kind=release.RELEASE_KIND)
    try:
        job = release.restore_request(actor=request.user, release_job_id=job_id)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("job_detail", job_id=job_id)
    messages.success(request, _("Restore queued as job #%(id)s.") % {"id": job.pk})
    return redirect("job_detail", job_id=job.pk)


def release_job_detail_context(job: Job, user: Any) -> dict[str, Any]:
    """What the page of a release job adds: the preview the approver decides on."""
    plan = LockReleasePlan.objects.filter(pk=job.params.get("plan_id")).first()
    restore_job = Job.objects.filter(kind=release.RESTORE_KIND, params__release_job_id=job.pk).first()
    return {
        "plan": plan,
        "env": access.get_environment_for_user(user, job.environment),
        "restore_job": restore_job,
        "can_restore": plan is not None
        and access.is_approver(user)
        and job.is_finished
        and job.status != "refused"
        and not plan.restored_by_job_id
        and restore_job is None
        and bool((job.result or {}).get("released")),
    }


# --- Scheduled cleanup -----------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
def cleanup_schedule(request: HttpRequest) -> HttpResponse:
    """When the scheduled cleanup runs and where; approvers change it."""
    access.require_viewer(request.user)
    task = schedule.cleanup_schedule()
    cron = task.crontab
    initial = {
        "enabled": task.enabled,
        "minute": cron.minute,
        "hour": cron.hour,
        "day_of_week": cron.day_of_week,
        "time_zone": str(cron.timezone),
    }
    form = CleanupScheduleForm(initial=initial)
    if request.method == "POST":
        access.require_approver(request.user)
        if request.POST.get("what") == "schedule":
            form = CleanupScheduleForm(request.POST)
            if form.is_valid():
                try:
                    schedule.cleanup_schedule_set(actor=request.user, **form.cleaned_data)
                except ValidationError as exc:
                    form.add_error(None, exc)
                else:
                    messages.success(request, _("Schedule saved."))
                    return redirect("cleanup_schedule")
        else:
            for policy in schedule.cleanup_policies():
                schedule.cleanup_policy_set(
                    actor=request.user,
                    env=policy.env,
                    enabled=request.POST.get(f"enabled_{policy.env.key}") == "on",
                    system_only=request.POST.get(f"system_only_{policy.env.key}") == "on",
                )
            messages.success(request, _("Environments saved."))
            return redirect("cleanup_schedule")
    recent = Job.objects.filter(kind=release.RELEASE_KIND, params__scheduled=True).select_related(
        "requested_by"
    )[:10]
    return render(
        request,
        "locks/cleanup_schedule.html",
        {
            "task": task,
            "form": form,
            "policies": schedule.cleanup_policies(),
            "recent": recent,
            "can_edit": access.is_approver(request.user),
        },
    )
