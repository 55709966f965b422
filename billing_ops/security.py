"""Browser-side hardening the SecurityMiddleware does not cover (SECURITY.md).

Django 5.2 has no Content-Security-Policy support of its own. The policy is one static
string (settings.CONTENT_SECURITY_POLICY): the dashboard needs no nonces, because it has
no inline script or style, so a library for it would add a dependency and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        policy = settings.CONTENT_SECURITY_POLICY
        if policy and "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = policy
        return response
