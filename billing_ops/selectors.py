"""Reads: environment probes, contract-schema status, enum labels, jobs."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connections
from django.db.models import QuerySet
from django.utils import translation
from django.utils.translation import gettext as _

from billing_ops.environments import Environment, environment_connect
from billing_ops.models import Job

logger = logging.getLogger(__name__)

# A probe that has not answered by then is reported as timed out; the page does not wait.
PROBE_STATEMENT_TIMEOUT_MS = 2_000


@dataclass(frozen=True)
class EnvironmentProbe:
    env: Environment
    reachable: bool
    latency_ms: float | None = None
    server_version: str = ""
    error: str = ""


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # libpq messages can echo the host but never the password; keep the first line only.
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def environment_probe(env: Environment) -> EnvironmentProbe:
    """Connect and ask for the server version; never raises."""
    started = time.monotonic()
    try:
        with environment_connect(env, autocommit=True) as conn:
            conn.execute(f"SET statement_timeout = {PROBE_STATEMENT_TIMEOUT_MS:d}")
            version = conn.execute("SELECT current_setting('server_version')").fetchone()[0]
        return EnvironmentProbe(env, True, round((time.monotonic() - started) * 1000, 1), version)
    except Exception as exc:
        return EnvironmentProbe(env, False, error=describe_error(exc))


def run_per_environment(func: Any, envs: list[Environment], *, timeout_s: float) -> dict[str, Any]:
    """Call ``func(env)`` for every environment concurrently, each in its own thread (and so
    its own connection). An environment that has not answered within ``timeout_s`` maps to
    a TimeoutError instead of delaying the others; results keep the environments' order."""
    if not envs:
        return {}
    pool = ThreadPoolExecutor(max_workers=min(16, len(envs)), thread_name_prefix="env")
    call = _closing(func, translation.get_language())
    futures = {env.key: pool.submit(call, env) for env in envs}
    wait(futures.values(), timeout=timeout_s)
    pool.shutdown(wait=False, cancel_futures=True)
    results: dict[str, Any] = {}
    for env in envs:
        future = futures[env.key]
        if not future.done():
            results[env.key] = TimeoutError(_("no answer within %(s)s s") % {"s": f"{timeout_s:g}"})
        elif future.exception() is not None:
            results[env.key] = future.exception()
        else:
            results[env.key] = future.result()
    return results


def _closing(func: Any, language: str | None) -> Any:
    """``func`` in a worker thread: in the caller's language (the active language is per
    thread, and texts such as a run's stuck reason are made there), closing its connection."""

    def call(env: Environment) -> Any:
        try:
            with translation.override(language):
                return func(env)
        finally:
            connections[env.alias].close()

    return call


def environments_probe(envs: list[Environment]) -> list[EnvironmentProbe]:
    timeout_s = settings.CONNECT_TIMEOUT_S + PROBE_STATEMENT_TIMEOUT_MS / 1000 + 0.5
    results = run_per_environment(environment_probe, envs, timeout_s=timeout_s)
    return [
        r if isinstance(r, EnvironmentProbe) else EnvironmentProbe(env, False, error=describe_error(r))
        for env, r in zip(envs, results.values(), strict=True)
    ]


def contract_schema_status(env: Environment) -> dict[str, Any]:
    """Which parts of the data contract exist in the environment's database."""
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            """
            SELECT t.label, to_regclass(t.name) IS NOT NULL
            FROM (VALUES ('billing.billings', 'billing.billings'), ('lock.locks', 'lock.locks'),
                         ('invoice_lines', 'public.invoice_lines'), ('audit_logs', 'public.audit_logs'))
                 AS t(label, name)
            """
        )
        tables = dict(cursor.fetchall())
        cursor.execute(
            """
            SELECT EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                           WHERE n.nspname = 'billing' AND t.typname = 'billing_status'),
                   EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                           WHERE n.nspname = 'billing_run' AND p.proname = 'make_billing_run_real')
            """
        )
        enum_present, procedure_present = cursor.fetchone()
    return {
        "tables": tables,
        "billing_status_enum": enum_present,
        "make_billing_run_real": procedure_present,
        "complete": all(tables.values()) and enum_present and procedure_present,
    }


