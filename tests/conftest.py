"""Test fixtures: real PostgreSQL (the default database plus every configured environment,
as test databases built from the contract schema), real Redis, and a real Celery worker
running in its own process against the same test databases.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.db import connections
from django.test import Client

from billing_ops.contract import contract_schema_apply
from billing_ops.devstack import worker_argv
from billing_ops.environments import Environment, all_environments

BASE_DIR = Path(__file__).resolve().parent.parent
WORKER_START_TIMEOUT_S = 60
CONTRACT_TABLES = ("billing.billings", "lock.locks", "public.invoice_lines", "public.audit_logs")


@pytest.fixture(scope="session")
def django_db_setup(django_test_environment: None, django_db_blocker: Any) -> Iterator[None]:
    """Create test databases for `default` and every environment alias, and build the
    contract schema in each environment's test database."""
    from django.test.utils import setup_databases, teardown_databases

    with django_db_blocker.unblock():
        config = setup_databases(verbosity=0, interactive=False, aliases=set(connections))
        for env in all_environments():
            contract_schema_apply(env)
    yield
    with django_db_blocker.unblock():
        names = [connections[alias].settings_dict["NAME"] for alias in connections]
        with connections["default"].cursor() as cursor:
            # The live server's thread and stopped workers may leave sessions behind.
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
                [names],
            )
        for alias in connections:
            connections[alias].close()
        teardown_databases(config, verbosity=0)


def _test_url(alias: str) -> str:
    """A URL for the test database behind `alias` (after setup_databases renamed it)."""
    s = connections[alias].settings_dict
    parts = {
        "user": s["USER"],
        "password": s["PASSWORD"],
        "host": s["HOST"] or "localhost",
        "port": str(s["PORT"] or 5432),
        "dbname": s["NAME"],
    }
    from urllib.parse import quote

    auth = quote(parts["user"], safe="") + (
        ":" + quote(parts["password"], safe="") if parts["password"] else ""
    )
    return f"postgresql://{auth}@{parts['host']}:{parts['port']}/{parts['dbname']}"


