"""The stuck-lock monitor's writes: snapshots of every environment, and alerts.

Beat runs ``locks.tasks.snapshot_environments`` every ``SNAPSHOT_INTERVAL_S``: it records one
``LockSnapshot`` per environment (``snapshots_take``), lets the alerts follow what it saw
(``alerts_evaluate``) and drops snapshots past their retention (``snapshots_prune``).

Alerts are per (environment, kind), not per run, and they follow the snapshots:

* problem seen, no active alert       -> open one and notify;
* problem seen, alert active          -> refresh its summary, details and severity; notify
  only when it becomes critical for the first time (and nobody acknowledged it yet);
* problem gone, alert active          -> resolve it and notify;
* environment unreachable             -> leave its alerts alone: we cannot tell.

Environment queries happen first, outside any transaction on ``default``; then every
alert change and its notification rows are written in one transaction, serialised by an
advisory lock so that two evaluations at once (two beats, a manual run) take turns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from audit.services import audit_record
from billing_ops import access
from billing_ops.environments import Environment, UnknownEnvironment, all_environments, get_environment
from billing_ops.formats import grouped
from billing_ops.notifications import notify
from billing_ops.preferences import deployment_language
from billing_ops.selectors import describe_error, run_per_environment
from billing_ops.services import Actor
from locks.models import (
    SNAPSHOT_FIGURE_FIELDS,
    Alert,
    AlertKind,
    AlertSeverity,
    AlertStatus,
    LockSnapshot,
)
from locks.selectors import EnvironmentStatus, environments_status, stale_runs, stuck_runs

logger = logging.getLogger(__name__)

SNAPSHOT_RETENTION_DAYS = 90
SNAPSHOT_ERROR_MAX_CHARS = 2000
# An alert lists this many runs, the ones holding the most locks first.
ALERT_RUNS_LIMIT = 20
# pg_advisory_xact_lock key serialising alert evaluations (any fixed number unique to it).
ALERTS_ADVISORY_LOCK_KEY = 0x10C5A1E7


# --- Snapshots -------------------------------------------------------------------------------


def snapshot_from_status(status: EnvironmentStatus, *, taken_at: datetime) -> LockSnapshot:
    """An unsaved snapshot of one environment's status."""
    snapshot = LockSnapshot(
        environment=status.env.key,
        taken_at=taken_at,
        reachable=status.reachable,
        error=status.error[:SNAPSHOT_ERROR_MAX_CHARS],
        verdict=status.verdict.colour,
    )
    if status.figures is not None:
        for name in SNAPSHOT_FIGURE_FIELDS:
            setattr(snapshot, name, getattr(status.figures, name))
        procedure = status.figures.procedure
        snapshot.procedure_deletes_locks = procedure.exists and procedure.deletes_locks
    return snapshot


def snapshots_take(*, envs: list[Environment] | None = None) -> list[LockSnapshot]:
    """Snapshot every configured environment (or ``envs``): one row each, unreachable ones too.

    The environments are asked concurrently, each within its own time budget
    (``environments_status``), so one hung environment costs its timeout, not the round.
    """
    envs = all_environments() if envs is None else envs
    taken_at = timezone.now()  # one time for the round, so series line up across environments
    statuses = environments_status(envs)
    return LockSnapshot.objects.bulk_create([snapshot_from_status(s, taken_at=taken_at) for s in statuses])


def snapshots_prune(*, keep_days: int = SNAPSHOT_RETENTION_DAYS) -> int:
    """Delete snapshots older than ``keep_days``; return how many went."""
    deleted, _per_model = LockSnapshot.objects.filter(
        taken_at__lt=timezone.now() - timedelta(days=keep_days)
    ).delete()
    return deleted


