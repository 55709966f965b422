from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from billing_ops import access
from billing_ops.environments import all_environments


def navigation(request: HttpRequest) -> dict[str, Any]:
    from locks.history import alerts_active

    user = getattr(request, "user", None)
    viewer = access.is_viewer(user)
    return {
        "nav_environments": all_environments() if viewer else [],
        # A callable: counted only where a template shows it (base.html), never for the
        # fragments htmx polls every second.
        "nav_active_alerts": alerts_active().count if viewer else 0,
        "can_queue": access.is_operator(user),
        "can_approve": access.is_approver(user),
    }
