"""The job core: request, approve, refuse, cancel, dispatch, execute, sweep.

The job row in ``default`` is written first and the Celery message, carrying only its id,
is sent after commit. Nothing spans ``default`` and an environment database in one
transaction: we record the intent, do the work in the environment in its own
transactions, then record the outcome, and every step is safe to replay:

* dispatch can fail (Redis down); the job stays ``queued`` with no ``dispatched_at`` and the
  sweeper sends it again later;
* a message can arrive twice; the conditional ``UPDATE ... WHERE status = 'queued'`` claim
  lets exactly one delivery run it;
* a worker can die; the sweeper sees its heartbeat stop and fails the job (saying so) or,
  for resumable kinds, queues it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, User
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, connections, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.functional import Promise
from django.utils.module_loading import import_string
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from audit.services import SYSTEM_SWEEPER, SYSTEM_WORKER, audit_record
from billing_ops import access
from billing_ops.environments import Environment, get_environment
from billing_ops.job_kinds import REGISTRY, JobKind, get_kind
from billing_ops.models import Job, JobClaim, JobLogLine, JobStatus
from billing_ops.preferences import deployment_language

logger = logging.getLogger(__name__)

# Who acts: views pass request.user; the access checks reject anyone not signed in.
Actor = AbstractBaseUser | AnonymousUser


def user_of(actor: Actor) -> User:
    assert isinstance(actor, User), "access checks let only signed-in users through"
    return actor


class JobCancelled(Exception):
    """Raised inside a handler at a safe point when a cancel was requested."""


class JobRefused(Exception):
    """A job cannot start, e.g. its approval does not match its parameters."""


class JobConflict(ValidationError):
    """Another active job already holds one of the claims this request needs."""

    def __init__(self, message: str, holder: Job) -> None:
        super().__init__(message)
        self.holder = holder


def params_digest(*, kind: str, environment: str, params: dict[str, Any]) -> str:
    canonical = json.dumps(
        {"kind": kind, "environment": environment, "params": params},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_log(job_id: int, message: str, *, level: str = "info") -> None:
    JobLogLine.objects.create(job_id=job_id, message=message, level=level)


def _log_in_deployment_language(job_id: int, message: Promise, actor: Actor, comment: str = "") -> None:
    """A log line a user's request writes (requested, approved, cancelled...): stored in the
    deployment's language whoever made the request, as the job's own lines are (job_execute)."""
    with deployment_language():
        text = str(message) % {"user": actor.get_username()}
    job_log(job_id, text + (f" {comment}" if comment else ""))


# --- Requests and decisions ------------------------------------------------------------


def job_request(
    *,
    actor: Actor,
    kind: str,
    environment: str,
    params: dict[str, Any] | None = None,
    claims: Sequence[str] = (),
    requester_check: Callable[[Actor], None] | None = None,
) -> Job:
    """Record a job (awaiting approval, or queued and dispatched after commit).

    ``claims`` are keys no other active job may hold (see JobClaim); a conflict raises
    JobConflict naming the job that holds the key, and nothing is recorded.

    ``environment`` "" (none) is refused unless the kind works on the dashboard itself
    (``JobKind.without_environment``).
    """
    (requester_check or access.require_operator)(actor)
    job_kind = get_kind(kind)
    env = None if environment == "" and job_kind.without_environment else get_environment(environment)
    env_key = env.key if env is not None else ""
    params = params or {}
    digest = params_digest(kind=kind, environment=env_key, params=params)
    status = JobStatus.AWAITING_APPROVAL if job_kind.needs_approval(env) else JobStatus.QUEUED
    with transaction.atomic():
        job = Job.objects.create(
            kind=kind,
            environment=env_key,
            params=params,
            params_digest=digest,
            status=status,
            requested_by=user_of(actor),
        )
        _claims_take(job, claims)
        _log_in_deployment_language(job.pk, gettext_lazy("Requested by %(user)s."), actor)
        audit_record(
            actor=actor,
            action="job.requested",
            environment=env_key,
            object_type="job",
            object_id=job.pk,
            params={"kind": kind, "params": params, "digest": digest},
            outcome={"status": status},
        )
        if status == JobStatus.QUEUED:
            transaction.on_commit(lambda: job_dispatch(job_id=job.pk))
        else:
            _log_in_deployment_language(
                job.pk,
                gettext_lazy("Waiting for an approver (this kind of job always needs one).")
                if job_kind.always_needs_approval
                else gettext_lazy("Waiting for an approver (protected environment)."),
                actor,
            )
    return job


def _claims_take(job: Job, keys: Sequence[str]) -> None:
    for key in keys:
        try:
            with transaction.atomic():
                JobClaim.objects.create(key=key, job=job)
        except IntegrityError:
            holder = JobClaim.objects.select_related("job").filter(key=key).first()
            if holder is None:  # settled in between: take it
                JobClaim.objects.create(key=key, job=job)
                continue
            other = holder.job
            raise JobConflict(
                _("Job #%(id)s (%(kind)s, %(status)s) is already working on this (%(key)s).")
                % {
                    "id": other.pk,
                    "kind": other.kind_label,
                    "status": other.get_status_display(),
                    "key": key,
                },
                holder=other,
            ) from None


def _claims_release(job_id: int) -> None:
    """A settled job holds nothing any more."""
    JobClaim.objects.filter(job_id=job_id).delete()


def _job_for_decision(*, actor: Actor, job_id: int) -> Job:
    """Lock a job an approver is about to decide on; refuse their own and decided ones."""
    access.require_approver(actor)
    job = Job.objects.select_for_update().get(pk=job_id)
    if job.requested_by_id == actor.pk:
        raise PermissionDenied(_("Nobody approves or refuses their own request."))
    if job.status != JobStatus.AWAITING_APPROVAL:
        raise ValidationError(
            _("Job #%(id)s is %(status)s, not awaiting approval.")
            % {"id": job.pk, "status": job.get_status_display()}
        )
    return job


def job_approve(*, actor: Actor, job_id: int, digest: str, comment: str = "") -> Job:
    """Approve a waiting job. The approver must not be the requester, and must have seen
    exactly these parameters (``digest`` comes from the page the approver read)."""
    with transaction.atomic():
        job = _job_for_decision(actor=actor, job_id=job_id)
        if digest != job.params_digest:
            raise ValidationError(_("The job's parameters changed since you reviewed them; review it again."))
        check = get_kind(job.kind).approval_check
        if check:
            import_string(check)(job)
        job.status = JobStatus.QUEUED
        job.approved_by = user_of(actor)
        job.approved_at = timezone.now()
        job.approved_digest = digest
        job.decision_comment = comment
        job.save(
            update_fields=["status", "approved_by", "approved_at", "approved_digest", "decision_comment"]
        )
        _log_in_deployment_language(job.pk, gettext_lazy("Approved by %(user)s."), actor, comment)
        audit_record(
            actor=actor,
            action="job.approved",
            environment=job.environment,
            object_type="job",
            object_id=job.pk,
            params={"kind": job.kind, "digest": digest, "comment": comment},
            outcome={"status": job.status},
        )
        transaction.on_commit(lambda: job_dispatch(job_id=job.pk))
    return job


def job_refuse(*, actor: Actor, job_id: int, comment: str = "") -> Job:
    with transaction.atomic():
        job = _job_for_decision(actor=actor, job_id=job_id)
        job.status = JobStatus.REFUSED
        job.approved_by = user_of(actor)
        job.approved_at = timezone.now()
        job.decision_comment = comment
        job.finished_at = timezone.now()
        job.save(update_fields=["status", "approved_by", "approved_at", "decision_comment", "finished_at"])
        _claims_release(job.pk)
        audit_record(
            actor=actor,
            action="job.refused",
            environment=job.environment,
            object_type="job",
            object_id=job.pk,
            params={"kind": job.kind, "comment": comment},
            outcome={"status": job.status},
        )
        _log_in_deployment_language(job.pk, gettext_lazy("Refused by %(user)s."), actor, comment)
        transaction.on_commit(lambda: _kind_settled(job))
    return job


def job_cancel(*, actor: Actor, job_id: int) -> Job:
    """Cancel a job that has not started; ask a running one to stop at its next safe point."""
    access.require_operator_or_approver(actor)
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job_id)
        if job.requested_by_id != actor.pk and not access.is_approver(actor):
            raise PermissionDenied(_("Only the requester or an approver can cancel this job."))
        if job.status in (JobStatus.AWAITING_APPROVAL, JobStatus.QUEUED):
            job.status = JobStatus.CANCELLED
            job.finished_at = timezone.now()
            job.save(update_fields=["status", "finished_at"])
            _claims_release(job.pk)
            _log_in_deployment_language(
                job.pk, gettext_lazy("Cancelled by %(user)s before it started."), actor
            )
            transaction.on_commit(lambda: _kind_settled(job))
        elif job.status == JobStatus.RUNNING:
            job.cancel_requested = True
            job.save(update_fields=["cancel_requested"])
            _log_in_deployment_language(
                job.pk,
                gettext_lazy("Cancel requested by %(user)s; the job stops at its next safe point."),
                actor,
            )
        else:
            raise ValidationError(_("Job #%(id)s has already finished.") % {"id": job.pk})
        audit_record(
            actor=actor,
            action="job.cancelled",
            environment=job.environment,
            object_type="job",
            object_id=job.pk,
            params={"kind": job.kind},
            outcome={"status": job.status, "cancel_requested": job.cancel_requested},
        )
    return job


# --- Dispatch ----------------------------------------------------------------------------


def job_dispatch(*, job_id: int) -> bool:
    """Send a queued job to Celery. Never raises: a failure is recorded for the sweeper."""
    from billing_ops.celery import app
    from billing_ops.tasks import run_job

    try:
        # A connection of its own, opened with the broker's short connect timeout: a pooled
        # one could hang on a half-dead socket, and publishing never retries here.
        with app.connection_for_write() as connection:
            run_job.apply_async((job_id,), connection=connection, retry=False)  # type: ignore[call-arg]
    except Exception as exc:  # kombu/redis errors: the broker is unreachable
        logger.warning("dispatch of job %s failed: %s", job_id, exc)
        Job.objects.filter(pk=job_id, status=JobStatus.QUEUED).update(
            dispatch_error=f"{type(exc).__name__}: {exc}"[:1000]
        )
        return False
    Job.objects.filter(pk=job_id, status=JobStatus.QUEUED).update(
        dispatched_at=timezone.now(), dispatch_count=F("dispatch_count") + 1, dispatch_error=""
    )
    return True


@dataclass
class SweepReport:
    redispatched: list[int] = field(default_factory=list)
    undispatchable: list[int] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


def jobs_sweep() -> SweepReport:
    """Re-send jobs whose message never reached a worker; settle jobs whose worker died."""
    report = SweepReport()
    now = timezone.now()
    stale_before = now - timedelta(seconds=settings.JOB_STALE_AFTER_S)
    for job in Job.objects.filter(status=JobStatus.RUNNING, heartbeat_at__lt=stale_before):
        kind = get_kind(job.kind)
        lost = _("The worker %(worker)s stopped responding (last heartbeat %(at)s).") % {
            "worker": job.worker or "?",
            "at": job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "?",
        }
        if kind.resumable and job.attempts < kind.max_attempts:
            claimed = Job.objects.filter(pk=job.pk, status=JobStatus.RUNNING, attempts=job.attempts).update(
                status=JobStatus.QUEUED, dispatched_at=None, worker=""
            )
            if claimed:
                job_log(job.pk, lost + " " + _("Queued again to resume."), level="warning")
                report.requeued.append(job.pk)
        else:
            claimed = Job.objects.filter(pk=job.pk, status=JobStatus.RUNNING, attempts=job.attempts).update(
                status=JobStatus.FAILED, finished_at=now, error=f"{lost} {kind.worker_lost_note}".strip()
            )
            if claimed:
                job_log(job.pk, lost + " " + str(kind.worker_lost_note), level="error")
                report.failed.append(job.pk)
                _job_settled(job.pk, actor=SYSTEM_SWEEPER)

    redispatch_before = now - timedelta(seconds=settings.JOB_REDISPATCH_AFTER_S)
    pending = (
        Job.objects.filter(status=JobStatus.QUEUED)
        .filter(Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=redispatch_before))
        .values_list("pk", flat=True)
    )
    for job_id in list(pending[:500]):
        (report.redispatched if job_dispatch(job_id=job_id) else report.undispatchable).append(job_id)
    return report


# --- Execution ---------------------------------------------------------------------------


class JobContext:
    """What a handler gets: the job's parameters and environment, and ways to report."""

    def __init__(self, job: Job, env: Environment | None) -> None:
        self.job_id = job.pk
        self.kind = job.kind
        self.params: dict[str, Any] = job.params
        self.env = env
        self.requested_by_id = job.requested_by_id
        self.approved_by_id = job.approved_by_id
        self.attempt = job.attempts
        # What the job page should show even if the handler then fails or is cancelled
        # (``keep_result``); a handler that returns has its return value kept instead.
        self.kept_result: dict[str, Any] | None = None

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        fields: dict[str, Any] = {"progress_done": done, "heartbeat_at": timezone.now()}
        if total is not None:
            fields["progress_total"] = total
        if message:
            fields["progress_message"] = message[:500]
        Job.objects.filter(pk=self.job_id).update(**fields)

    def log(self, message: str, *, level: str = "info") -> None:
        job_log(self.job_id, message, level=level)

    def check_cancel(self) -> None:
        if Job.objects.filter(pk=self.job_id, cancel_requested=True).exists():
            raise JobCancelled()

    def keep_result(self, result: dict[str, Any]) -> None:
        """Keep ``result`` on the job however it ends (e.g. the counts of a restore that
        failed): saved with the outcome, by the delivery that still owns the job."""
        self.kept_result = result


