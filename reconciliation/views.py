"""Reconciliation pages (runbook §1 to §5): thin views over reconciliation's services."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db import DatabaseError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from billing_ops import access
from billing_ops import selectors as job_selectors
from billing_ops.environments import Environment, UnknownEnvironment, get_environment
from billing_ops.models import Job, JobStatus
from billing_ops.tables import page_number, table_configure
from reconciliation import (
    artifacts,
    backups,
    duplicates,
    indexes,
    restore,
    rollback,
    selectors,
    sessions,
    verification,
)
from reconciliation.forms import (
    ArtifactValidateForm,
    DuplicateResolveForm,
    RestoreForm,
    RollbackRequestForm,
    SessionSignalForm,
    UpsertForm,
    UpsertVerifyForm,
)
from reconciliation.models import RollbackStatus, RunRollback, UpsertRun
from reconciliation.services import upload_preview, upsert_request
from reconciliation.tables import UpsertRunTable

RUNS_PER_PAGE = 25
RECENT_JOBS = 5
RECENT_BACKUPS = 5

RUNBOOK_JOB_KINDS = [
    duplicates.PRECHECK_KIND,
    duplicates.RESOLVE_KIND,
    indexes.INDEX_CHECK_KIND,
    indexes.INDEX_CREATE_KIND,
]


@require_GET
def reconciliation_home(request: HttpRequest, env_key: str) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    latest = job_selectors.latest_jobs(environment=env.key, kinds=RUNBOOK_JOB_KINDS)
    precheck = job_selectors.last_finished_jobs(kind=duplicates.PRECHECK_KIND, environments=[env.key]).get(
        env.key
    )
    resolve = latest.get(duplicates.RESOLVE_KIND)
    already_resolving = (
        precheck is not None
        and resolve is not None
        and resolve.params.get("precheck_job_id") == precheck.pk
        and resolve.status not in (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.REFUSED)
    )
    return render(
        request,
        "reconciliation/home.html",
        {
            "env": env,
            "can_queue": access.is_operator(request.user),
            "can_approve": access.is_approver(request.user),
            "latest": latest,
            "recent_runs": UpsertRunTable(
                list(
                    UpsertRun.objects.filter(environment=env.key)
                    .select_related("requested_by")
                    .order_by("-started_at")[:5]
                ),
                orderable=False,
            ),
            # The last successful precheck: what a resolve would be based on, unless one is
            # already under way or done for it.
            "precheck": precheck,
            "resolvable": precheck is not None
            and bool((precheck.result or {}).get("groups"))
            and not already_resolving,
            **_files_steps_context(request, env),
        },
    )


def _queue(
    request: HttpRequest, env_key: str, what: str, request_job: Callable[[Environment], Job]
) -> HttpResponse:
    """Request a job with ``request_job(env)``; say what became of it."""
    access.require_operator(request.user)
    env = access.get_environment_for_user(request.user, env_key)
    try:
        job = request_job(env)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("reconciliation_home", env_key=env.key)
    if job.status == JobStatus.AWAITING_APPROVAL:
        messages.success(
            request,
            _("%(what)s requested as job #%(id)s; it waits for an approver.") % {"what": what, "id": job.pk},
        )
    else:
        messages.success(request, _("%(what)s queued as job #%(id)s.") % {"what": what, "id": job.pk})
    return redirect("job_detail", job_id=job.pk)


@require_POST
def duplicate_precheck_request(request: HttpRequest, env_key: str) -> HttpResponse:
    return _queue(
        request,
        env_key,
        _("Duplicate precheck"),
        lambda env: duplicates.duplicate_precheck_request(actor=request.user, env=env),
    )


@require_POST
def duplicate_resolve_request(request: HttpRequest, env_key: str) -> HttpResponse:
    form = DuplicateResolveForm(request.POST)
    precheck_job = form.cleaned_data["precheck_job"] if form.is_valid() else None
    return _queue(
        request,
        env_key,
        _("Resolving the duplicates"),
        lambda env: duplicates.duplicate_resolve_request(
            actor=request.user, env=env, precheck_job_id=precheck_job
        ),
    )


@require_POST
def index_check_request(request: HttpRequest, env_key: str) -> HttpResponse:
    return _queue(
        request,
        env_key,
        _("Index check"),
        lambda env: indexes.index_check_request(actor=request.user, env=env),
    )


@require_POST
def index_create_request(request: HttpRequest, env_key: str) -> HttpResponse:
    return _queue(
        request,
        env_key,
        _("Index creation"),
        lambda env: indexes.index_create_request(actor=request.user, env=env),
    )


def duplicate_resolve_detail_context(job: Job, user: Any) -> dict[str, Any]:
    """What the page of a resolve job adds: the precheck's groups the approver decides on."""
    precheck = Job.objects.filter(
        pk=job.params.get("precheck_job_id"), kind=duplicates.PRECHECK_KIND, environment=job.environment
    ).first()
    return {"precheck": precheck}


