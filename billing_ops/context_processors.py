from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from billing_ops import access
from billing_ops.environments import all_environments


def navigation(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    return {
        "nav_environments": all_environments() if access.is_viewer(user) else [],
        "can_queue": access.is_operator(user),
        "can_approve": access.is_approver(user),
    }
