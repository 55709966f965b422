"""Access checks. Every view and service goes through these; the server enforces them all.

Roles are Django groups carrying three permissions:

* Viewer   - ``billing_ops.view_dashboard``: read everything, change nothing.
* Operator - also ``billing_ops.queue_job``: request jobs, cancel their own.
* Approver - also ``billing_ops.approve_job``: approve or refuse other people's requests.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _

from billing_ops.environments import Environment, UnknownEnvironment, get_environment

logger = logging.getLogger(__name__)

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
    from audit.models import AuditAction
    from audit.services import ANONYMOUS_ACTOR, audit_record

    remote = request.META.get("REMOTE_ADDR", "") if request is not None else ""
    username = str(credentials.get("username", ""))[:150]
    # Django has already replaced the password in `credentials`; keep only the name.
    audit_record(
        actor=ANONYMOUS_ACTOR,
        action=AuditAction.LOGIN_FAILED,
        params={"username": username, "remote_addr": remote},
    )
    login_failure_count(username, remote)


def local_path(request: Any, target: str, default: str) -> str:
    """``target`` when it is a path on this site, else ``default``: a form's "back to" or
    "next" field. redirect() would read a bare word such as "nope" as a view name (a 500),
    and another site must never be where a form of ours sends the user."""
    if target.startswith("/") and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return default


# --- Sign-in throttling ----------------------------------------------------------------------
# Counters in Redis, one per user name (hashed: the key does not show it) and one per client
# address, each expiring LOGIN_FAILURE_WINDOW_S after its first failure. The same answer
# whether the user exists or not. Redis unreachable: no throttling (fail open, logged), so
# that sign-in keeps working while the broker is down; failures are still audited.


def _redis() -> redis.Redis:
    return _redis_for(settings.REDIS_URL)


@functools.lru_cache(maxsize=4)
def _redis_for(url: str) -> redis.Redis:
    """One client (and connection pool) per URL, not a new one per sign-in attempt."""
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)


def _login_counters(username: str, remote_addr: str) -> list[tuple[str, str, int]]:
    """(what it counts by, its Redis key, its limit) for each counter of this attempt."""
    name = hashlib.sha256(username.strip().casefold().encode("utf-8", "replace")).hexdigest()
    prefix = settings.LOGIN_FAILURE_KEY_PREFIX
    counters = [("user", f"{prefix}user:{name}", settings.LOGIN_FAILURE_LIMIT)]
    if remote_addr and settings.LOGIN_FAILURE_LIMIT_PER_ADDRESS:
        counters.append(("address", f"{prefix}addr:{remote_addr}", settings.LOGIN_FAILURE_LIMIT_PER_ADDRESS))
    return counters


def login_locked_for(username: str, remote_addr: str) -> int:
    """Seconds until this user name and address may try to sign in again (0: now)."""
    wait = 0
    try:
        client = _redis()
        for _by, key, limit in _login_counters(username, remote_addr):
            if int(client.get(key) or 0) >= limit:
                wait = max(wait, int(client.ttl(key)), 1)
    except redis.RedisError as exc:
        logger.warning("sign-in throttling unavailable (Redis: %s); not throttling", type(exc).__name__)
        return 0
    return wait


def login_failure_count(username: str, remote_addr: str) -> None:
    """Count one failed sign-in; the failure that reaches a limit is audited as a lockout."""
    from audit.models import AuditAction
    from audit.services import ANONYMOUS_ACTOR, audit_record

    try:
        client = _redis()
        for by, key, limit in _login_counters(username, remote_addr):
            count = int(client.incr(key))
            if count == 1 or client.ttl(key) < 0:
                client.expire(key, settings.LOGIN_FAILURE_WINDOW_S)
            if count == limit:
                audit_record(
                    actor=ANONYMOUS_ACTOR,
                    action=AuditAction.LOGIN_THROTTLED,
                    params={
                        "username": username,
                        "remote_addr": remote_addr,
                        "by": by,
                        "failures": limit,
                        "window_s": settings.LOGIN_FAILURE_WINDOW_S,
                    },
                )
    except redis.RedisError as exc:
        logger.warning("sign-in throttling unavailable (Redis: %s); not counting", type(exc).__name__)


def login_failures_forget(username: str) -> None:
    """A successful sign-in clears its user name's count (not the address's)."""
    try:
        _redis().delete(_login_counters(username, "")[0][1])
    except redis.RedisError as exc:
        logger.warning("sign-in throttling unavailable (Redis: %s)", type(exc).__name__)
