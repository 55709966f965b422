"""Error pages the views do not render themselves.

An environment's database that cannot be reached makes its pages answer 503, not 500.

Each environment page reads that environment's database. When it is down, refuses us or
cancels our statement (statement_timeout), the page says so — which environment, what the
server said (never the URL or password) — with the environment's navigation, and the
rest of the dashboard goes on working. Errors of the dashboard's own database are not
blamed on an environment: they stay 500s.

An action's address opened in the browser (a POST-only view) answers 405 with a page that
says so, instead of the browser's own blank error.
"""

from __future__ import annotations

from typing import Any

import psycopg
from django.db import InterfaceError, OperationalError, connections
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from billing_ops import selectors
from billing_ops.environments import get_environment

# A server down, refusing us or cancelling our statement; not a bug in a query (those stay
# 500s and are logged).
UNAVAILABLE_ERRORS = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)


class EnvironmentUnavailableMiddleware:
    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        match = request.resolver_match
        env_key = match.kwargs.get("env_key") if match else None
        if not env_key or not isinstance(exception, UNAVAILABLE_ERRORS) or not _dashboard_database_up():
            return None
        try:
            env = get_environment(env_key)
        except Exception:
            return None
        connections[env.alias].close()  # a broken connection must not serve the next request
        return render(
            request,
            "environment_unavailable.html",
            {"env": env, "error": selectors.describe_error(exception)},
            status=503,
        )


def _dashboard_database_up() -> bool:
    try:
        selectors.dashboard_database_latency_ms()
    except Exception:
        return False
    return True


class MethodNotAllowedPageMiddleware:
    """A 405 with nothing in it (``require_POST``) gets a page naming the problem; the
    status and the Allow header stay."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if response.status_code != 405 or response.content or request.method not in ("GET", "HEAD"):
            return response
        page = render(request, "405.html", status=405)
        page["Allow"] = response.get("Allow", "")
        return page
