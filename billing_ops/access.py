"""Access checks. Every view and service goes through these; the server enforces them all.

Roles are Django groups carrying three permissions:

* Viewer   - ``billing_ops.view_dashboard``: read everything, change nothing.
* Operator - also ``billing_ops.queue_job``: request jobs, cancel their own.
* Approver - also ``billing_ops.approve_job``: approve or refuse other people's requests.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.utils.translation import gettext as _

from billing_ops.environments import Environment, UnknownEnvironment, get_environment

VIEW_PERM = "billing_ops.view_dashboard"
QUEUE_PERM = "billing_ops.queue_job"
APPROVE_PERM = "billing_ops.approve_job"

ROLE_PERMISSIONS: dict[str, tuple[str, ...]] = {
    "Viewer": ("view_dashboard",),
    "Operator": ("view_dashboard", "queue_job"),
    "Approver": ("view_dashboard", "approve_job"),
}


def _active(user: Any) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active)


def is_viewer(user: Any) -> bool:
    return _active(user) and user.has_perm(VIEW_PERM)


def is_operator(user: Any) -> bool:
    return is_viewer(user) and user.has_perm(QUEUE_PERM)


def is_approver(user: Any) -> bool:
    return is_viewer(user) and user.has_perm(APPROVE_PERM)


def require_viewer(user: Any) -> None:
    if not is_viewer(user):
        raise PermissionDenied(_("You need the Viewer role to see the dashboard."))


def require_operator(user: Any) -> None:
    if not is_operator(user):
        raise PermissionDenied(_("Only operators can queue jobs."))


def require_approver(user: Any) -> None:
    if not is_approver(user):
        raise PermissionDenied(_("Only approvers can approve or refuse jobs."))


def require_operator_or_approver(user: Any) -> None:
    if not (is_operator(user) or is_approver(user)):
        raise PermissionDenied(_("Only operators and approvers can do this."))


def get_environment_for_user(user: Any, key: str) -> Environment:
    require_viewer(user)
    try:
        return get_environment(key)
    except UnknownEnvironment:
        raise Http404("No such environment.") from None


def record_login_failure(
    sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any
) -> None:
    """A failed login goes into the audit trail: who was tried, and from where."""
    from audit.services import ANONYMOUS_ACTOR, audit_record

    remote = request.META.get("REMOTE_ADDR", "") if request is not None else ""
    # Django has already replaced the password in `credentials`; keep only the name.
    audit_record(
        actor=ANONYMOUS_ACTOR,
        action="auth.login_failed",
        params={"username": str(credentials.get("username", ""))[:150], "remote_addr": remote},
    )