# --- Alerts: what the environment shows ----------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One kind of problem in one environment, as a snapshot (and its run lists) show it, or
    as a chain verification found it (``env`` None: the dashboard's own audit trail)."""

    env: Environment | None
    kind: AlertKind
    present: bool
    observed_at: datetime
    severity: AlertSeverity = AlertSeverity.WARNING
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def environment(self) -> str:
        """The alert's ``environment`` column: the key, or "" for the dashboard itself."""
        return self.env.key if self.env is not None else ""


@dataclass(frozen=True)
class AlertEvent:
    alert: Alert
    event: str  # opened, updated, escalated, resolved


def _locks_text(n: int) -> str:
    return ngettext("%(n)s lock", "%(n)s locks", n) % {"n": grouped(n)}


def _age_text(age: timedelta) -> str:
    hours = age.total_seconds() / 3600
    if hours >= 48:
        return _("%(days)s days") % {"days": int(hours // 24)}
    return _("%(hours)s h") % {"hours": int(hours)}


def _figures_json(snapshot: LockSnapshot) -> dict[str, Any]:
    figures = {name: getattr(snapshot, name) for name in SNAPSHOT_FIGURE_FIELDS}
    oldest = figures["oldest_stuck_lock_at"]
    figures["oldest_stuck_lock_at"] = oldest.isoformat() if oldest else None
    figures["procedure_deletes_locks"] = snapshot.procedure_deletes_locks
    return figures


def _runs_json(rows: list[dict[str, Any]], *, with_modify_date: bool = False) -> list[dict[str, Any]]:
    worst_first = sorted(rows, key=lambda r: (-r["lock_count"], -r["billing_run_id"]))[:ALERT_RUNS_LIMIT]
    runs = []
    for row in worst_first:
        run = {"id": row["billing_run_id"], "number": row["billing_number"], "lock_count": row["lock_count"]}
        if with_modify_date:
            run["modify_date"] = row["modify_date"].isoformat() if row["modify_date"] else None
        runs.append(run)
    return runs


def _critical_age() -> timedelta:
    return timedelta(hours=settings.ALERT_CRITICAL_AGE_H)


def _completed_with_locks_finding(
    env: Environment, snapshot: LockSnapshot, runs: list[dict[str, Any]] | BaseException | None
) -> Finding:
    kind = AlertKind.COMPLETED_WITH_LOCKS
    n = snapshot.completed_with_locks or 0
    if not n:
        return Finding(env, kind, present=False, observed_at=snapshot.taken_at)
    stuck_locks = snapshot.stuck_locks or 0
    reasons = []
    if snapshot.oldest_stuck_lock_at is not None:
        age = snapshot.taken_at - snapshot.oldest_stuck_lock_at
        if age > _critical_age():
            reasons.append(
                _("the oldest stuck lock is %(age)s old (more than %(limit)s h)")
                % {"age": _age_text(age), "limit": settings.ALERT_CRITICAL_AGE_H}
            )
    if stuck_locks > settings.ALERT_CRITICAL_LOCKS:
        reasons.append(
            _("%(n)s stuck locks (more than %(limit)s)")
            % {"n": grouped(stuck_locks), "limit": grouped(settings.ALERT_CRITICAL_LOCKS)}
        )
    summary = ngettext(
        "%(env)s: %(n)s COMPLETED run still holds %(locks)s",
        "%(env)s: %(n)s COMPLETED runs still hold %(locks)s",
        n,
    ) % {"env": env.label, "n": grouped(n), "locks": _locks_text(stuck_locks)}
    return Finding(
        env,
        kind,
        present=True,
        observed_at=snapshot.taken_at,
        severity=AlertSeverity.CRITICAL if reasons else AlertSeverity.WARNING,
        summary=summary,
        details=_details(snapshot, reasons, runs),
    )


def _stale_runs_finding(
    env: Environment, snapshot: LockSnapshot, runs: list[dict[str, Any]] | BaseException | None
) -> Finding:
    kind = AlertKind.STALE_RUNS
    n = snapshot.stale_runs or 0
    if not n:
        return Finding(env, kind, present=False, observed_at=snapshot.taken_at)
    reasons = []
    # The snapshot has no date for stale runs; the run list has (when it could be read).
    dates = [r["modify_date"] for r in runs if r["modify_date"]] if isinstance(runs, list) else []
    age = snapshot.taken_at - min(dates) if dates else None
    if age is not None and age > _critical_age():
        limit_h = settings.ALERT_CRITICAL_AGE_H
        reasons.append(
            _("the oldest has been unchanged for %(age)s (more than %(limit)s h)")
            % {"age": _age_text(age), "limit": limit_h}
        )
    locks = snapshot.stale_runs_locks or 0
    summary = ngettext(
        "%(env)s: %(n)s IN_PROGRESS_ACCOUNTING run unchanged for over %(min)s min, holding %(locks)s",
        "%(env)s: %(n)s IN_PROGRESS_ACCOUNTING runs unchanged for over %(min)s min, holding %(locks)s",
        n,
    ) % {"env": env.label, "n": grouped(n), "min": settings.STALE_RUN_AFTER_MIN, "locks": _locks_text(locks)}
    return Finding(
        env,
        kind,
        present=True,
        observed_at=snapshot.taken_at,
        severity=AlertSeverity.CRITICAL if reasons else AlertSeverity.WARNING,
        summary=summary,
        details=_details(snapshot, reasons, runs, with_modify_date=True),
    )


def _details(
    snapshot: LockSnapshot,
    reasons: list[str],
    runs: list[dict[str, Any]] | BaseException | None,
    *,
    with_modify_date: bool = False,
) -> dict[str, Any]:
    details: dict[str, Any] = {
        "snapshot_id": snapshot.pk,
        "observed_at": snapshot.taken_at.isoformat(),
        "figures": _figures_json(snapshot),
        "severity_reasons": reasons,
        "runs": [],
        "runs_total": None,
        "runs_error": "",
    }
    if isinstance(runs, list):
        details["runs"] = _runs_json(runs, with_modify_date=with_modify_date)
        details["runs_total"] = len(runs)
    elif runs is not None:
        details["runs_error"] = describe_error(runs)
    return details


def _run_lists(snapshots: dict[str, LockSnapshot], envs: dict[str, Environment]) -> dict[str, Any]:
    """The stuck and stale runs of the environments that have any, concurrently.

    Per environment: ``{"stuck": rows | exception | None, "stale": ...}``. A failure here
    (e.g. a timeout on a huge environment) only costs the alert its run list.
    """

    def fetch(env: Environment) -> dict[str, Any]:
        snapshot = snapshots[env.key]
        lists: dict[str, Any] = {"stuck": None, "stale": None}
        for name, needed, read in (
            ("stuck", snapshot.completed_with_locks, stuck_runs),
            ("stale", snapshot.stale_runs, stale_runs),
        ):
            if needed:
                try:
                    lists[name] = read(env)
                except Exception as exc:  # recorded in the alert's details
                    lists[name] = exc
        return lists

    wanted = [envs[key] for key, s in snapshots.items() if s.completed_with_locks or s.stale_runs]
    timeout_s = settings.CONNECT_TIMEOUT_S + 2 * settings.STATEMENT_TIMEOUT_MS / 1000 + 1
    results = run_per_environment(fetch, wanted, timeout_s=timeout_s)
    return {
        key: result if isinstance(result, dict) else {"stuck": result, "stale": result}
        for key, result in results.items()
    }


def alert_findings(observations: Iterable[LockSnapshot | EnvironmentStatus]) -> list[Finding]:
    """What each reachable environment shows, per alert kind. Reads environments only."""
    now = timezone.now()
    snapshots: dict[str, LockSnapshot] = {}
    envs: dict[str, Environment] = {}
    for item in observations:
        snapshot = snapshot_from_status(item, taken_at=now) if isinstance(item, EnvironmentStatus) else item
        if not snapshot.reachable:
            continue  # we cannot tell whether its problems are gone: leave its alerts alone
        try:
            envs[snapshot.environment] = get_environment(snapshot.environment)
        except UnknownEnvironment:
            continue  # removed from the configuration since the snapshot
        snapshots[snapshot.environment] = snapshot
    lists = _run_lists(snapshots, envs)
    findings = []
    # Summaries are stored with the alert and shown to every reader: the deployment's language.
    with deployment_language():
        for key, snapshot in snapshots.items():
            env_lists = lists.get(key, {})
            findings.append(_completed_with_locks_finding(envs[key], snapshot, env_lists.get("stuck")))
            findings.append(_stale_runs_finding(envs[key], snapshot, env_lists.get("stale")))
    return findings


# --- Alerts: following the findings ----------------------------------------------------------


def alerts_evaluate(observations: Iterable[LockSnapshot | EnvironmentStatus]) -> list[AlertEvent]:
    """Open, update, escalate or resolve alerts after a snapshot round; notify on changes.

    Takes the round's snapshots (or ``environments_status`` results); unreachable
    environments are skipped. Returns what changed.
    """
    return alerts_follow(alert_findings(observations))


def alerts_follow(findings: Iterable[Finding]) -> list[AlertEvent]:
    """Let the alerts follow what was found (the snapshots' findings, or a chain
    verification's): open, update, escalate or resolve, and notify, in one transaction
    serialised with every other evaluation. Returns what changed."""
    events: list[AlertEvent] = []
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [ALERTS_ADVISORY_LOCK_KEY])
        for finding in findings:
            event = _alert_follow(finding)
            if event is not None:
                events.append(event)
    return events


def _alert_follow(finding: Finding) -> AlertEvent | None:
    key, kind = finding.environment, finding.kind
    # A round that started earlier but finished later must not undo what a newer one found.
    if Alert.objects.filter(environment=key, kind=kind, updated_at__gt=finding.observed_at).exists():
        return None
    alert = (
        Alert.objects.select_for_update()
        .filter(environment=key, kind=kind)
        .exclude(status=AlertStatus.RESOLVED)
        .first()
    )
    if not finding.present:
        if alert is None:
            return None
        alert.status = AlertStatus.RESOLVED
        alert.resolved_at = finding.observed_at
        alert.updated_at = finding.observed_at
        alert.save(update_fields=["status", "resolved_at", "updated_at"])
        _alert_notify(alert, "resolved")
        return AlertEvent(alert, "resolved")

    if alert is None:
        alert = Alert.objects.create(
            environment=key,
            kind=kind,
            severity=finding.severity,
            opened_at=finding.observed_at,
            updated_at=finding.observed_at,
            summary=finding.summary,
            details=finding.details,
            notified_severity=finding.severity,
        )
        _alert_notify(alert, "opened")
        return AlertEvent(alert, "opened")

    escalated = (
        finding.severity == AlertSeverity.CRITICAL
        and alert.notified_severity != AlertSeverity.CRITICAL
        and alert.status == AlertStatus.OPEN  # acknowledged: someone is on it, no more noise
    )
    alert.severity = finding.severity
    alert.summary = finding.summary
    alert.details = finding.details
    alert.updated_at = finding.observed_at
    if escalated:
        alert.notified_severity = AlertSeverity.CRITICAL
    alert.save(update_fields=["severity", "summary", "details", "updated_at", "notified_severity"])
    if escalated:
        _alert_notify(alert, "escalated")
        return AlertEvent(alert, "escalated")
    return AlertEvent(alert, "updated")


def _notify_prefix(event: str, severity: str) -> str:
    if event == "escalated":
        return _("ESCALATED to CRITICAL")
    if event == "resolved":
        return _("RESOLVED")
    return severity.upper()  # WARNING / CRITICAL, as the alert's severity reads in the data


def _resolved_text(kind: AlertKind) -> str:
    return {
        AlertKind.COMPLETED_WITH_LOCKS: _("No COMPLETED run holds locks any more."),
        AlertKind.STALE_RUNS: _("No IN_PROGRESS_ACCOUNTING run is stale any more."),
        AlertKind.AUDIT_CHAIN_BROKEN: _("A later verification found the audit chain intact."),
    }[kind]


# Damaged audit entries a chain alert's notification lists (the job page has them all).
ALERT_DAMAGES_LISTED = 10


def _alert_notify(alert: Alert, event: str) -> None:
    """Compose the notice in the deployment's language (LANGUAGE_CODE): it has no reader at hand."""
    with deployment_language():
        subject, body = _alert_notice(alert, event)
    notify(subject=subject, body=body, source=f"alert:{alert.pk}")


def _alert_notice(alert: Alert, event: str) -> tuple[str, str]:
    subject = _("[Billing Ops] %(prefix)s: %(summary)s") % {
        "prefix": _notify_prefix(event, alert.severity),
        "summary": alert.summary,
    }
    if not alert.environment:
        where = _("the dashboard's own audit trail (its default database)")
    else:
        try:
            host = get_environment(alert.environment).host
        except UnknownEnvironment:
            host = "?"
        where = f"{alert.environment_label} ({host})"
    details = alert.details
    lines = [alert.summary, ""]
    if event == "resolved":
        lines.append(
            _("%(text)s Resolved at %(at)s.")
            % {"text": _resolved_text(AlertKind(alert.kind)), "at": _when(alert.resolved_at)}
        )
    else:
        reasons = details.get("severity_reasons") or []
        severity = _("Severity: %(severity)s") % {"severity": alert.severity}
        lines.append(severity + (f" ({'; '.join(reasons)})" if reasons else ""))
    lines += [
        _("Environment: %(env)s") % {"env": where},
        _("Alert #%(id)s, opened %(at)s.") % {"id": alert.pk, "at": _when(alert.opened_at)},
    ]
    runs = details.get("runs") or []
    if runs and event != "resolved":
        lines += _listed(
            _("Runs, most locks first (%(shown)s of %(total)s):")
            % {"shown": len(runs), "total": details.get("runs_total")},
            [
                _("%(number)s (id %(id)s): %(locks)s")
                % {"number": r["number"], "id": r["id"], "locks": _locks_text(r["lock_count"])}
                for r in runs
            ],
        )
    damages = details.get("damages") or []
    if damages and event != "resolved":
        shown = damages[:ALERT_DAMAGES_LISTED]
        lines += _listed(
            _("Damaged entries (%(shown)s of %(total)s):")
            % {"shown": len(shown), "total": details.get("damaged_entries")},
            [
                _("entry #%(id)s: %(kind)s - %(detail)s")
                % {"id": d["entry_id"], "kind": d["kind"], "detail": d["detail"]}
                for d in shown
            ],
        )
    if details.get("job_id"):
        lines.append(_("Found by job #%(id)s.") % {"id": details["job_id"]})
    return subject, "\n".join(lines)


def _listed(heading: str, items: list[str]) -> list[str]:
    return ["", heading, *[f"  {item}" for item in items]]


def _when(value: datetime | None) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M %Z") if value else "?"


def alert_acknowledge(*, actor: Actor, alert_id: int) -> Alert:
    """Say someone is on it. The alert stays active until the problem is gone, and is not
    notified again meanwhile. Operators and approvers may; acknowledging twice is harmless."""
    access.require_operator_or_approver(actor)
    with transaction.atomic():
        alert = Alert.objects.select_for_update().get(pk=alert_id)
        if alert.status == AlertStatus.RESOLVED:
            raise ValidationError(_("Alert #%(id)s is already resolved.") % {"id": alert.pk})
        if alert.status == AlertStatus.ACKNOWLEDGED:
            return alert
        assert isinstance(actor, User), "the access check lets only signed-in users through"
        alert.status = AlertStatus.ACKNOWLEDGED
        alert.acknowledged_by = actor
        alert.acknowledged_at = timezone.now()
        alert.save(update_fields=["status", "acknowledged_by", "acknowledged_at"])
        audit_record(
            actor=actor,
            action="alert.acknowledged",
            environment=alert.environment,
            object_type="alert",
            object_id=alert.pk,
            params={"kind": alert.kind, "severity": alert.severity},
            outcome={"summary": alert.summary},
        )
    logger.info("alert %s acknowledged by %s", alert.pk, actor.get_username())
    return alert
