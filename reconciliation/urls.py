from __future__ import annotations

from django.urls import path

from reconciliation import views

urlpatterns = [
    path("environments/<str:env_key>/reconciliation/", views.reconciliation_home, name="reconciliation_home"),
]
