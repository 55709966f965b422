"""Security (issue 7, SECURITY.md): production settings pass `check --deploy` and send the
hardening headers; sign-in throttling; no SQL built from user strings; no environment
password on any page, log or error; uploads outside the web root and removed after the job.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import re
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.db import connections
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
from django.db import connections
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
    for directive in (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ):
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


# --- Sign-in throttling -----------------------------------------------------------------------


def sign_in(client: Client, username: str, password: str, address: str = "127.0.0.1") -> Any:
    return client.post("/login/", {"username": username, "password": password}, REMOTE_ADDR=address)


@pytest.mark.django_db
def test_repeated_failures_lock_a_user_name_out_whoever_tries(settings) -> None:
    make_user("alice", "Viewer", password="alice-right-password")
    client = Client()
    for _ in range(settings.LOGIN_FAILURE_LIMIT):
        response = sign_in(client, "alice", "wrong")
        assert response.status_code == 200 and b"data-throttled" not in response.content
    # Locked out: even the right password is not tried, and the page says for how long.
    response = sign_in(client, "alice", "alice-right-password", address="10.9.9.9")
    assert response.status_code == 200 and "_auth_user_id" not in client.session
    assert "Too many failed sign-ins; try again in 15 minutes." in response.content.decode()
    # A user name that does not exist answers the same way (nothing tells them apart).
    for _ in range(settings.LOGIN_FAILURE_LIMIT):
        sign_in(client, "nobody-by-this-name", "wrong", address="10.1.1.1")
    ghost = sign_in(client, "nobody-by-this-name", "wrong", address="10.1.1.1")
    assert "Too many failed sign-ins; try again in 15 minutes." in ghost.content.decode()
    # The lockout is in the audit trail, once per counter that reached its limit.
    lockouts = AuditEntry.objects.filter(action="auth.login_throttled").order_by("created_at")
    assert [(e.params["username"], e.params["by"]) for e in lockouts] == [
        ("alice", "user"),
        ("nobody-by-this-name", "user"),
    ]
    assert AuditEntry.objects.filter(action="auth.login_failed").count() == 2 * settings.LOGIN_FAILURE_LIMIT
    assert "wrong" not in json.dumps([e.params for e in lockouts])
    # Other users are not affected.
    make_user("bob", "Viewer", password="bob-right-password")
    assert sign_in(Client(), "bob", "bob-right-password").status_code == 302


@pytest.mark.django_db
def test_a_success_clears_the_count_and_the_window_ends(settings) -> None:
    make_user("carol", "Viewer", password="carol-right-password")
    for _ in range(settings.LOGIN_FAILURE_LIMIT - 1):
        sign_in(Client(), "carol", "wrong")
    assert sign_in(Client(), "carol", "carol-right-password").status_code == 302
    for _ in range(settings.LOGIN_FAILURE_LIMIT - 1):  # counting starts again from zero
        sign_in(Client(), "carol", "wrong")
    assert sign_in(Client(), "carol", "carol-right-password").status_code == 302

    settings.LOGIN_FAILURE_WINDOW_S = 1
    for _ in range(settings.LOGIN_FAILURE_LIMIT):
        sign_in(Client(), "carol", "wrong")
    locked = sign_in(Client(), "carol", "carol-right-password")
    assert "Too many failed sign-ins; try again in 1 minute." in locked.content.decode()
    time.sleep(2.1)
    assert sign_in(Client(), "carol", "carol-right-password").status_code == 302


@pytest.mark.django_db
def test_many_user_names_from_one_address_lock_the_address_out(settings) -> None:
    settings.LOGIN_FAILURE_LIMIT_PER_ADDRESS = 4
    make_user("dave", "Viewer", password="dave-right-password")
    for n in range(4):
        sign_in(Client(), f"guess-{n}", "wrong", address="192.0.2.7")
    locked = sign_in(Client(), "dave", "dave-right-password", address="192.0.2.7")
    assert "Too many failed sign-ins" in locked.content.decode()
    assert AuditEntry.objects.get(action="auth.login_throttled").params["by"] == "address"
    assert sign_in(Client(), "dave", "dave-right-password", address="192.0.2.8").status_code == 302


@pytest.mark.django_db
def test_sign_in_works_unthrottled_while_redis_is_down(settings, blackhole_port) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # refused at once
    make_user("erin", "Viewer", password="erin-right-password")
    for _ in range(settings.LOGIN_FAILURE_LIMIT + 1):
        assert b"data-throttled" not in sign_in(Client(), "erin", "wrong").content
    assert AuditEntry.objects.filter(action="auth.login_failed").count() == settings.LOGIN_FAILURE_LIMIT + 1
    settings.REDIS_URL = f"redis://127.0.0.1:{blackhole_port}/0"  # a hung Redis: 1 s timeouts
    started = time.monotonic()
    assert sign_in(Client(), "erin", "erin-right-password").status_code == 302
    assert time.monotonic() - started < 10


# --- No SQL built from user strings ----------------------------------------------------------
# Every value formatted into SQL text (f-string, %, .format, +, psycopg's sql.SQL) must be a
# constant, an integer (int() or a :d format) or a quoted identifier/literal (quote_name,
# sql.Identifier, sql.Literal); user values go in as query parameters. The few names composed
# from the catalogue or from constants in code are listed here, each with why it is safe.
# A new interpolation fails this test until it is made safe or reviewed and listed.

SQL_START = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|SET|COPY|CREATE|DROP|ALTER|LOCK|ANALYZE|COMMENT|TRUNCATE|CALL)\b",
    re.IGNORECASE,
)
SAFE_CALLS = {"int", "quote_name", "Identifier", "Literal"}
SQL_COMPOSITION_ALLOWLIST: dict[tuple[str, str], str] = {
    ("billing_ops/contract.py", "schema"): "CONTRACT_SCHEMAS constant (demo/test databases only)",
    ("billing_ops/contract.py", "table"): "a constant table name (demo/test databases only)",
    ("billing_ops/demo.py", "columns"): "a column list written in the code (seed_demo)",
    ("billing_ops/demo.py", "table"): "a constant table name (seed_demo)",
    ("billing_ops/demo.py", "constraint"): "a constraint name read from pg_constraint (seed_demo)",
    ("billing_ops/demo.py", "table.split('.')[0]"): "the schema of a constant table name (seed_demo)",
    ("billing_ops/demo.py", "name"): "an index name read from pg_class (seed_demo)",
    ("billing_ops/demo.py", "key"): "'PRIMARY KEY' or 'UNIQUE', chosen in code",
    ("billing_ops/services.py", "schema_name"): "CONTRACT_TABLES constant",
    ("billing_ops/services.py", "table"): "CONTRACT_TABLES constant",
    ("locks/lookup.py", "created"): "LockTableShape.create_date_sql: a column written in code, or NULL",
    ("locks/lookup.py", "holder"): "LockTableShape.holder_sql: a column name from a fixed list of candidates",
    (
        "locks/selectors.py",
        "oldest_lock",
    ): "LockTableShape.create_date_sql: a column written in code, or NULL",
    ("locks/lookup.py", "where"): "one of two WHERE clauses written in code; the query is a parameter",
    (
        "locks/selectors.py",
        '("AND " + " AND ".join(lock_filters)) if lock_filters else ""',
    ): "conditions written in code; every filter value is a %(name)s parameter",
    ("locks/selectors.py", '" AND ".join(run_filters)'): "as above",
    ("locks/selectors.py", '("HAVING " + " AND ".join(having)) if having else ""'): "as above",
    ("locks/selectors.py", "dates"): "one of two expressions written in code (catalogue shape)",
    ("locks/selectors.py", "holder"): "a column name read from the catalogue (lock_table_shape)",
    ("locks/selectors.py", "oldest"): "one of two expressions written in code (catalogue shape)",
    ("reconciliation/auditlog.py", "rows_sql"): "the _AUDIT_ROWS constants of upsert and rollback",
    ("reconciliation/auditlog.py", "columns"): "AuditObject keys written in code (checked by KEY_PATTERN)",
    ("reconciliation/rollback.py", '_complete("p.before")'): "JSON key tests over constant column names",
    ("reconciliation/rollback.py", '_same_as("p.after")'): "JSON key tests over constant column names",
    ("reconciliation/upsert.py", "columns"): "sql.Identifier of each column of the CSV's header",
    ("audit/selectors.py", "table"): "quote_name of the model's table",
    ("audit/services.py", "table"): "quote_name of the model's table",
}


def _literal_text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(str(v.value) for v in node.values if isinstance(v, ast.Constant))
    return None


def _is_sql_text(node: ast.AST) -> bool:
    """A string literal, or an f-string whose text before any value, that starts a statement."""
    if isinstance(node, ast.JoinedStr):
        head = node.values[0] if node.values else None
        return isinstance(head, ast.Constant) and bool(SQL_START.match(str(head.value)))
    return bool(SQL_START.match(_literal_text(node) or ""))


REQUEST_DATA = {"GET", "POST", "FILES", "COOKIES", "META"}  # upper case, and anything but constant


def _is_constant_name(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id.isupper()) or (
        isinstance(node, ast.Attribute) and node.attr.isupper() and node.attr not in REQUEST_DATA
    )


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _is_safe(node: ast.AST, spec: ast.AST | None = None) -> bool:
    if spec is not None and (_literal_text(spec) or "").endswith("d"):
        return True
    if isinstance(node, ast.Constant) or _is_constant_name(node):
        return True
    if isinstance(node, ast.Subscript):
        return _is_constant_name(node.value) and _is_safe(node.slice)
    if isinstance(node, ast.IfExp):
        return _is_safe(node.body) and _is_safe(node.orelse)
    if isinstance(node, ast.JoinedStr):
        return all(_is_safe(v.value, v.format_spec) for v in node.values if isinstance(v, ast.FormattedValue))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _is_safe(node.left) and _is_safe(node.right)
    if isinstance(node, (ast.GeneratorExp, ast.ListComp)):
        return _is_safe(node.elt)
    if isinstance(node, ast.Call):
        name = _call_name(node)
        args = [*node.args, *(k.value for k in node.keywords)]
        if name in SAFE_CALLS:
            return True
        if name == "SQL":
            return all(_is_safe(a) for a in args)
        if name in ("format", "join", "replace") and isinstance(node.func, ast.Attribute):
            return _is_safe(node.func.value) and all(_is_safe(a) for a in args)
    return False


def _sql_interpolations(tree: ast.AST) -> Iterator[tuple[ast.AST, ast.AST | None]]:
    """Every value formatted into SQL text: (the value, its format spec)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and _is_sql_text(node):
            yield from ((v.value, v.format_spec) for v in node.values if isinstance(v, ast.FormattedValue))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and _is_sql_text(node.left):
            yield node.right, None
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base, method = node.func.value, node.func.attr
            args = [*node.args, *(k.value for k in node.keywords)]
            is_sql_call = isinstance(base, ast.Call) and _call_name(base) == "SQL"
            if method == "format" and (
                _is_sql_text(base) or is_sql_call or (isinstance(base, ast.Name) and base.id.endswith("_SQL"))
            ):
                yield from ((a, None) for a in args)
            elif method == "SQL":
                yield from ((a, None) for a in node.args)
            elif method in ("execute", "executemany", "copy") and node.args:
                first = node.args[0]
                if isinstance(first, ast.BinOp) and isinstance(first.op, (ast.Add, ast.Mod)):
                    yield first, None