class _Heartbeat(threading.Thread):
    """Writes the job's heartbeat while the handler works, even inside a long statement."""

    def __init__(self, job_id: int) -> None:
        super().__init__(daemon=True, name=f"job-{job_id}-heartbeat")
        self.job_id = job_id
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopped.wait(settings.JOB_HEARTBEAT_S):
                Job.objects.filter(pk=self.job_id, status=JobStatus.RUNNING).update(
                    heartbeat_at=timezone.now()
                )
        except Exception:  # pragma: no cover - the default database vanished; the sweeper judges
            logger.exception("heartbeat for job %s failed", self.job_id)
        finally:
            connections.close_all()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=settings.JOB_HEARTBEAT_S + 5)


def job_claim(*, job_id: int, worker: str) -> Job | None:
    """Atomically move a job from queued to running; None if another delivery has it."""
    now = timezone.now()
    claimed = Job.objects.filter(pk=job_id, status=JobStatus.QUEUED).update(
        status=JobStatus.RUNNING,
        started_at=now,
        heartbeat_at=now,
        worker=worker,
        attempts=F("attempts") + 1,
    )
    if not claimed:
        return None
    return Job.objects.get(pk=job_id)


def job_execute(*, job_id: int, worker: str | None = None) -> str:
    """Run one job on this worker. Returns the final status (or 'skipped').

    Its log lines, result texts and notices are stored and read by everyone: they are
    written in the deployment's language (LANGUAGE_CODE), whoever asked for the job."""
    with deployment_language():
        return _job_execute(job_id=job_id, worker=worker)


