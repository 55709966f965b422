"""The environment registry: TOML in, database aliases out; bad entries fail at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from billing_ops.environments import database_settings, load_environments, parse_database_url


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "environments.toml"
    path.write_text(text)
    return path


def test_it_reads_url_and_url_env_entries(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[environments.preprod]
label = "PreProd"
url = "postgresql://ops@10.0.0.76:5432/phoenix"
protected = true

[environments.dev]
label = "Dev"
url_env = "DEV_URL"
""",
    )
    envs = load_environments(path, {"DEV_URL": "postgresql://u:secret@db.dev:6432/phoenix_dev"})
    assert list(envs) == ["preprod", "dev"]
    assert envs["preprod"].protected and envs["preprod"].alias == "env_preprod"
    assert envs["preprod"].host == "10.0.0.76:5432/phoenix"
    assert envs["dev"].host == "db.dev:6432/phoenix_dev"
    assert not envs["dev"].protected
    assert "secret" not in repr(envs["dev"])


@pytest.mark.parametrize(
    ("body", "environ", "message"),
    [
        ("[environments.dev]\nlabel = 'Dev'\n", {}, "[environments.dev]: give exactly one of url or url_env"),
        (
            "[environments.dev]\nurl_env = 'NOPE'\n",
            {},
            "[environments.dev]: environment variable NOPE is not set",
        ),
        ("[environments.dev]\nurl = 'mysql://x/y'\n", {}, "[environments.dev]: not a postgresql:// URL"),
        ("[environments.dev]\nurl = 'postgresql://h:99999/db'\n", {}, "[environments.dev]: bad port"),
        (
            "[environments.dev]\nurl = 'postgresql://h:5432/'\n",
            {},
            "[environments.dev]: the URL names no database",
        ),
        (
            "[environments.dev]\nurl = 'postgresql://h/db?bogus=1'\n",
            {},
            "[environments.dev]: malformed database URL",
        ),
        ("[environments.dev]\nurl = 'postgresql://h/db'\nprotectd = true\n", {}, "unknown keys: protectd"),
        (
            "[environments.dev]\nurl = 'postgresql://h/db'\nprotected = 'yes'\n",
            {},
            "protected must be true or false",
        ),
        ("[environments.Dev-1]\nurl = 'postgresql://h/db'\n", {}, "[environments.Dev-1]: key must match"),
        ("[environments.dev\n", {}, "not valid TOML"),
        ("[other]\n", {}, "unknown top-level keys: other"),
        ("", {}, "no [environments.<key>] tables"),
        ("[environments.dev]\nurl_env = 'DEV_URL'\n", {"DEV_URL": "postgres://h:x/db"}, "(from $DEV_URL)"),
    ],
)
def test_it_names_the_bad_entry(tmp_path: Path, body: str, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ImproperlyConfigured) as excinfo:
        load_environments(write(tmp_path, body), environ)
    assert message in str(excinfo.value)


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ImproperlyConfigured, match="file not found"):
        load_environments(tmp_path / "nope.toml", {})


def test_a_malformed_url_error_never_shows_the_password(tmp_path: Path) -> None:
    path = write(tmp_path, "[environments.dev]\nurl = 'postgresql://u:hunter2@h:x1/db'\n")
    with pytest.raises(ImproperlyConfigured) as excinfo:
        load_environments(path, {})
    assert "hunter2" not in str(excinfo.value)


def test_database_settings_carry_timeouts_and_application_name() -> None:
    entry = database_settings(
        parse_database_url("postgresql://ops:pw@db:5433/phoenix?sslmode=require", where="x"),
        application_name="billing-ops web env=dev",
        connect_timeout_s=3,
        statement_timeout_ms=30000,
    )
    assert entry["NAME"] == "phoenix" and entry["HOST"] == "db" and entry["PORT"] == "5433"
    assert entry["OPTIONS"]["sslmode"] == "require"
    assert entry["OPTIONS"]["connect_timeout"] == "3"
    assert entry["OPTIONS"]["application_name"] == "billing-ops web env=dev"
    assert "-c statement_timeout=30000" in entry["OPTIONS"]["options"]


@pytest.mark.django_db(databases="__all__")
def test_environment_sessions_are_recognisable_and_time_limited(unprotected_env) -> None:
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute("SELECT current_setting('application_name'), current_setting('statement_timeout')")
        application_name, statement_timeout = cursor.fetchone()
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [application_name]
        )
        seen = cursor.fetchone()[0]
    assert application_name.startswith("billing-ops ") and f"env={unprotected_env.key}" in application_name
    assert statement_timeout == "30s"
    assert seen >= 1
