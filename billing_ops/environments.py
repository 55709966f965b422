"""The environment registry: which billing-platform databases the dashboard watches.

Environments are declared in a TOML file (path in ``BILLING_OPS_ENVIRONMENTS``), one
table per environment::

    [environments.preprod]
    label = "PreProd"
    url = "postgresql://ops@10.0.0.76:5432/phoenix"   # or: url_env = "PREPROD_DATABASE_URL"
    protected = true

Each environment becomes a Django database alias ``env_<key>``. This module is imported
by ``settings.py`` before Django is set up, so it depends on nothing but the standard
library and psycopg's libpq URL parser. Every problem is reported at start-up with the
name of the offending entry, never later at the first query.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.core.exceptions import ImproperlyConfigured

ALIAS_PREFIX = "env_"
KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
ALLOWED_KEYS = {"label", "url", "url_env", "protected", "demo", "allow_restore", "time_zone", "confirm_name"}

DEFAULT_CONNECT_TIMEOUT_S = 3
DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
DEFAULT_LOCK_TIMEOUT_MS = 5_000


class UnknownEnvironment(LookupError):
    """Raised for an environment key that is not in the registry."""


@dataclass(frozen=True)
class Environment:
    key: str
    label: str
    url: str = field(repr=False)  # carries credentials: never render or log it
    protected: bool = False
    demo: bool = False
    allow_restore: bool = False
    conninfo: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    # The platform stores `timestamp without time zone`; this is the zone those values are in.
    time_zone: str = "UTC"
    # Destructive requests here need the operator to type the environment's label.
    confirm_name: bool = False

    @property
    def alias(self) -> str:
        return f"{ALIAS_PREFIX}{self.key}"

    @property
    def host(self) -> str:
        """Host, port and database for display: what the seed report calls 'Host'."""
        host = self.conninfo.get("host") or self.conninfo.get("hostaddr") or "localhost"
        port = self.conninfo.get("port") or "5432"
        return f"{host}:{port}/{self.conninfo.get('dbname', '')}"

    @property
    def dbname(self) -> str:
        return self.conninfo.get("dbname", "")


def parse_database_url(url: str, *, where: str) -> dict[str, str]:
    """Parse a libpq URL with libpq's own parser; reject what is not a usable URL."""
    from psycopg.conninfo import conninfo_to_dict

    if not re.match(r"^postgres(ql)?://", url):
        raise ImproperlyConfigured(f"{where}: not a postgresql:// URL")
    try:
        parsed = conninfo_to_dict(url)
    except Exception as exc:  # psycopg.ProgrammingError; message carries no password
        raise ImproperlyConfigured(f"{where}: malformed database URL ({_first_line(exc)})") from None
    if not parsed.get("dbname"):
        raise ImproperlyConfigured(f"{where}: the URL names no database")
    port = str(parsed.get("port") or "5432")
    if not all(p.isdigit() and 0 < int(p) < 65536 for p in port.split(",")):
        raise ImproperlyConfigured(f"{where}: bad port {port!r}")
    return {k: str(v) for k, v in parsed.items() if v is not None}


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_environments(path: str | Path, environ: Mapping[str, str] = os.environ) -> dict[str, Environment]:
    """Read and validate the environments file; raise ImproperlyConfigured naming the entry."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImproperlyConfigured(f"BILLING_OPS_ENVIRONMENTS: file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ImproperlyConfigured(f"{path}: not valid TOML: {exc}") from None
    unknown_top = set(raw) - {"environments"}
    if unknown_top:
        raise ImproperlyConfigured(f"{path}: unknown top-level keys: {', '.join(sorted(unknown_top))}")
    tables = raw.get("environments")
    if not isinstance(tables, dict) or not tables:
        raise ImproperlyConfigured(f"{path}: no [environments.<key>] tables")

    result: dict[str, Environment] = {}
    for key, entry in tables.items():
        where = f"{path}: [environments.{key}]"
        if not KEY_RE.match(key):
            raise ImproperlyConfigured(f"{where}: key must match {KEY_RE.pattern}")
        if not isinstance(entry, dict):
            raise ImproperlyConfigured(f"{where}: must be a table")
        unknown = set(entry) - ALLOWED_KEYS
        if unknown:
            raise ImproperlyConfigured(f"{where}: unknown keys: {', '.join(sorted(unknown))}")
        label = entry.get("label", key)
        if not isinstance(label, str) or not label.strip():
            raise ImproperlyConfigured(f"{where}: label must be a non-empty string")
        for flag in ("protected", "demo", "allow_restore", "confirm_name"):
            if not isinstance(entry.get(flag, False), bool):
                raise ImproperlyConfigured(f"{where}: {flag} must be true or false")
        if ("url" in entry) == ("url_env" in entry):
            raise ImproperlyConfigured(f"{where}: give exactly one of url or url_env")
        if "url_env" in entry:
            var = entry["url_env"]
            if not isinstance(var, str) or not var:
                raise ImproperlyConfigured(f"{where}: url_env must name an environment variable")
            url = environ.get(var, "")
            if not url:
                raise ImproperlyConfigured(f"{where}: environment variable {var} is not set")
            url_where = f"{where} (from ${var})"
        else:
            url = entry["url"]
            if not isinstance(url, str):
                raise ImproperlyConfigured(f"{where}: url must be a string")
            url_where = where
        conninfo = parse_database_url(url, where=url_where)
        time_zone = entry.get("time_zone", "UTC")
        try:
            ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ImproperlyConfigured(f"{where}: unknown time_zone {time_zone!r}") from None
        result[key] = Environment(
            key=key,
            label=label.strip(),
            url=url,
            protected=entry.get("protected", False),
            demo=entry.get("demo", False),
            allow_restore=entry.get("allow_restore", False),
            conninfo=conninfo,
            time_zone=time_zone,
            confirm_name=entry.get("confirm_name", False),
        )
    return result


def database_settings(
    conninfo: Mapping[str, str],
    *,
    application_name: str,
    connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    lock_timeout_ms: int | None = None,
    conn_max_age_s: int = 0,
) -> dict[str, Any]:
    """A Django DATABASES entry for a parsed libpq URL, with the dashboard's safety options."""
    options: dict[str, Any] = {
        k: v for k, v in conninfo.items() if k not in {"dbname", "user", "password", "host", "port"}
    }
    session = [f"-c statement_timeout={statement_timeout_ms}"]
    if lock_timeout_ms is not None:
        session.append(f"-c lock_timeout={lock_timeout_ms}")
    # Keep anything the URL itself put in `options`, but ours come last and win.
    options["options"] = " ".join(filter(None, [options.get("options", ""), *session]))
    options["connect_timeout"] = str(connect_timeout_s)
    options["application_name"] = application_name
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": conninfo["dbname"],
        "USER": conninfo.get("user", ""),
        "PASSWORD": conninfo.get("password", ""),
        "HOST": conninfo.get("host", ""),
        "PORT": conninfo.get("port", ""),
        "CONN_MAX_AGE": conn_max_age_s,
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": options,
        "TIME_ZONE": None,
    }