def _job_execute(*, job_id: int, worker: str | None) -> str:
    worker = worker or socket.gethostname()
    job = job_claim(job_id=job_id, worker=worker)
    if job is None:
        logger.info("job %s not claimed (already taken, finished or cancelled)", job_id)
        return "skipped"
    try:
        kind = get_kind(job.kind)
        env = get_environment(job.environment) if job.environment else None
    except LookupError as exc:  # configuration changed since the request: say so, run nothing
        Job.objects.filter(pk=job.pk, status=JobStatus.RUNNING).update(
            status=JobStatus.FAILED, finished_at=timezone.now(), error=str(exc)
        )
        _claims_release(job.pk)
        job_log(job.pk, str(exc), level="error")
        return str(JobStatus.FAILED)
    job_log(job.pk, _("Started on %(worker)s (attempt %(n)s).") % {"worker": worker, "n": job.attempts})
    heartbeat = _Heartbeat(job.pk)
    heartbeat.start()
    started = time.monotonic()
    outcome: dict[str, Any]
    ctx: JobContext | None = None
    try:
        _check_approval(kind, env, job)
        handler = import_string(kind.handler)
        ctx = JobContext(job, env)
        result = handler(ctx)
        outcome = {"status": JobStatus.SUCCEEDED, "result": result}
    except JobCancelled:
        outcome = {
            "status": JobStatus.CANCELLED,
            "error": _("Cancelled at a safe point; see the log for what was done."),
        }
    except JobRefused as exc:
        outcome = {"status": JobStatus.FAILED, "error": str(exc)}
    except Exception as exc:  # the handler's own transactions have rolled back
        logger.exception("job %s failed", job.pk)
        outcome = {"status": JobStatus.FAILED, "error": f"{type(exc).__name__}: {exc}"[:4000]}
    finally:
        heartbeat.stop()
    if "result" not in outcome and ctx is not None and ctx.kept_result is not None:
        outcome["result"] = ctx.kept_result
    elapsed_s = time.monotonic() - started
    fields: dict[str, Any] = {"status": outcome["status"], "finished_at": timezone.now()}
    if "result" in outcome:
        fields["result"] = outcome["result"]
    if "error" in outcome:
        fields["error"] = outcome["error"]
    # Only the delivery that still owns the job may settle it (the sweeper may have failed it).
    settled = Job.objects.filter(pk=job.pk, status=JobStatus.RUNNING, attempts=job.attempts).update(**fields)
    level = "info" if outcome["status"] == JobStatus.SUCCEEDED else "error"
    job_log(
        job.pk,
        _("Finished: %(status)s in %(s).1f s.") % {"status": outcome["status"], "s": elapsed_s}
        + (f" {outcome['error']}" if "error" in outcome else ""),
        level=level,
    )
    if settled:
        _job_settled(job.pk)
    return str(outcome["status"])


