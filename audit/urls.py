from __future__ import annotations

from django.urls import path

from audit import views

urlpatterns = [
    path("audit/", views.audit_trail, name="audit_trail"),
    path("audit/export.csv", views.audit_trail_export, name="audit_trail_export"),
    path("audit/chain/", views.dashboard_chain, name="dashboard_chain"),
    path("audit/chain/verify/", views.dashboard_chain_verify, name="dashboard_chain_verify"),
    path("environments/<str:env_key>/audit/", views.environment_chain, name="environment_chain"),
    path(
        "environments/<str:env_key>/audit/verify/",
        views.environment_chain_verify,
        name="environment_chain_verify",
    ),
]