def environment_connect(env: Environment, **overrides: Any) -> Any:
    """A short-lived psycopg connection to the environment, with exactly the options its
    Django alias has (timeouts, application_name). For probes and work done in threads,
    where a connection must never outlive the call; the caller closes it."""
    import psycopg
    from django.db import connections

    params = {
        k: v
        for k, v in connections[env.alias].get_connection_params().items()
        if k not in {"cursor_factory", "context", "prepare_threshold"}
    }
    return psycopg.connect(**{**params, **overrides})


def all_environments() -> list[Environment]:
    """The configured environments, in the file's order."""
    from django.conf import settings

    return list(settings.ENVIRONMENTS.values())


def environments_named(keys: list[str] | None) -> list[Environment]:
    """The environments with these keys, in the order given and each once; all of them when
    no key is given. An unknown key raises UnknownEnvironment naming the known ones."""
    if not keys:
        return all_environments()
    try:
        return [get_environment(key) for key in dict.fromkeys(keys)]
    except UnknownEnvironment as exc:
        known = ", ".join(env.key for env in all_environments())
        raise UnknownEnvironment(f"{exc} (known: {known})") from None


def get_environment(key: str) -> Environment:
    from django.conf import settings

    try:
        return settings.ENVIRONMENTS[key]
    except (KeyError, TypeError):
        raise UnknownEnvironment(f"unknown environment {key!r}") from None


def environment_label(key: str) -> str:
    """The environment's label, or its key if it is no longer configured."""
    from django.conf import settings

    env = settings.ENVIRONMENTS.get(key)
    return env.label if env else key