def _job_settled(job_id: int, *, actor: str = SYSTEM_WORKER) -> None:
    """After a job reached its final state: free its claims, record the outcome in the
    audit trail, then let its kind react (notifications, its own records). A failing hook
    is logged, never undoes the outcome."""
    _claims_release(job_id)
    job = Job.objects.get(pk=job_id)
    audit_record(
        actor=actor,
        action="job.finished",
        environment=job.environment,
        object_type="job",
        object_id=job.pk,
        params={"kind": job.kind, "worker": job.worker, "attempts": job.attempts},
        outcome={"status": job.status, "error": job.error[:2000], "result": job.result or {}},
    )
    _kind_settled(job)


def _kind_settled(job: Job) -> None:
    """Let the job's kind react to its end, however it came (ran, refused, cancelled before
    it started): notifications, its own records, files to remove. A failing hook is
    logged, never undoes the outcome."""
    kind = REGISTRY.get(job.kind)
    if kind is None or not kind.on_settled:
        return
    try:
        with deployment_language():  # notices: see job_execute
            import_string(kind.on_settled)(job)
    except Exception:
        logger.exception("on_settled hook of job %s failed", job.pk)


def _check_approval(kind: JobKind, env: Environment | None, job: Job) -> None:
    digest = params_digest(kind=job.kind, environment=job.environment, params=job.params)
    if digest != job.params_digest:
        raise JobRefused(_("The job's parameters do not match what was requested; refusing to run."))
    if kind.needs_approval(env):
        if job.approved_by_id is None or job.approved_digest != digest:
            raise JobRefused(_("This job needs an approval for exactly these parameters; refusing to run."))
        if job.approved_by_id == job.requested_by_id:
            raise JobRefused(_("The requester approved their own job; refusing to run."))


