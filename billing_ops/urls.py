from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import include, path

from billing_ops import views
from billing_ops.forms import ThrottledAuthenticationForm

handler403 = "billing_ops.views.permission_denied"

urlpatterns = [
    path("", include("locks.urls")),
    path("", include("reconciliation.urls")),
    path("", include("audit.urls")),
    path(
        "login/",
        auth_views.LoginView.as_view(
            redirect_authenticated_user=True, authentication_form=ThrottledAuthenticationForm
        ),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", views.healthz, name="healthz"),
    path("environments/<str:env_key>/", views.environment_detail, name="environment_detail"),
    path("jobs/", views.job_list, name="job_list"),
    path("jobs/environment-check/", views.environment_check_request, name="environment_check_request"),
    path("jobs/<int:job_id>/", views.job_detail, name="job_detail"),
    path("jobs/<int:job_id>/status/", views.job_status_fragment, name="job_status"),
    path("jobs/<int:job_id>/approve/", views.job_approve, name="job_approve"),
    path("jobs/<int:job_id>/refuse/", views.job_refuse, name="job_refuse"),
    path("jobs/<int:job_id>/cancel/", views.job_cancel, name="job_cancel"),
    path("approvals/", views.approval_list, name="approval_list"),
    path("notifications/", views.notification_list, name="notification_list"),
    path("preferences/", views.preference_edit, name="preference_edit"),
    path("preferences/language/", views.language_set, name="language_set"),
]
