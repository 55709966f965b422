"""Upsert missing invoice lines from a CSV (runbook §3), with the runbook's flags.

    manage.py batch_upsert --csv PATH --run-id ID (--env KEY | --database-url URL)
                           [--batch-size N] [--dry-run] [--actor USERNAME]

With --env the same request as the web form is recorded (the CSV is stored, its header
checked, the run id reserved) and the job runs here, in this process, unless the
environment is protected: then it waits for an approver and a worker runs it. With
--database-url (a database that is not a configured environment) the same upsert runs
here directly and is recorded as a run of ``url:host:port/db``. Prints the runbook's
§3.4 lines; exits non-zero, saying why, when the upsert is refused or rolled back.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing_ops.environments import UnknownEnvironment, get_environment
from billing_ops.models import Job, JobLogLine, JobStatus
from billing_ops.services import JobRefused, job_execute
from reconciliation.csvfile import CsvError
from reconciliation.services import adhoc_upsert, file_chunks, upsert_request
from reconciliation.upsert import UpsertFailed, UpsertRefused


class Command(BaseCommand):
    help = "Upsert missing invoice lines from a reconciliation CSV (one transaction, audited)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--csv", required=True, metavar="PATH")
        parser.add_argument("--run-id", required=True, metavar="ID", help="Unique per environment.")
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("--env", metavar="KEY", help="A configured environment.")
        target.add_argument("--database-url", metavar="URL", help="Any database with the contract schema.")
        parser.add_argument("--batch-size", type=int, default=settings.RECONCILIATION_BATCH_SIZE, metavar="N")
        parser.add_argument("--dry-run", action="store_true", help="Run in a transaction, then ROLLBACK.")
        parser.add_argument(
            "--actor",
            default=getpass.getuser(),
            metavar="USERNAME",
            help="The operator's dashboard account (default: the login name).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["csv"])
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
        try:
            actor = get_user_model().objects.get(username=options["actor"], is_active=True)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no active dashboard user {options['actor']!r} (use --actor)") from None
        try:
            if options["database_url"]:
                adhoc_upsert(
                    actor=actor,
                    url=options["database_url"],
                    csv_path=path,
                    run_id=options["run_id"],
                    batch_size=options["batch_size"],
                    dry_run=options["dry_run"],
                    report=_Printer(self),
                )
                return
            self._via_job(actor, path, options)
        except (CsvError, UpsertRefused, UpsertFailed, JobRefused, PermissionDenied, ValueError) as exc:
            raise CommandError(str(exc)) from None
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None

    def _via_job(self, actor: Any, path: Path, options: dict[str, Any]) -> None:
        try:
            env = get_environment(options["env"])
        except UnknownEnvironment as exc:
            raise CommandError(str(exc)) from None
        job = upsert_request(
            actor=actor,
            environment=env.key,
            chunks=file_chunks(path),
            csv_name=path.name,
            run_id=options["run_id"],
            batch_size=options["batch_size"],
            dry_run=options["dry_run"],
        )
        if job.status == JobStatus.AWAITING_APPROVAL:
            self.stdout.write(f"Job #{job.pk} is waiting for an approver ({env.label} is protected).")
            return
        # Run it here; the message on its way to a worker finds the job taken and does nothing.
        job_execute(job_id=job.pk, worker="cli")
        for line in JobLogLine.objects.filter(job_id=job.pk, message__startswith="[batch_upsert]").order_by(
            "pk"
        ):
            self.stdout.write(line.message)
        job = Job.objects.get(pk=job.pk)
        if job.status != JobStatus.SUCCEEDED:
            raise CommandError(job.error or f"job #{job.pk} {job.status}")


class _Printer:
    def __init__(self, command: BaseCommand) -> None:
        self.command = command

    def log(self, message: str) -> None:
        self.command.stdout.write(message)

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        pass

    def check_cancel(self) -> None:
        pass
