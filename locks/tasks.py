"""Thin Celery tasks of the stuck-lock monitor (scheduled by beat; see settings)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from locks import schedule, services


@shared_task(name="locks.tasks.snapshot_environments", ignore_result=True)
def snapshot_environments() -> dict[str, Any]:
    """One monitor round: snapshot every environment, let the alerts follow, keep the
    history within its retention."""
    snapshots = services.snapshots_take()
    events = services.alerts_evaluate(snapshots)
    pruned = services.snapshots_prune()
    return {
        "snapshots": {s.environment: s.verdict if s.reachable else "unreachable" for s in snapshots},
        "alerts": [f"{e.event} #{e.alert.pk} {e.alert.environment} {e.alert.kind}" for e in events],
        "pruned": pruned,
    }


@shared_task(name="locks.tasks.scheduled_cleanup", ignore_result=True)
def scheduled_cleanup() -> list[str]:
    """The daily cleanup (see locks.schedule): request releases where the policy is on."""
    return schedule.cleanup_scheduled_run()