@never_cache
@require_GET
def invoice_lines_sessions(request: HttpRequest, env_key: str) -> HttpResponse:
    """Sessions on public.invoice_lines, who blocks whom (runbook §5.2); htmx refreshes the
    rows fragment alone."""
    env = access.get_environment_for_user(request.user, env_key)
    rows: list[sessions.InvoiceLinesSession] = []
    error = ""
    try:
        rows = sessions.invoice_lines_sessions(env)
    except DatabaseError as exc:
        error = job_selectors.describe_error(exc)
    context = {
        "env": env,
        "sessions": rows,
        "error": error,
        "can_signal": access.is_approver(request.user),
    }
    if getattr(request, "htmx", False):
        return render(request, "reconciliation/_sessions_rows.html", context)
    return render(request, "reconciliation/sessions.html", context)


@require_POST
def session_signal(request: HttpRequest, env_key: str) -> HttpResponse:
    access.require_approver(request.user)
    env = access.get_environment_for_user(request.user, env_key)
    form = SessionSignalForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("Choose a session from the list."))
        return redirect("invoice_lines_sessions", env_key=env.key)
    data = form.cleaned_data
    try:
        session = sessions.session_signal(
            actor=request.user,
            env=env,
            pid=data["pid"],
            backend_start=data["backend_start"],
            terminate=data["terminate"],
        )
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        if data["terminate"]:
            messages.success(request, _("Session %(pid)s terminated.") % {"pid": session.pid})
        else:
            messages.success(request, _("Cancel sent to session %(pid)s.") % {"pid": session.pid})
    return redirect("invoice_lines_sessions", env_key=env.key)


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
    table = UpsertRunTable(
        selectors.with_rollbacks(UpsertRun.objects.filter(environment=env.key).select_related("requested_by"))
    )
    table_configure(request, table, per_page=RUNS_PER_PAGE)
    return render(request, "reconciliation/upsert_runs.html", {"env": env, "table": table})


@require_GET
def upsert_audit_rows(request: HttpRequest, env_key: str, run_pk: int) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    run = get_object_or_404(UpsertRun, pk=run_pk, environment=env.key)
    if run.dry_run:
        raise Http404("A dry run writes no audit rows.")
    page = page_number(request)
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


def _recent_jobs(env: Environment, kind: str) -> list[Any]:
    return list(job_selectors.jobs_recent(environment=env.key).filter(kind=kind)[:RECENT_JOBS])


def _files_steps_context(request: HttpRequest, env: Environment) -> dict[str, Any]:
    """The home page's backup (§1.1), artifact validation (§1.3) and verification (§4) sections."""
    backup_list, backup_error = _backups(env)
    try:
        folders, folders_error = artifacts.run_folders_list(), ""
    except artifacts.ArtifactError as exc:
        folders, folders_error = [], str(exc)
    run_ids = (
        UpsertRun.objects.filter(environment=env.key, dry_run=False)
        .order_by("-id")
        .values_list("run_id", flat=True)[:50]
    )
    return {
        "backups": backup_list[:RECENT_BACKUPS],
        "backups_total": len(backup_list),
        "backup_error": backup_error,
        "backup_jobs": _recent_jobs(env, "database_backup"),
        **_restore_context(request, env),
        "run_folders": folders,
        "run_folders_error": folders_error,
        "reconciliations_dir": artifacts.reconciliations_dir(),
        "artifact_form": ArtifactValidateForm(folders=folders),
        "artifact_jobs": _recent_jobs(env, "artifact_validate"),
        "verify_form": UpsertVerifyForm(initial={"run_id": request.GET.get("run_id", "")[:200]}),
        "verify_run_ids": list(run_ids),
        "verify_jobs": _recent_jobs(env, "upsert_verify"),
    }