def sql_compositions() -> list[tuple[str, str]]:
    found = []
    for root in ("billing_ops", "locks", "reconciliation", "audit"):
        for path in sorted((BASE_DIR / root).rglob("*.py")):
            source = path.read_text()
            for value, spec in _sql_interpolations(ast.parse(source)):
                if not _is_safe(value, spec):
                    found.append(
                        (str(path.relative_to(BASE_DIR)), ast.get_source_segment(source, value) or "")
                    )
    return found


def test_no_sql_is_built_from_values_that_are_not_constants_or_quoted() -> None:
    found = sql_compositions()
    unreviewed = sorted({f for f in found if f not in SQL_COMPOSITION_ALLOWLIST})
    assert unreviewed == [], "values formatted into SQL text; use query parameters or sql.Identifier"
    stale = sorted(set(SQL_COMPOSITION_ALLOWLIST) - set(found))
    assert stale == [], "allowlisted compositions that no longer exist: remove them"


@pytest.mark.parametrize(
    "source",
    [
        "cursor.execute(f\"SELECT * FROM t WHERE id = {request.GET['id']}\")",
        "cursor.execute(\"SELECT * FROM t WHERE name = '%s'\" % name)",
        "cursor.execute(\"SELECT * FROM t WHERE name = '{}'\".format(name))",
        'cursor.execute("SELECT * FROM t WHERE name = \'" + name + "\'")',
        'conn.execute(sql.SQL("SELECT * FROM t WHERE name = " + name))',
        'query = f"DELETE FROM lock.locks WHERE billing_id = {run_id}"',
    ],
)
def test_the_sql_check_catches_values_formatted_into_sql(source: str) -> None:
    """The check above can fail: each of these is found."""
    assert [v for v, s in _sql_interpolations(ast.parse(source)) if not _is_safe(v, s)]


