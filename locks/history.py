"""Reads of the stuck-lock monitor's own records in ``default``: snapshots and alerts.

(``locks/selectors.py`` reads the environments themselves; this module never does.)
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

from django.db.models import Case, IntegerField, QuerySet, Value, When
from django.utils import timezone

from billing_ops.environments import all_environments
from locks.models import ACTIVE_ALERT_STATUSES, Alert, AlertSeverity, AlertStatus, LockSnapshot

RECENT_ALERTS_DAYS = 30
RECENT_ALERTS_LIMIT = 100


class SnapshotChange(NamedTuple):
    """An environment's latest snapshot and the one before it ("change since last time")."""

    latest: LockSnapshot
    previous: LockSnapshot | None

    def change(self, name: str) -> int | None:
        """latest - previous for a figure; None when either snapshot lacks it (unreachable)."""
        if self.previous is None:
            return None
        now, before = getattr(self.latest, name), getattr(self.previous, name)
        if now is None or before is None:
            return None
        return int(now) - int(before)

    # For templates, which cannot pass arguments.
    @property
    def stuck_locks_change(self) -> int | None:
        return self.change("stuck_locks")

    @property
    def completed_with_locks_change(self) -> int | None:
        return self.change("completed_with_locks")

    @property
    def total_locks_change(self) -> int | None:
        return self.change("total_locks")

    @property
    def stale_runs_change(self) -> int | None:
        return self.change("stale_runs")


def latest_snapshots(env_keys: list[str] | None = None) -> dict[str, SnapshotChange]:
    """Per environment (the configured ones, in the file's order, unless ``env_keys`` is
    given), its latest snapshot and the previous one. Environments never snapshotted are
    absent. One query: a UNION of two-row index scans, one per environment."""
    keys = [env.key for env in all_environments()] if env_keys is None else list(env_keys)
    if not keys:
        return {}
    per_env = [LockSnapshot.objects.filter(environment=key).order_by("-taken_at", "-id")[:2] for key in keys]
    rows = list(per_env[0].union(*per_env[1:], all=True)) if len(per_env) > 1 else list(per_env[0])
    by_env: dict[str, list[LockSnapshot]] = {}
    for row in sorted(rows, key=lambda s: (s.taken_at, s.pk), reverse=True):
        by_env.setdefault(row.environment, []).append(row)
    return {
        key: SnapshotChange(by_env[key][0], by_env[key][1] if len(by_env[key]) > 1 else None)
        for key in keys
        if key in by_env
    }


def stuck_locks_series(env_key: str, since: datetime) -> list[tuple[datetime, int]]:
    """(taken_at, stuck locks) of the environment's reachable snapshots since ``since``,
    oldest first: what the chart draws. Unreachable rounds have no figure and are left out."""
    rows = (
        LockSnapshot.objects.filter(environment=env_key, taken_at__gte=since, reachable=True)
        .order_by("taken_at")
        .values_list("taken_at", "stuck_locks")
    )
    return [(taken_at, stuck) for taken_at, stuck in rows if stuck is not None]


def alerts_active(*, environment: str | None = None) -> QuerySet[Alert]:
    """Open and acknowledged alerts: critical first, then the newest."""
    alerts = Alert.objects.filter(status__in=ACTIVE_ALERT_STATUSES)
    if environment is not None:
        alerts = alerts.filter(environment=environment)
    severity_rank = Case(
        When(severity=AlertSeverity.CRITICAL, then=Value(0)), default=Value(1), output_field=IntegerField()
    )
    return alerts.select_related("acknowledged_by").order_by(severity_rank, "-opened_at")


def alerts_recent(
    *, days: int = RECENT_ALERTS_DAYS, limit: int = RECENT_ALERTS_LIMIT, include_active: bool = False
) -> list[Alert]:
    """Alerts resolved in the last ``days`` days, the latest resolved first (the history
    beside ``alerts_active``); with ``include_active``, active ones too, newest first."""
    since = timezone.now() - timedelta(days=days)
    alerts = Alert.objects.select_related("acknowledged_by")
    if include_active:
        return list(
            alerts.exclude(status=AlertStatus.RESOLVED, resolved_at__lt=since).order_by("-opened_at")[:limit]
        )
    return list(
        alerts.filter(status=AlertStatus.RESOLVED, resolved_at__gte=since).order_by("-resolved_at")[:limit]
    )
