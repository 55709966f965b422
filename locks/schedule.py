"""The scheduled cleanup: which environments it covers, when it runs, and the run itself.

The lock-release analysis recommends a daily cleanup at 02:00 of completed runs' locks.
Here it is one django-celery-beat PeriodicTask (time and time zone editable by approvers;
beat reads changes from the database) and a policy per environment: on by default where
the environment is not protected; in a protected environment, when enabled, it only opens
requests that an approver must decide on. Each run goes through exactly the same preview,
claims, batched delete and records as a release an operator asks for; a scheduled release
still going when the next is due holds the environment's schedule claim, so the next one
does not start a second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celery.schedules import crontab
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import DatabaseError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from audit.services import audit_record
from billing_ops import access
from billing_ops.environments import Environment, all_environments
from billing_ops.models import JobClaim
from billing_ops.services import Actor, JobConflict, user_of
from locks.models import CleanupPolicy
from locks.release import (
    eligible_run_ids,
    release_plan_prepare,
    release_request,
    run_claim_key,
    schedule_claim_key,
)

logger = logging.getLogger(__name__)

SCHEDULE_NAME = "scheduled-lock-cleanup"
SCHEDULE_TASK = "locks.tasks.scheduled_cleanup"
SCHEDULER_USERNAME = "scheduler"
DEFAULT_CRONTAB = {"minute": "0", "hour": "2", "day_of_week": "*", "day_of_month": "*", "month_of_year": "*"}


def scheduler_user() -> User:
    """The system user scheduled releases are requested by; it cannot log in or approve."""
    user, created = User.objects.get_or_create(username=SCHEDULER_USERNAME)
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


def _is_scheduler(actor: Actor) -> None:
    if getattr(actor, "username", None) != SCHEDULER_USERNAME:
        raise PermissionError("only the scheduler requests scheduled releases")


# --- Policies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    env: Environment
    enabled: bool
    system_only: bool
    updated_by: User | None = None
    updated_at: object = None

    @property
    def requests_only(self) -> bool:
        """Protected: the schedule opens requests for an approver instead of releasing."""
        return self.env.protected


def cleanup_policies() -> list[Policy]:
    rows = {p.environment: p for p in CleanupPolicy.objects.select_related("updated_by")}
    policies = []
    for env in all_environments():
        row = rows.get(env.key)
        if row is None:
            policies.append(Policy(env, enabled=not env.protected, system_only=False))
        else:
            policies.append(Policy(env, row.enabled, row.system_only, row.updated_by, row.updated_at))
    return policies


def cleanup_policy_set(*, actor: Actor, env: Environment, enabled: bool, system_only: bool) -> CleanupPolicy:
    access.require_approver(actor)
    before = next((p for p in cleanup_policies() if p.env.key == env.key), None)
    if before is not None and (before.enabled, before.system_only) == (enabled, system_only):
        return CleanupPolicy.objects.filter(environment=env.key).first() or CleanupPolicy(
            environment=env.key, enabled=enabled, system_only=system_only
        )
    audit_record(
        actor=actor,
        action="schedule.changed",
        environment=env.key,
        object_type="cleanup_policy",
        object_id=env.key,
        params={"enabled": enabled, "system_only": system_only},
        outcome={
            "before": {
                "enabled": before.enabled if before else None,
                "system_only": before.system_only if before else None,
            }
        },
    )
    policy, _created = CleanupPolicy.objects.update_or_create(
        environment=env.key,
        defaults={
            "enabled": enabled,
            "system_only": system_only,
            "updated_by": user_of(actor),
            "updated_at": timezone.now(),
        },
    )
    return policy


# --- When ------------------------------------------------------------------------------------


def cleanup_schedule() -> PeriodicTask:
    """The periodic task row (created by migration; recreated if a flush removed it)."""
    task = PeriodicTask.objects.select_related("crontab").filter(name=SCHEDULE_NAME).first()
    if task is None:
        schedule, _created = CrontabSchedule.objects.get_or_create(
            **DEFAULT_CRONTAB, timezone=settings.CELERY_TIMEZONE
        )
        task = PeriodicTask.objects.create(
            name=SCHEDULE_NAME, task=SCHEDULE_TASK, crontab=schedule, enabled=True
        )
    return task


def cleanup_schedule_set(
    *, actor: Actor, minute: str, hour: str, day_of_week: str, time_zone: str, enabled: bool
) -> PeriodicTask:
    """Change when the scheduled cleanup runs (approvers)."""
    access.require_approver(actor)
    try:
        crontab(minute=minute, hour=hour, day_of_week=day_of_week)
    except (ValueError, IndexError) as exc:
        raise ValidationError(_("Not a valid schedule: %(error)s") % {"error": exc}) from None
    try:
        ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(_("Unknown time zone %(tz)s.") % {"tz": time_zone}) from None
    with transaction.atomic():
        task = cleanup_schedule()
        schedule, _created = CrontabSchedule.objects.get_or_create(
            minute=minute,
            hour=hour,
            day_of_week=day_of_week,
            day_of_month="*",
            month_of_year="*",
            timezone=time_zone,
        )
        before = {
            "minute": task.crontab.minute,
            "hour": task.crontab.hour,
            "day_of_week": task.crontab.day_of_week,
            "time_zone": str(task.crontab.timezone),
            "enabled": task.enabled,
        }
        task.crontab = schedule
        task.enabled = enabled
        task.save(update_fields=["crontab", "enabled"])  # PeriodicTask.save bumps beat's change marker
        audit_record(
            actor=actor,
            action="schedule.changed",
            object_type="schedule",
            object_id=SCHEDULE_NAME,
            params={
                "minute": minute,
                "hour": hour,
                "day_of_week": day_of_week,
                "time_zone": time_zone,
                "enabled": enabled,
            },
            outcome={"before": before},
        )
    return task


# --- The run ------------------------------------------------------------------------------------


def cleanup_scheduled_run() -> list[str]:
    """One scheduled round: for each enabled environment, preview all eligible runs' locks
    and request their release (queued, or awaiting an approver when protected)."""
    outcomes: list[str] = []
    requester = scheduler_user()
    for policy in cleanup_policies():
        env = policy.env
        if not policy.enabled:
            continue
        holder = JobClaim.objects.filter(key=schedule_claim_key(env.key)).select_related("job").first()
        if holder is not None:
            outcomes.append(
                f"{env.key}: skipped, the previous scheduled cleanup (job #{holder.job_id}) is still going"
            )
            continue
        try:
            run_ids = eligible_run_ids(env)
        except DatabaseError as exc:
            outcomes.append(f"{env.key}: skipped, unreachable ({str(exc).strip().splitlines()[0]})")
            continue
        claimed = set(
            JobClaim.objects.filter(key__in=[run_claim_key(env.key, r) for r in run_ids]).values_list(
                "key", flat=True
            )
        )
        run_ids = [r for r in run_ids if run_claim_key(env.key, r) not in claimed]
        if not run_ids:
            outcomes.append(f"{env.key}: nothing to release")
            continue
        try:
            plan = release_plan_prepare(
                actor=None, env=env, run_ids=run_ids, system_only=policy.system_only, scheduled=True
            )
            job = release_request(
                actor=requester, plan_id=plan.pk, digest=plan.digest, requester_check=_is_scheduler
            )
        except (ValidationError, JobConflict) as exc:
            outcomes.append(f"{env.key}: skipped, {' '.join(getattr(exc, 'messages', [str(exc)]))}")
            continue
        outcomes.append(
            f"{env.key}: job #{job.pk} {job.status} for {plan.lock_count} locks of {len(run_ids)} runs"
        )
    for line in outcomes:
        logger.info("scheduled cleanup: %s", line)
    return outcomes
