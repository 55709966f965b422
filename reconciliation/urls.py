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
]
