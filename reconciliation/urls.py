from __future__ import annotations

from django.urls import path

from reconciliation import views

urlpatterns = [
    path("environments/<str:env_key>/reconciliation/", views.reconciliation_home, name="reconciliation_home"),
    path("environments/<str:env_key>/reconciliation/backups/", views.backup_list, name="backup_list"),
    path(
        "environments/<str:env_key>/reconciliation/backups/request/",
        views.backup_request,
        name="backup_request",
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
]