@pytest.fixture(scope="session")
def worker_environ(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment variables that point a subprocess at this session's test databases."""
    env_file = tmp_path_factory.mktemp("config") / "environments.toml"
    lines: list[str] = []
    environ = dict(os.environ)
    for env in all_environments():
        var = f"BILLING_OPS_TESTENV_{env.key.upper()}_URL"
        environ[var] = _test_url(env.alias)
        lines += [
            f"[environments.{env.key}]",
            f'label = "{env.label}"',
            f'url_env = "{var}"',
            f"protected = {'true' if env.protected else 'false'}",
            "demo = true",
            "",
        ]
    env_file.write_text("\n".join(lines))
    environ.update(
        {
            "DATABASE_URL": _test_url("default"),
            "BILLING_OPS_ENVIRONMENTS": str(env_file),
            "BILLING_OPS_QUEUE": settings.CELERY_QUEUE,
            "BILLING_OPS_TESTING": "1",
            "BILLING_OPS_JOB_HEARTBEAT_S": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return environ


class Worker:
    """A real `celery worker` process consuming this session's queue."""

    def __init__(self, environ: dict[str, str], name: str) -> None:
        self.environ = environ
        self.name = f"{name}@{os.uname().nodename}"
        self.log = Path(tempfile.mkstemp(prefix="celery-worker-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        key = f"{settings.WORKER_HEARTBEAT_KEY_PREFIX}{self.name}"
        client.delete(key)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                worker_argv(
                    queue=settings.CELERY_QUEUE,
                    concurrency=1,
                    name=self.name,
                    extra=("--without-gossip", "--without-mingle"),
                ),
                cwd=BASE_DIR,
                env={**self.environ, "BILLING_OPS_PROCESS_ROLE": "test-worker"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while not client.exists(key):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery worker did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and its pool children)."""
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="session")
def celery_worker(worker_environ: dict[str, str]) -> Iterator[Worker]:
    worker = Worker(worker_environ, "testworker")
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(autouse=True)
def _private_file_folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Backups and reconciliation run folders of a test live in its own temporary folders,
    never in the checkout's var/. (Not through the `settings` fixture: taking it here would
    make it outlive fixtures such as clean_environments that read the settings it restores.)"""
    from django.test import override_settings

    root = tmp_path_factory.mktemp("files")
    with override_settings(BACKUP_DIR=root / "backups", RECONCILIATIONS_DIR=root / "reconciliations"):
        yield


@pytest.fixture(autouse=True)
def _no_login_lockouts() -> None:
    """Every test starts with no sign-in failures counted (the counters live in Redis and
    would otherwise carry from one test's failed logins to the next test's)."""
    import redis

    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
        keys = list(client.scan_iter(match=f"{settings.LOGIN_FAILURE_KEY_PREFIX}*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture
def clean_environments(django_db_blocker: Any) -> Iterator[None]:
    """Empty the contract tables of every environment's test database before and after."""

    def truncate() -> None:
        with django_db_blocker.unblock():
            for env in all_environments():
                with connections[env.alias].cursor() as cursor:
                    cursor.execute(f"TRUNCATE {', '.join(CONTRACT_TABLES)} RESTART IDENTITY")

    truncate()
    yield
    truncate()


# --- A local webhook receiver ---------------------------------------------------------------

SECRET_PATH = "/services/T000/B000/s3cret-token"


class Receiver:
    """A webhook endpoint: records every POST, answers with the queued statuses (then 200)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.statuses: list[int] = []
        self.delay_s = 0.0
        self.url = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook endpoint on 127.0.0.1 (a real HTTP server in a thread of this process); its
    URL carries a secret-looking path that pages must never show."""
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if state.delay_s:
                time.sleep(state.delay_s)
            state.requests.append(
                {"path": self.path, "content_type": self.headers["Content-Type"], "json": json.loads(body)}
            )
            state.authorizations.append(self.headers["Authorization"])
            self.send_response(state.statuses.pop(0) if state.statuses else 200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_port}{SECRET_PATH}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def notifying_worker(
    celery_worker: Worker, worker_environ: dict[str, str], receiver: Receiver, settings: Any
) -> Iterator[Worker]:
    """A worker whose ops channel is the `receiver`, in place of the session's worker.

    A worker reads the channel settings from its environment when it starts, and the
    notifications of a job are written by the worker that runs it: the `settings` fixture
    alone reaches only this process (the live server). So the session's worker stops (it
    would take jobs from the same queue without the channel), this one runs for the test,
    and the session's worker starts again afterwards."""
    settings.OPS_WEBHOOK_URL = receiver.url
    settings.STAKEHOLDER_EMAILS = []
    celery_worker.stop()
    worker = Worker(
        {**worker_environ, "BILLING_OPS_OPS_WEBHOOK_URL": receiver.url, "BILLING_OPS_STAKEHOLDER_EMAILS": ""},
        "notifyingworker",
    )
    try:
        worker.start()
        yield worker
    finally:
        worker.stop()
        celery_worker.start()


def make_user(username: str, *roles: str, password: str = "pw-for-tests-only") -> User:  # noqa: S107
    from django.apps import apps
    from django.contrib.auth.management import create_permissions

    from billing_ops.services import roles_ensure

    # Transactional tests flush `default`, taking the migration-made groups with it.
    create_permissions(apps.get_app_config("billing_ops"), verbosity=0)
    roles_ensure()
    user = User.objects.create_user(username=username, password=password)
    for role in roles:
        user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def viewer(db: None) -> User:
    return make_user("viewer1", "Viewer")


@pytest.fixture
def operator(db: None) -> User:
    return make_user("operator1", "Operator")


@pytest.fixture
def approver(db: None) -> User:
    return make_user("approver1", "Approver")


@pytest.fixture
def client_for() -> Any:
    def login(user: User) -> Client:
        client = Client()
        client.force_login(user)
        return client

    return login


@pytest.fixture(scope="session")
def unprotected_env() -> Environment:
    envs = [e for e in all_environments() if not e.protected]
    if not envs:
        pytest.fail("the test suite needs at least one unprotected environment in BILLING_OPS_ENVIRONMENTS")
    return envs[0]


@pytest.fixture(scope="session")
def protected_env() -> Environment:
    envs = [e for e in all_environments() if e.protected]
    if not envs:
        pytest.fail("the test suite needs at least one protected environment in BILLING_OPS_ENVIRONMENTS")
    return envs[0]


def wait_for(
    predicate: Any, *, timeout_s: float = 30, interval_s: float = 0.2, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def free_port_for_tests() -> int:
    """A port on 127.0.0.1 with nothing listening: a service that is down."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def extra_environment(settings: Any) -> Any:
    """Add an environment at run time (as a config change would): returns a factory."""
    from billing_ops.environments import database_settings, parse_database_url

    added: list[str] = []

    def add(key: str, url: str, *, label: str | None = None, protected: bool = False) -> Environment:
        conninfo = parse_database_url(url, where=key)
        env = Environment(key=key, label=label or key, url=url, protected=protected, conninfo=conninfo)
        settings.ENVIRONMENTS = {**settings.ENVIRONMENTS, key: env}
        raw = {
            env.alias: database_settings(
                conninfo,
                application_name=f"billing-ops test env={key}",
                connect_timeout_s=settings.CONNECT_TIMEOUT_S,
            )
        }
        raw["default"] = connections.settings["default"]
        connections.settings[env.alias] = connections.configure_settings(raw)[env.alias]
        added.append(env.alias)
        return env

    yield add
    for alias in added:
        connections[alias].close()
        del connections.settings[alias]


@pytest.fixture
def blackhole_port() -> Iterator[int]:
    """A port that accepts TCP connections but never answers: a hung server."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield int(sock.getsockname()[1])
    sock.close()


@contextlib.contextmanager
def broker_at(url: str) -> Iterator[None]:
    """Point this process's Celery app at another broker; afterwards, back to the real one
    with fresh connection pools (Celery creates its producer pool lazily, and one made
    meanwhile would keep the other address)."""
    from billing_ops.celery import app as celery_app

    real = celery_app.conf["CELERY_BROKER_URL"]
    celery_app.conf["CELERY_BROKER_URL"] = url
    _reset_celery_pools(celery_app)
    try:
        yield
    finally:
        celery_app.conf["CELERY_BROKER_URL"] = real
        _reset_celery_pools(celery_app)


def broker_unreachable() -> contextlib.AbstractContextManager[None]:
    """A broker on a port where nothing listens, as if Redis were down."""
    return broker_at(f"redis://127.0.0.1:{free_port_for_tests()}/0")


def _reset_celery_pools(celery_app: Any) -> None:
    """Drop the app's cached pools (as Celery does after a fork): they are looked up again,
    by broker address, from kombu's registries. Closing them would close them for every
    later user of the same address too."""
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


@pytest.fixture
def inline_jobs() -> Iterator[None]:
    """For tests that run jobs in this process (services.job_execute): the broker is
    unreachable for them, as when Redis is down, so no worker of this session can take the
    job first; the jobs stay queued, undispatched, until the test runs them."""
    with broker_unreachable():
        yield