def _restore_context(request: HttpRequest, env: Environment) -> dict[str, Any]:
    """What the backups table needs for its Restore… action: shown to approvers, disabled
    with the reason where the environment may not be restored."""
    return {"can_restore": access.is_approver(request.user), "restore_refusal": restore.restore_refusal(env)}


def _backups(env: Environment) -> tuple[list[backups.Backup], str]:
    try:
        return backups.backups_list(env), ""
    except backups.BackupError as exc:
        return [], str(exc)


@require_GET
def backup_list(request: HttpRequest, env_key: str) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    backup_files, error = _backups(env)
    return render(
        request,
        "reconciliation/backups.html",
        {
            "env": env,
            "can_queue": access.is_operator(request.user),
            "backups": backup_files,
            "backup_error": error,
            "backup_folder": backups.backup_folder(env),
            "backup_jobs": _recent_jobs(env, "database_backup"),
            "restore_jobs": _recent_jobs(env, restore.RESTORE_KIND),
            **_restore_context(request, env),
        },
    )


@require_POST
def backup_request(request: HttpRequest, env_key: str) -> HttpResponse:
    return _queue(
        request, env_key, _("Backup"), lambda env: backups.backup_request(actor=request.user, env=env)
    )


@require_http_methods(["GET", "POST"])
def backup_restore(request: HttpRequest, env_key: str, backup: str) -> HttpResponse:
    """The restore form for one backup (approvers): what it is, the environment's name to
    type and a reason; a valid request leads to the job's page, where another approver decides."""
    access.require_approver(request.user)
    env = access.get_environment_for_user(request.user, env_key)
    try:
        candidate = restore.restore_candidate(env, backup)
    except backups.BackupError as exc:
        raise Http404(str(exc)) from None
    form = RestoreForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            job = restore.restore_request(
                actor=request.user,
                env=env,
                backup_name=candidate.backup.name,
                confirmation=form.cleaned_data["confirmation"],
                reason=form.cleaned_data["reason"],
            )
        except ValidationError as exc:  # refused (also JobConflict: a restore is already under way)
            form.add_error(None, exc)
        else:
            messages.success(
                request,
                _("Restore requested as job #%(id)s; it waits for another approver.") % {"id": job.pk},
            )
            return redirect("job_detail", job_id=job.pk)
    return render(
        request,
        "reconciliation/backup_restore.html",
        {
            "env": env,
            "candidate": candidate,
            "form": form,
            "refusal": restore.restore_refusal(env),
            "lock_wait_s": restore.RESTORE_LOCK_WAIT_TIMEOUT_MS // 1000,
        },
    )


def restore_job_detail_context(job: Job, user: Any) -> dict[str, Any]:
    """What the page of a restore job adds: the backup the approver decides on, whether the
    file is still the one requested (by its manifest; the job checks the sha256 itself), and
    whether the environment may still be restored."""
    access.require_viewer(user)
    try:
        env = get_environment(job.environment)
    except UnknownEnvironment:  # no longer configured: the job page says so itself
        return {}
    try:
        candidate: restore.RestoreCandidate | None = restore.restore_candidate(
            env, job.params.get("backup", "")
        )
        problem = ""
    except backups.BackupError as exc:
        candidate, problem = None, str(exc)
    if candidate is not None and (
        candidate.backup.sha256 != job.params.get("sha256")
        or candidate.backup.size_bytes != job.params.get("size_bytes")
    ):
        problem = _("The backup file is no longer the one requested; the job will refuse to run.")
    return {
        "restore_env": env,
        "restore_candidate": candidate,
        "restore_problem": problem,
        "restore_refusal": restore.restore_refusal(env),
        "lock_wait_s": restore.RESTORE_LOCK_WAIT_TIMEOUT_MS // 1000,
    }


