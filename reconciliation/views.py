"""Reconciliation pages (runbook §1 to §5): thin views over reconciliation's services."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from billing_ops import access


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
        },
    )