def test_the_sql_check_accepts_parameters_and_quoted_names() -> None:
    source = "\n".join(
        [
            'cursor.execute("SELECT * FROM t WHERE id = %s", [user_value])',
            'cursor.execute(f"SET statement_timeout = {timeout:d}")',
            'cursor.execute(f"SET lock_timeout = {int(timeout)}")',
            'cursor.execute(sql.SQL("LOCK TABLE {}").format(sql.Identifier(name)))',
            'cursor.execute(f"SELECT 1 FROM {connection.ops.quote_name(table)}")',
        ]
    )
    assert [v for v, s in _sql_interpolations(ast.parse(source)) if not _is_safe(v, s)] == []


# SQL metacharacters, quoting, NUL, placeholders, huge numbers and long text through the GET
# filters of every list page: a 200 (the filter refused or found nothing) or a 400, never a 500.
HOSTILE_VALUES = [
    "' OR '1'='1",
    "1; DROP TABLE lock.locks; --",
    '" OR ""="',
    "%",
    "%s",
    "%(query)s",
    "{}",
    "\\",
    "_%_",
    "a\x00b",
    "-1",
    "99999999999999999999999",
    "1e309",
    "NaN",
    "2026-13-45",
    "../../etc/passwd",
    "ა" * 3000,
]
FILTERED_PAGES: dict[str, list[str]] = {
    "stuck_runs": [
        "entity_type",
        "min_locks",
        "created_after",
        "created_before",
        "lock_kind",
        "sort",
        "page",
    ],
    "suspicious_runs": ["sort", "page"],
    "locks_without_run": ["sort", "page"],
    "lock_lookup": ["q"],
    "audit_trail": [
        "action",
        "actor",
        "environment",
        "object_type",
        "object_id",
        "date_after",
        "date_before",
        "sort",
        "page",
    ],
    "audit_trail_export": ["action", "actor", "object_type", "object_id", "date_after"],
    "job_list": ["environment", "kind", "status", "sort", "page"],
    "approval_list": ["page"],
    "notification_list": ["status", "channel", "page"],
    "upsert_runs": ["page"],
    "rollback_preview": ["run_id"],
    "backup_list": ["page"],
    "environment_chain": ["page"],
    "dashboard_chain": ["page"],
}


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize("name", sorted(FILTERED_PAGES))
def test_hostile_filter_values_never_cause_a_500(name: str, viewer, client_for, unprotected_env) -> None:
    from django.urls import reverse

    from tests.test_permissions import url_kwargs

    url = reverse(name, kwargs=url_kwargs(name, env_key=unprotected_env.key, job_id=1))
    client = client_for(viewer)
    client.raise_request_exception = False
    failures = []
    for value in HOSTILE_VALUES:
        for params in [
            *({p: value} for p in FILTERED_PAGES[name]),
            dict.fromkeys(FILTERED_PAGES[name], value),
        ]:
            response = client.get(url, params)
            if response.status_code not in (200, 400):
                failures.append(f"{sorted(params)} = {value[:30]!r}: {response.status_code}")
    assert failures == [], "\n".join(failures)
    with connections[unprotected_env.alias].cursor() as cursor:  # nothing was dropped
        cursor.execute("SELECT count(*) FROM lock.locks")