def billing_status_labels(cursor: Any) -> list[str]:
    """The labels of billing.billing_status as the environment defines them, in order (read
    from the database, never hard-coded: platforms add labels)."""
    cursor.execute(
        """
        SELECT e.enumlabel FROM pg_enum e
        JOIN pg_type t ON t.oid = e.enumtypid JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'billing' AND t.typname = 'billing_status'
        ORDER BY e.enumsortorder
        """
    )
    return [row[0] for row in cursor.fetchall()]


def billing_statuses(env: Environment) -> list[str]:
    with connections[env.alias].cursor() as cursor:
        return billing_status_labels(cursor)


def jobs_recent(*, environment: str | None = None) -> QuerySet[Job]:
    jobs = Job.objects.select_related("requested_by", "approved_by")
    if environment:
        jobs = jobs.filter(environment=environment)
    return jobs


def jobs_awaiting_approval() -> QuerySet[Job]:
    return jobs_recent().filter(status="awaiting_approval").order_by("requested_at")


def dashboard_database_latency_ms() -> float:
    """A trivial query's round trip on the dashboard's own database; raises when it is down."""
    started = time.monotonic()
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")
    return round((time.monotonic() - started) * 1000, 1)


def health_report() -> dict[str, Any]:
    """What /healthz returns: each dependency's state; never raises."""
    import redis

    from billing_ops.environments import all_environments

    report: dict[str, Any] = {}
    try:
        report["default_database"] = {"ok": True, "latency_ms": dashboard_database_latency_ms()}
    except Exception as exc:
        report["default_database"] = {"ok": False, "error": describe_error(exc)}

    workers: list[dict[str, str]] = []
    started = time.monotonic()
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
        client.ping()
        report["redis"] = {"ok": True, "latency_ms": round((time.monotonic() - started) * 1000, 1)}
        prefix = settings.WORKER_HEARTBEAT_KEY_PREFIX
        for key in client.scan_iter(match=f"{prefix}*", count=100):
            name = key.decode() if isinstance(key, bytes) else str(key)
            seen = client.get(key)
            last_seen = seen.decode() if isinstance(seen, bytes) else str(seen or "")
            workers.append({"name": name[len(prefix) :], "last_seen": last_seen})
    except Exception as exc:
        report["redis"] = {"ok": False, "error": describe_error(exc)}
    report["workers"] = sorted(workers, key=lambda w: w["name"])

    report["environments"] = {
        probe.env.key: {
            "label": probe.env.label,
            "reachable": probe.reachable,
            "latency_ms": probe.latency_ms,
            "error": probe.error or None,
        }
        for probe in environments_probe(all_environments())
    }
    report["ok"] = bool(report["default_database"]["ok"] and report["redis"]["ok"] and workers)
    return report


# The job kind that releases locks (registered by the cleanup feature).
LOCK_RELEASE_KIND = "lock_release"


def last_finished_jobs(*, kind: str, environments: list[str]) -> dict[str, Job]:
    """The most recent successful job of a kind per environment (e.g. the last cleanup)."""
    jobs = (
        Job.objects.filter(kind=kind, environment__in=environments, status="succeeded")
        .order_by("environment", "-finished_at")
        .distinct("environment")
    )
    return {job.environment: job for job in jobs}


def latest_jobs(*, environment: str, kinds: list[str]) -> dict[str, Job]:
    """The most recent job of each kind in one environment, whatever its status."""
    jobs = (
        Job.objects.filter(environment=environment, kind__in=kinds)
        .select_related("requested_by", "approved_by")
        .order_by("kind", "-id")
        .distinct("kind")
    )
    return {job.kind: job for job in jobs}