@require_POST
def artifact_validate_request(request: HttpRequest, env_key: str) -> HttpResponse:
    def request_job(env: Environment) -> Job:
        try:
            form = ArtifactValidateForm(request.POST, folders=artifacts.run_folders_list())
            if not form.is_valid():
                raise ValidationError(_("Choose one of the listed run folders."))
            return artifacts.artifact_validate_request(
                actor=request.user, env=env, run_folder=form.cleaned_data["run_folder"]
            )
        except artifacts.ArtifactError as exc:  # the folder is unreadable, or went since it was listed
            raise ValidationError(str(exc)) from None

    return _queue(request, env_key, _("Artifact validation"), request_job)


@require_POST
def upsert_verify_request(request: HttpRequest, env_key: str) -> HttpResponse:
    def request_job(env: Environment) -> Job:
        form = UpsertVerifyForm(request.POST)
        if not form.is_valid():
            raise ValidationError(_("Give the run id to verify (at most 200 characters)."))
        return verification.upsert_verify_request(
            actor=request.user, env=env, run_id=form.cleaned_data["run_id"]
        )

    return _queue(request, env_key, _("Verification"), request_job)


def upsert_job_detail_context(job: Job, user: Any) -> dict[str, Any]:
    """What the page of an upsert job adds: the run, and (while the job has not settled) the
    first lines of the file, so that an approver sees what they approve."""
    access.require_viewer(user)
    return {
        "run": UpsertRun.objects.filter(job=job).first(),
        "preview": [] if job.is_finished else upload_preview(job.params.get("upload", "")),
    }


# --- Rollback of a run (runbook §6.2) ---------------------------------------------------------------


@require_http_methods(["GET", "POST"])
def rollback_preview(request: HttpRequest, env_key: str) -> HttpResponse:
    """What rolling back a run would do, line by line; operators request it from here."""
    env = access.get_environment_for_user(request.user, env_key)
    can_request = access.is_operator(request.user)
    form = RollbackRequestForm(request.POST or None)
    if request.method == "POST":
        access.require_operator(request.user)
        if form.is_valid():
            data = form.cleaned_data
            try:
                job = rollback.rollback_request(
                    actor=request.user,
                    env=env,
                    run_id=data["run_id"],
                    digest=data["digest"],
                    reason=data["reason"],
                    confirmation=data["confirmation"],
                )
            except ValidationError as exc:
                form.add_error(None, exc)
            else:
                messages.success(
                    request,
                    _("Rollback of run %(run)s requested as job #%(id)s; it waits for an approver.")
                    % {"run": data["run_id"], "id": job.pk},
                )
                return redirect("job_detail", job_id=job.pk)
        run_id = str(request.POST.get("run_id", ""))
    else:
        run_id = request.GET.get("run_id", "").strip()
    context: dict[str, Any] = {"env": env, "run_id": run_id, "form": form, "can_request": can_request}
    if run_id:
        try:
            preview = rollback.rollback_preview(env, run_id, page=page_number(request))
        except ValidationError as exc:
            context["error"] = " ".join(exc.messages)
        except DatabaseError as exc:
            context["error"] = job_selectors.describe_error(exc)
        else:
            context["preview"] = preview
            context["existing"] = RunRollback.objects.filter(
                environment=env.key,
                run_id=run_id,
                status__in=[RollbackStatus.REQUESTED, RollbackStatus.SUCCEEDED],
            ).first()
            if request.method == "GET":
                form = RollbackRequestForm(initial={"run_id": run_id, "digest": preview.digest})
                context["form"] = form
    return render(request, "reconciliation/rollback_preview.html", context)


def rollback_job_detail_context(job: Job, user: Any) -> dict[str, Any]:
    """The approver's view: the preview as it is now, and whether it is still the one requested."""
    context: dict[str, Any] = {"rollback": RunRollback.objects.filter(job=job).first()}
    if job.status != JobStatus.AWAITING_APPROVAL:
        return context
    try:
        preview = rollback.rollback_preview(get_environment(job.environment), job.params["run_id"])
    except (ValidationError, DatabaseError) as exc:
        context["preview_error"] = " ".join(getattr(exc, "messages", [str(exc)]))
        return context
    context["preview"] = preview
    context["preview_changed"] = preview.digest != job.params.get("preview_digest")
    return context