# --- Environment URLs and passwords: never rendered or logged ----------------------------------

ENV_PASSWORD = "s3cret-pw-h4Xq"


@contextlib.contextmanager
def with_password(env: Any, url: str, settings: Any) -> Iterator[Any]:
    """The environment `env` (its test database alias, which this test may use) reconfigured
    to `url`, password included, as a deployment's environments file would give it."""
    from billing_ops.environments import parse_database_url

    conninfo = parse_database_url(url, where=env.key)
    changed = dataclasses.replace(env, url=url, conninfo=conninfo)
    settings.ENVIRONMENTS = {**settings.ENVIRONMENTS, env.key: changed}
    connection = connections[env.alias]
    saved = {k: connection.settings_dict[k] for k in ("HOST", "PORT", "USER", "PASSWORD", "NAME")}
    connection.close()
    connection.settings_dict.update(
        HOST=conninfo["host"], PORT=conninfo["port"], USER=conninfo["user"], PASSWORD=conninfo["password"]
    )
    try:
        yield changed
    finally:
        connection.close()
        connection.settings_dict.update(saved)


@pytest.mark.django_db(databases="__all__", transaction=True)
@pytest.mark.usefixtures("inline_jobs")
def test_an_environment_password_is_never_rendered_or_logged(
    unprotected_env, protected_env, clean_environments, caplog, settings
) -> None:
    """An operator+approver (who sees every page and every action) browses every GET page of
    the permission matrix for an environment whose URL carries a password, reachable (the
    machine's PostgreSQL accepts it) and unreachable; jobs run on both. The password is in
    no page, job log, job error, health report or log record."""
    from django.urls import reverse

    from billing_ops import services
    from billing_ops.models import Job
    from tests.conftest import free_port_for_tests
    from tests.test_permissions import MATRIX, url_kwargs

    caplog.set_level("DEBUG")
    db = connections[unprotected_env.alias].settings_dict
    host = f"{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    # A server that checks passwords (the private PostgreSQL) gets its own; one that trusts
    # loopback (the machine's) gets ours. Either way the URL carries a secret to look for.
    up_password = db["PASSWORD"] or ENV_PASSWORD
    passwords = [ENV_PASSWORD, up_password]
    up_url = f"postgresql://{db['USER']}:{quote(up_password, safe='')}@{host}/{db['NAME']}"
    down_url = f"postgresql://ops:{ENV_PASSWORD}@127.0.0.1:{free_port_for_tests()}/phoenix"
    with (
        with_password(unprotected_env, up_url, settings) as up,
        with_password(protected_env, down_url, settings) as down,
    ):
        assert up.conninfo["password"] == up_password
        admin = make_user("admin-pw", "Operator", "Approver")
        jobs = {
            env.key: services.job_request(actor=admin, kind="environment_check", environment=env.key)
            for env in (up, down)
        }
        Job.objects.filter(pk=jobs[down.key].pk).update(status="queued")  # protected: approval skipped here
        for job in jobs.values():
            services.job_execute(job_id=job.pk, worker="test")
        assert Job.objects.get(pk=jobs[up.key].pk).status == "succeeded"
        failed = Job.objects.get(pk=jobs[down.key].pk)
        assert failed.status == "failed" and failed.error  # an error, without the password

        client = Client()
        client.force_login(admin)
        client.raise_request_exception = False
        pages = 0
        for env in (up, down):
            for name, (method, _expected) in MATRIX.items():
                if method != "GET" or name == "login":
                    continue
                url = reverse(name, kwargs=url_kwargs(name, env_key=env.key, job_id=jobs[env.key].pk))
                response = client.get(url)
                body = b"".join(response.streaming_content) if response.streaming else response.content
                assert response.status_code != 500, url  # an unreachable one answers 503
                assert not any(secret.encode() in body for secret in passwords), url
                pages += 1
            for fmt in ("csv", "md", "json"):
                report = client.get(f"/report.{fmt}").content
                assert not any(secret.encode() in report for secret in passwords)
    assert pages > 2 * 30
    stored = [
        (j.error, json.dumps(j.result), [line.message for line in j.log_lines.all()])
        for j in Job.objects.all()
    ]
    for secret in passwords:
        assert secret not in json.dumps(stored)
        assert secret not in caplog.text
        assert all(secret not in str(record.args) for record in caplog.records)


