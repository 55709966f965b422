from __future__ import annotations

from django.urls import path

from reconciliation import views

urlpatterns = [
    path("environments/<str:env_key>/reconciliation/", views.reconciliation_home, name="reconciliation_home"),
    path("environments/<str:env_key>/reconciliation/upsert/", views.upsert_new, name="upsert_new"),
    path("environments/<str:env_key>/reconciliation/runs/", views.upsert_runs, name="upsert_runs"),
    path(
        "environments/<str:env_key>/reconciliation/runs/<int:run_pk>/audit/",
        views.upsert_audit_rows,
        name="upsert_audit_rows",
    ),
    path(
        "environments/<str:env_key>/reconciliation/duplicates/precheck/",
        views.duplicate_precheck_request,
        name="duplicate_precheck_request",
    ),
    path(
        "environments/<str:env_key>/reconciliation/duplicates/resolve/",
        views.duplicate_resolve_request,
        name="duplicate_resolve_request",
    ),
    path(
        "environments/<str:env_key>/reconciliation/indexes/check/",
        views.index_check_request,
        name="index_check_request",
    ),
    path(
        "environments/<str:env_key>/reconciliation/indexes/create/",
        views.index_create_request,
        name="index_create_request",
    ),
    path(
        "environments/<str:env_key>/reconciliation/sessions/",
        views.invoice_lines_sessions,
        name="invoice_lines_sessions",
    ),
    path(
        "environments/<str:env_key>/reconciliation/sessions/signal/",
        views.session_signal,
        name="session_signal",
    ),
    path("environments/<str:env_key>/reconciliation/backups/", views.backup_list, name="backup_list"),
    path(
        "environments/<str:env_key>/reconciliation/backups/request/",
        views.backup_request,
        name="backup_request",
    ),
    path(
        "environments/<str:env_key>/reconciliation/backups/<str:backup>/restore/",
        views.backup_restore,
        name="backup_restore",
    ),
    path(
        "environments/<str:env_key>/reconciliation/artifacts/validate/",
        views.artifact_validate_request,
        name="artifact_validate_request",
    ),
    path(
        "environments/<str:env_key>/reconciliation/verify/",
        views.upsert_verify_request,
        name="upsert_verify_request",
    ),
    path(
        "environments/<str:env_key>/reconciliation/rollback/",
        views.rollback_preview,
        name="rollback_preview",
    ),
]
