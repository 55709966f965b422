"""Security (issue 7, SECURITY.md): production settings pass `check --deploy` and send the
hardening headers; sign-in throttling; no SQL built from user strings; no environment
password on any page, log or error; uploads outside the web root and removed after the job.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.test import Client

from audit.models import AuditEntry
from tests.conftest import make_user

BASE_DIR = Path(__file__).resolve().parent.parent


def production_environ(**extra: str) -> dict[str, str]:
    """The process environment of a production deployment: no debug, demo or test flag, a
    real-looking secret key; nothing inherited from the shell that could change a setting."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "BILLING_OPS_"))}
    environ.update(
        {
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(64),
            "DATABASE_URL": "postgresql://typecheck@localhost/typecheck",
            "REDIS_URL": "redis://localhost/0",
            "BILLING_OPS_ENVIRONMENTS": str(BASE_DIR / ".ci" / "environments.toml"),
        }
    )
    environ.update(extra)
    return environ


def manage(*args: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- Production settings ----------------------------------------------------------------------


def test_check_deploy_is_clean_with_production_settings() -> None:
    done = manage("check", "--deploy", "--fail-level", "WARNING", environ=production_environ())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues (0 silenced)" in done.stdout


@pytest.mark.parametrize(
    ("variable", "value", "warning"),
    [
        ("DJANGO_SECURE_COOKIES", "false", "security.W012"),
        ("DJANGO_HSTS_SECONDS", "0", "security.W004"),
        ("DJANGO_SECURE_SSL_REDIRECT", "false", "security.W008"),
    ],
)
def test_check_deploy_notices_a_weakened_setting(variable: str, value: str, warning: str) -> None:
    """The clean check above can fail: each switch it depends on is seen when turned off."""
    done = manage("check", "--deploy", environ=production_environ(**{variable: value}))
    assert warning in done.stdout + done.stderr


PRODUCTION_PROBE = """
import json, os
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_ops.settings")
django.setup()
from django.test import Client

out = {}
client = Client()
response = client.get("/login/")
out["http_login"] = [response.status_code, response.get("Location", "")]
out["http_healthz"] = client.get("/healthz").status_code
response = client.get("/login/", secure=True)
out["login_status"] = response.status_code
out["headers"] = dict(response.headers.items())
csrf = response.cookies["csrftoken"]
out["csrf_cookie"] = {"secure": bool(csrf["secure"]), "samesite": csrf["samesite"]}
response = client.post(
    "/login/", {"username": os.environ["PROBE_USER"], "password": os.environ["PROBE_PASSWORD"]}, secure=True
)
out["sign_in"] = [response.status_code, response.get("Location", "")]
session = response.cookies["sessionid"]
out["session_cookie"] = {
    "secure": bool(session["secure"]), "httponly": bool(session["httponly"]), "samesite": session["samesite"]
}
print("PROBE " + json.dumps(out))
"""


@pytest.mark.django_db(transaction=True)
def test_production_responses_carry_the_security_headers(worker_environ, tmp_path) -> None:
    """A production process (a subprocess: the settings are read once, at start-up) serves
    the sign-in page over HTTPS only, with HSTS, CSP, nosniff, frame denial and cookies
    that are Secure and (the session's) HttpOnly."""
    password = secrets.token_urlsafe(16)
    user = make_user("prod-probe", "Viewer")
    # The production process hashes with PBKDF2 (tests use MD5 for speed).
    user.password = PBKDF2PasswordHasher().encode(password, PBKDF2PasswordHasher().salt())
    user.save(update_fields=["password"])
    environ = production_environ(
        DATABASE_URL=worker_environ["DATABASE_URL"],
        REDIS_URL=worker_environ["REDIS_URL"] if "REDIS_URL" in worker_environ else os.environ["REDIS_URL"],
        BILLING_OPS_ENVIRONMENTS=worker_environ["BILLING_OPS_ENVIRONMENTS"],
        BILLING_OPS_QUEUE=worker_environ["BILLING_OPS_QUEUE"],
        BILLING_OPS_VAR_DIR=str(tmp_path),
        DJANGO_ALLOWED_HOSTS="testserver",
        PROBE_USER="prod-probe",
        PROBE_PASSWORD=password,
    )
    environ.update({k: v for k, v in worker_environ.items() if k.startswith("BILLING_OPS_TESTENV_")})
    collected = manage("collectstatic", "--noinput", "-v", "0", environ=environ)
    assert collected.returncode == 0, collected.stderr
    done = subprocess.run(
        [sys.executable, "-c", PRODUCTION_PROBE],
        cwd=BASE_DIR,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    probe_lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert probe_lines, done.stdout + done.stderr
    out: dict[str, Any] = json.loads(probe_lines[0][len("PROBE ") :])

    assert out["http_login"] == [301, "https://testserver/login/"]
    assert out["http_healthz"] in (200, 503)  # probes over plain HTTP are not redirected
    assert out["login_status"] == 200
    headers = {k.lower(): v for k, v in out["headers"].items()}
    assert headers["strict-transport-security"] == "max-age=31536000; includeSubDomains; preload"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "same-origin"
    assert headers["cross-origin-opener-policy"] == "same-origin"
    csp = headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert out["csrf_cookie"]["secure"]
    assert out["sign_in"] == [302, "/"]
    assert out["session_cookie"] == {"secure": True, "httponly": True, "samesite": "Lax"}


@pytest.mark.django_db
def test_every_response_carries_the_content_security_policy(viewer, client_for, settings) -> None:
    """In every mode (the browser tests run with it): the page only loads its own files."""
    response = client_for(viewer).get("/")
    assert response.status_code == 200
    assert response["Content-Security-Policy"] == settings.CONTENT_SECURITY_POLICY
    assert response["X-Frame-Options"] == "DENY"
    body = response.content.decode()
    # Nothing the policy would block: no inline script or style, no style attribute.
    assert "<script>" not in body and "<style" not in body and " style=" not in body