# --- Uploads: outside the web root, random names, removed after the job ------------------------


@pytest.mark.django_db(databases="__all__", transaction=True)
@pytest.mark.usefixtures("inline_jobs")
def test_an_upload_is_private_randomly_named_and_removed_once_its_job_succeeded(
    unprotected_env, clean_environments, settings, tmp_path
) -> None:
    """The failure, refusal and cancellation paths: tests/test_upsert.py."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from billing_ops import services
    from billing_ops.models import Job
    from reconciliation.services import upload_path

    served = [Path(settings.STATIC_ROOT), *map(Path, settings.STATICFILES_DIRS)]
    configured = Path(settings.UPLOAD_DIR)  # the deployment's folder: not one the web serves
    assert not any(configured.resolve().is_relative_to(root.resolve()) for root in served)
    settings.UPLOAD_DIR = tmp_path / "var" / "uploads"
    operator = make_user("op-upload", "Operator")
    client = Client()
    client.force_login(operator)
    body = b"invoice_id,unit_id,line_type,description,quantity,amount\nINV-1,U-1,FEE,fee,1,1\n"
    url = f"/environments/{unprotected_env.key}/reconciliation/upsert/"
    names = []
    for run_id in ("sec-1", "sec-2"):
        upload = SimpleUploadedFile("../../static/evil.csv", body, content_type="text/csv")
        response = client.post(url, {"csv": upload, "run_id": run_id, "batch_size": "100", "dry_run": "on"})
        assert response.status_code == 302, response.content[:500]
        names.append(Job.objects.latest("pk").params["upload"])
    stored = [upload_path(name) for name in names]
    # Random names (the same file twice: two names), none taken from the client's.
    assert names[0] != names[1] and all(re.fullmatch(r"[0-9a-f]{32}\.csv", name) for name in names)
    assert [p.parent for p in stored] == [settings.UPLOAD_DIR] * 2 and all(p.exists() for p in stored)
    assert (settings.UPLOAD_DIR / "evil.csv").exists() is False
    # Private, and not served.
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in stored)
    assert stat.S_IMODE(settings.UPLOAD_DIR.stat().st_mode) == 0o700
    assert client.get(f"/static/{names[0]}").status_code == 404
    # Removed once the job settled: here, one that succeeded.
    job = Job.objects.get(params__upload=names[0])
    assert services.job_execute(job_id=job.pk, worker="test") == "succeeded"
    assert not stored[0].exists() and stored[1].exists()


@pytest.mark.django_db
def test_an_action_address_opened_in_the_browser_says_what_it_is(client_for, viewer) -> None:
    from django.urls import reverse

    response = client_for(viewer).get(reverse("job_cancel", args=[1]))
    assert response.status_code == 405 and response["Allow"] == "POST"
    assert "Only a form can do this" in response.content.decode()
    assert client_for(viewer).post(reverse("job_cancel", args=[1])).status_code == 403  # POST: the role check
