"""Views: parse, check access, call one service or selector, present the result."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_not_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import translation
from django.utils.module_loading import import_string
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from billing_ops import access, preferences, selectors, services
from billing_ops.filters import JobFilter, NotificationFilter
from billing_ops.forms import DecisionForm, EnvironmentCheckForm, LanguageForm, PreferenceForm
from billing_ops.job_kinds import get_kind
from billing_ops.models import Job, Notification
from billing_ops.tables import JobTable, NotificationTable, table_configure

ROWS_PER_PAGE = 50  # jobs and notifications


def _get_job_for_user(request: HttpRequest, job_id: int) -> Job:
    access.require_viewer(request.user)
    return get_object_or_404(Job.objects.select_related("requested_by", "approved_by"), pk=job_id)


@require_GET
def environment_detail(request: HttpRequest, env_key: str) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    probe = selectors.environments_probe([env])[0]
    schema = statuses = None
    if probe.reachable:
        schema = selectors.contract_schema_status(env)
        statuses = selectors.billing_statuses(env) if schema["billing_status_enum"] else []
    return render(
        request,
        "billing_ops/environment_detail.html",
        {
            "env": env,
            "probe": probe,
            "schema": schema,
            "statuses": statuses,
            "jobs": selectors.jobs_recent(environment=env.key)[:20],
            "check_form": EnvironmentCheckForm(initial={"environment": env.key}),
        },
    )


@require_GET
def job_list(request: HttpRequest) -> HttpResponse:
    access.require_viewer(request.user)
    job_filter = JobFilter(request.GET, queryset=selectors.jobs_recent())
    table = JobTable(job_filter.qs)
    table_configure(request, table, per_page=ROWS_PER_PAGE)
    return render(request, "billing_ops/job_list.html", {"filter": job_filter, "table": table})


@require_GET
def notification_list(request: HttpRequest) -> HttpResponse:
    """The outbox: every alert and stakeholder message, its recipient and whether it got there."""
    access.require_viewer(request.user)
    notification_filter = NotificationFilter(request.GET, queryset=Notification.objects.all())
    table = NotificationTable(notification_filter.qs)
    table_configure(request, table, per_page=ROWS_PER_PAGE)
    return render(
        request, "billing_ops/notification_list.html", {"filter": notification_filter, "table": table}
    )


@require_GET
def approval_list(request: HttpRequest) -> HttpResponse:
    access.require_viewer(request.user)
    return render(request, "billing_ops/approval_list.html", {"jobs": selectors.jobs_awaiting_approval()})


def _job_context(request: HttpRequest, job: Job) -> dict[str, object]:
    """What the job's live part (_job_status.html) shows; rendered every second while the
    job runs, so nothing here beyond what that fragment uses."""
    user = request.user
    return {
        "job": job,
        "kind": get_kind(job.kind),
        "log_lines": job.log_lines.all(),
        "can_decide": access.is_approver(user)
        and job.status == "awaiting_approval"
        and job.requested_by_id != user.pk,
        "can_cancel": not job.is_finished
        and not job.cancel_requested
        and ((job.requested_by_id == user.pk and access.is_operator(user)) or access.is_approver(user)),
        "decision_form": DecisionForm(initial={"digest": job.params_digest}),
        "result_template": [f"billing_ops/results/{job.kind}.html", "billing_ops/results/generic.html"],
    }


@require_GET
def job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    job = _get_job_for_user(request, job_id)
    return render(
        request, "billing_ops/job_detail.html", {**_job_details(request, job), **_job_context(request, job)}
    )


def _job_details(request: HttpRequest, job: Job) -> dict[str, Any]:
    """The kind's own section (e.g. the release preview an approver decides on, an upsert's
    run): rendered with the page, and once more by the poll that sees the job settle."""
    kind = get_kind(job.kind)
    if not kind.detail_context:
        return {"detail_template": ""}
    return {
        **import_string(kind.detail_context)(job, request.user),
        "detail_template": f"billing_ops/details/{job.kind}.html",
    }


@never_cache
@require_GET
def job_status_fragment(request: HttpRequest, job_id: int) -> HttpResponse:
    """The live part of the job page, polled by htmx until the job finishes; the last poll
    also replaces the kind's section (out of band), which the outcome changes."""
    job = _get_job_for_user(request, job_id)
    details = _job_details(request, job) if job.is_finished else {"detail_template": ""}
    return render(
        request,
        "billing_ops/_job_status.html",
        {**details, **_job_context(request, job), "details_out_of_band": bool(details["detail_template"])},
    )


