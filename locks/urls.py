from __future__ import annotations

from django.urls import path

from locks import views

urlpatterns = [
    path("", views.overview, name="overview"),
    path("environments/<str:env_key>/stuck-runs/", views.stuck_runs, name="stuck_runs"),
    path("environments/<str:env_key>/suspicious-runs/", views.suspicious_runs, name="suspicious_runs"),
    path("environments/<str:env_key>/runs/<int:run_id>/", views.run_detail, name="run_detail"),
    path("environments/<str:env_key>/locks-without-run/", views.locks_without_run, name="locks_without_run"),
    path("environments/<str:env_key>/procedure/", views.procedure, name="procedure"),
    path("lookup/", views.lock_lookup, name="lock_lookup"),
    path("report.<str:fmt>", views.report_download, name="report_download"),
    path("metrics", views.metrics, name="metrics"),
    path("environments/<str:env_key>/releases/preview/", views.release_preview, name="release_preview"),
    path("environments/<str:env_key>/releases/<int:plan_id>/", views.release_plan, name="release_plan"),
    path(
        "environments/<str:env_key>/releases/<int:plan_id>/request/",
        views.release_confirm,
        name="release_confirm",
    ),
    path("jobs/<int:job_id>/restore-locks/", views.release_restore, name="release_restore"),
    path("cleanup-schedule/", views.cleanup_schedule, name="cleanup_schedule"),
    path("alerts/", views.alert_list, name="alert_list"),
    path("alerts/<int:alert_id>/acknowledge/", views.alert_acknowledge, name="alert_acknowledge"),
]
