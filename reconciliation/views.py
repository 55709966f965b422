"""Reconciliation pages (runbook §1 to §5): thin views over reconciliation's services."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from billing_ops import access, selectors
from billing_ops.environments import Environment
from reconciliation import artifacts, backups, verification
from reconciliation.forms import ArtifactValidateForm, UpsertVerifyForm
from reconciliation.models import UpsertRun

RECENT_JOBS = 5
RECENT_BACKUPS = 5


@require_GET
def reconciliation_home(request: HttpRequest, env_key: str) -> HttpResponse:
    env = access.get_environment_for_user(request.user, env_key)
    return render(
        request,
        "reconciliation/home.html",
        {
            "env": env,
            "can_queue": access.is_operator(request.user),
            "can_approve": access.is_approver(request.user),
            **_files_steps_context(request, env),
        },
    )


def _recent_jobs(env: Environment, kind: str) -> list[Any]:
    return list(selectors.jobs_recent(environment=env.key).filter(kind=kind)[:RECENT_JOBS])


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
        "run_folders": folders,
        "run_folders_error": folders_error,
        "reconciliations_dir": artifacts.reconciliations_dir(),
        "artifact_form": ArtifactValidateForm(folders=folders),
        "artifact_jobs": _recent_jobs(env, "artifact_validate"),
        "verify_form": UpsertVerifyForm(initial={"run_id": request.GET.get("run_id", "")[:200]}),
        "verify_run_ids": list(run_ids),
        "verify_jobs": _recent_jobs(env, "upsert_verify"),
    }


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
        },
    )


@require_POST
def backup_request(request: HttpRequest, env_key: str) -> HttpResponse:
    access.require_operator(request.user)
    env = access.get_environment_for_user(request.user, env_key)
    try:
        job = backups.backup_request(actor=request.user, env=env)
    except ValidationError as exc:  # JobConflict: a backup of this environment is under way
        messages.error(request, " ".join(exc.messages))
        return redirect("backup_list", env_key=env.key)
    messages.success(request, _("Backup queued as job #%(id)s.") % {"id": job.pk})
    return redirect("job_detail", job_id=job.pk)


@require_POST
def artifact_validate_request(request: HttpRequest, env_key: str) -> HttpResponse:
    access.require_operator(request.user)
    env = access.get_environment_for_user(request.user, env_key)
    try:
        folders = artifacts.run_folders_list()
    except artifacts.ArtifactError as exc:
        messages.error(request, str(exc))
        return redirect("reconciliation_home", env_key=env.key)
    form = ArtifactValidateForm(request.POST, folders=folders)
    if not form.is_valid():
        messages.error(request, _("Choose one of the listed run folders."))
        return redirect("reconciliation_home", env_key=env.key)
    try:
        job = artifacts.artifact_validate_request(
            actor=request.user, env=env, run_folder=form.cleaned_data["run_folder"]
        )
    except artifacts.ArtifactError as exc:  # removed since the list was read
        messages.error(request, str(exc))
        return redirect("reconciliation_home", env_key=env.key)
    messages.success(request, _("Artifact validation queued as job #%(id)s.") % {"id": job.pk})
    return redirect("job_detail", job_id=job.pk)


@require_POST
def upsert_verify_request(request: HttpRequest, env_key: str) -> HttpResponse:
    access.require_operator(request.user)
    env = access.get_environment_for_user(request.user, env_key)
    form = UpsertVerifyForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("Give the run id to verify (at most 200 characters)."))
        return redirect("reconciliation_home", env_key=env.key)
    job = verification.upsert_verify_request(actor=request.user, env=env, run_id=form.cleaned_data["run_id"])
    messages.success(request, _("Verification queued as job #%(id)s.") % {"id": job.pk})
    return redirect("job_detail", job_id=job.pk)