@require_POST
def environment_check_request(request: HttpRequest) -> HttpResponse:
    access.require_operator(request.user)
    form = EnvironmentCheckForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("Choose a configured environment."))
        return redirect("overview")
    job = services.job_request(
        actor=request.user, kind="environment_check", environment=form.cleaned_data["environment"]
    )
    messages.success(request, _("Environment check queued as job #%(id)s.") % {"id": job.pk})
    return redirect("job_detail", job_id=job.pk)


def _decide(request: HttpRequest, job_id: int, *, approve: bool) -> HttpResponse:
    access.require_approver(request.user)
    job = _get_job_for_user(request, job_id)
    form = DecisionForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("The decision form was incomplete."))
        return redirect("job_detail", job_id=job.pk)
    try:
        if approve:
            services.job_approve(
                actor=request.user,
                job_id=job.pk,
                digest=form.cleaned_data["digest"],
                comment=form.cleaned_data["comment"],
            )
            messages.success(request, _("Job #%(id)s approved and queued.") % {"id": job.pk})
        else:
            services.job_refuse(actor=request.user, job_id=job.pk, comment=form.cleaned_data["comment"])
            messages.success(request, _("Job #%(id)s refused.") % {"id": job.pk})
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    return redirect("job_detail", job_id=job.pk)


@require_POST
def job_approve(request: HttpRequest, job_id: int) -> HttpResponse:
    return _decide(request, job_id, approve=True)


@require_POST
def job_refuse(request: HttpRequest, job_id: int) -> HttpResponse:
    return _decide(request, job_id, approve=False)


@require_POST
def job_cancel(request: HttpRequest, job_id: int) -> HttpResponse:
    access.require_operator_or_approver(request.user)
    job = _get_job_for_user(request, job_id)
    try:
        services.job_cancel(actor=request.user, job_id=job.pk)
        messages.success(request, _("Cancel recorded for job #%(id)s.") % {"id": job.pk})
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    return redirect("job_detail", job_id=job.pk)


@login_not_required
@require_POST
def language_set(request: HttpRequest) -> HttpResponse:
    """The header's language switcher: saved for a signed-in user, a cookie for anyone
    (so the sign-in page can be read in Georgian before signing in)."""
    form = LanguageForm(request.POST)
    response = redirect(access.local_path(request, request.POST.get("next", ""), "/"))
    if not form.is_valid():
        return response
    language = form.cleaned_data["language"]
    if request.user.is_authenticated:
        preferences.preference_remember(
            request, preferences.preference_update(user=request.user, language=language)
        )
    translation.activate(language)
    preferences.language_cookie_set(response, language)
    return response


def preference_edit(request: HttpRequest) -> HttpResponse:
    """Language and display time zone of the signed-in user (any role, their own only)."""
    current = preferences.preference_get(request.user)
    saved_zone = getattr(getattr(request.user, "preference", None), "time_zone", "")
    if request.method == "POST":
        form = PreferenceForm(request.POST)
        if form.is_valid():
            chosen = preferences.preference_update(
                user=request.user,
                language=form.cleaned_data["language"],
                time_zone=form.cleaned_data["time_zone"],
            )
            preferences.preference_remember(request, chosen)
            translation.activate(chosen.language)
            messages.success(request, _("Preferences saved."))
            response = redirect("preference_edit")
            preferences.language_cookie_set(response, chosen.language)
            return response
    else:
        form = PreferenceForm(initial={"language": current.language, "time_zone": saved_zone})
    return render(
        request,
        "billing_ops/preferences.html",
        {
            "form": form,
            "current": current,
            "default_time_zone": settings.TIME_ZONE,
            "schedule_time_zone": settings.CELERY_TIMEZONE,
        },
    )


@login_not_required
@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    report = selectors.health_report()
    return JsonResponse(report, status=200 if report["ok"] else 503)


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    message = str(exception) if isinstance(exception, PermissionDenied) and str(exception) else ""
    return render(request, "403.html", {"message": message}, status=403)
