"""Release the locks of finished billing runs from the command line.

    manage.py release_locks --env KEY (--run ID ... | --all-eligible) [--system-only]
                            [--dry-run] --actor USERNAME

The same service as the web form: the same eligibility checks, preview, claims, approvals
and records. It prints the preview; with --dry-run it stops there and changes nothing.
Otherwise it requests the release as USERNAME: in a protected environment the request
waits for an approver (the command says so and exits 0); elsewhere the job runs here, in
this process, and the command exits 0 only if it succeeded. Refusals exit non-zero with
the reason.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing_ops.environments import UnknownEnvironment, get_environment
from billing_ops.models import Job, JobStatus
from billing_ops.services import job_execute
from locks.models import LockReleasePlan
from locks.release import eligible_run_ids, release_plan_prepare, release_request


class Command(BaseCommand):
    help = "Release the locks of COMPLETED, failed or stale billing runs (preview, then delete in batches)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--env", required=True, metavar="KEY")
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--run", type=int, action="append", dest="runs", metavar="ID")
        which.add_argument("--all-eligible", action="store_true")
        parser.add_argument("--system-only", action="store_true", help="Release system locks only.")
        parser.add_argument("--dry-run", action="store_true", help="Print the preview and change nothing.")
        parser.add_argument("--actor", required=True, metavar="USERNAME", help="Who is asking (an operator).")
        parser.add_argument(
            "--confirm", default="", metavar="LABEL", help="The environment's label, where required."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            env = get_environment(options["env"])
        except UnknownEnvironment as exc:
            raise CommandError(str(exc)) from None
        try:
            actor = get_user_model().objects.get(username=options["actor"], is_active=True)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no active user {options['actor']!r}") from None
        run_ids = eligible_run_ids(env) if options["all_eligible"] else options["runs"]
        if not run_ids:
            self.stdout.write("Nothing to do: no eligible run holds locks.")
            return
        try:
            plan = release_plan_prepare(
                actor=actor, env=env, run_ids=run_ids, system_only=options["system_only"]
            )
        except (ValidationError, PermissionDenied) as exc:
            raise CommandError(_message(exc)) from None
        self.stdout.write(_preview_text(env.label, plan))
        if options["dry_run"]:
            LockReleasePlan.objects.filter(pk=plan.pk).delete()
            self.stdout.write("Dry run: nothing was changed.")
            return
        try:
            job = release_request(
                actor=actor, plan_id=plan.pk, digest=plan.digest, confirmation=options["confirm"]
            )
        except (ValidationError, PermissionDenied) as exc:
            raise CommandError(_message(exc)) from None
        if job.status == JobStatus.AWAITING_APPROVAL:
            self.stdout.write(f"Job #{job.pk} is waiting for an approver ({env.label} is protected).")
            return
        # Run it here; the message on its way to a worker finds the job taken and does nothing.
        job_execute(job_id=job.pk, worker="cli")
        job = Job.objects.get(pk=job.pk)
        result = job.result or {}
        released = result.get("released", 0)
        self.stdout.write(f"Job #{job.pk} {job.status}: released {released:,} of {plan.lock_count:,} locks.")
        if job.status != JobStatus.SUCCEEDED:
            raise CommandError(job.error or f"job #{job.pk} {job.status}")


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    return str(exc)


def _preview_text(label: str, plan: LockReleasePlan) -> str:
    what = "system locks" if plan.system_only else "locks"
    lines = [f"Preview for {label}: {plan.lock_count:,} {what} of {len(plan.summary['runs'])} run(s)"]
    for run_id, run in plan.summary["runs"].items():
        types = ", ".join(f"{t} {n:,}" for t, n in sorted(run["by_entity_type"].items()))
        lines.append(f"  run {run_id} {run['billing_number']} ({run['status']}): {run['locks']:,} — {types}")
    for run_id, reason in plan.summary["refused"].items():
        lines.append(f"  run {run_id} left out: {reason}")
    lines.append(f"  digest {plan.digest}")
    return "\n".join(lines)