# --- The environment check job -------------------------------------------------------------

CONTRACT_TABLES = (
    ("billing.billings", "billing", "billings"),
    ("lock.locks", "lock", "locks"),
    ("invoice_lines", "public", "invoice_lines"),
    ("audit_logs", "public", "audit_logs"),
)


def environment_check(ctx: JobContext) -> dict[str, Any]:
    """Connect to the environment; record server version, contract schema and row counts."""
    assert ctx.env is not None
    from billing_ops.selectors import contract_schema_status

    steps = 2 + len(CONTRACT_TABLES)
    ctx.progress(0, steps, _("Connecting"))
    started = time.monotonic()
    with connections[ctx.env.alias].cursor() as cursor:
        cursor.execute("SELECT current_setting('server_version'), current_database(), current_user")
        version, database, user = cursor.fetchone()
        latency_ms = round((time.monotonic() - started) * 1000, 1)
        ctx.log(
            _("Connected to %(db)s as %(user)s: PostgreSQL %(v)s (%(ms)s ms).")
            % {"db": database, "user": user, "v": version, "ms": latency_ms}
        )
        ctx.progress(1, steps, _("Checking the contract schema"))
        schema = contract_schema_status(ctx.env)
        ctx.progress(2, steps, _("Counting rows"))
        counts: dict[str, int | None] = {}
        for n, (label, schema_name, table) in enumerate(CONTRACT_TABLES, start=3):
            ctx.check_cancel()
            if schema["tables"].get(label):
                cursor.execute(f'SELECT count(*) FROM "{schema_name}"."{table}"')  # names are constants
                counts[label] = cursor.fetchone()[0]
            else:
                counts[label] = None
            ctx.progress(n, steps, _("Counted %(table)s") % {"table": label})
    connections[ctx.env.alias].close()
    return {
        "server_version": version,
        "database": database,
        "user": user,
        "latency_ms": latency_ms,
        "schema": schema,
        "row_counts": counts,
    }


# --- Roles ---------------------------------------------------------------------------------


def roles_ensure() -> None:
    """Create the Viewer/Operator/Approver groups with their permissions (idempotent).

    Migration 0002 does this on migrate; this is for a database whose tables were flushed.
    """
    from django.contrib.auth.models import Group, Permission

    for role, codenames in access.ROLE_PERMISSIONS.items():
        group, _created = Group.objects.get_or_create(name=role)
        group.permissions.add(
            *Permission.objects.filter(content_type__app_label="billing_ops", codename__in=codenames)
        )
