"""Verify an audit hash chain: the dashboard's own trail, or an environment's audit_logs.

    manage.py verify_audit_chain --dashboard
    manage.py verify_audit_chain --env KEY

The verification itself is ``audit.selectors`` (streamed, constant memory; the module
docstring tells how damage is classified). This command picks the chain and reports:

* exit 0: intact; one line with the number of entries and the head (id and full hash),
  which is worth keeping elsewhere: a later run can show the chain still contains it;
* exit 1: damaged; one line per damaged entry (``entry #ID: KIND - detail``) on stdout,
  then the summary (first broken entry, last verified head) as the error;
* exit 2: the chain could not be read (unknown environment, database unreachable).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from audit.selectors import ChainPoint, ChainReport, dashboard_chain_verify, environment_chain_verify
from billing_ops.environments import Environment, UnknownEnvironment, environments_named
from billing_ops.selectors import describe_error

EXIT_DAMAGED = 1
EXIT_UNREADABLE = 2


class Command(BaseCommand):
    help = "Verify the dashboard's audit chain (--dashboard) or an environment's audit_logs (--env KEY)."

    def add_arguments(self, parser: CommandParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--dashboard", action="store_true", help="The dashboard's own audit trail.")
        which.add_argument(
            "--env", dest="env_key", metavar="KEY", help="The public.audit_logs of this environment."
        )

    def handle(self, *args: Any, dashboard: bool, env_key: str | None, **options: Any) -> None:
        try:
            if dashboard:
                report = dashboard_chain_verify()
            else:
                assert env_key is not None
                report = environment_chain_verify(env=_environment(env_key))
        except DatabaseError as exc:
            raise CommandError(
                f"cannot read the audit chain: {describe_error(exc)}", returncode=EXIT_UNREADABLE
            ) from None

        if report.intact:
            self.stdout.write(_summary(report))
            return
        for damage in report.damages:
            self.stdout.write(f"entry #{damage.entry_id}: {damage.kind} - {damage.detail}")
        listed = len({damage.entry_id for damage in report.damages})
        if report.damaged_entries > listed:
            self.stdout.write(f"... and {report.damaged_entries - listed} more damaged entries")
        raise CommandError(_summary(report), returncode=EXIT_DAMAGED)


def _environment(key: str) -> Environment:
    try:
        return environments_named([key])[0]
    except UnknownEnvironment as exc:
        raise CommandError(str(exc), returncode=EXIT_UNREADABLE) from None


def _point(point: ChainPoint | None) -> str:
    return "none" if point is None else f"#{point.entry_id} {point.hash}"


def _summary(report: ChainReport) -> str:
    checked = f"{report.entries} entries"
    if report.linkage_only:
        others = f"{report.linkage_only} of other writers checked for linkage only"
        checked += f" ({report.recomputed} recomputed, {others})"
    if report.intact:
        return f"{report.chain} audit chain intact: {checked}; head {_point(report.head)}"
    return (
        f"{report.chain} audit chain DAMAGED: {report.damaged_entries} damaged of {checked}; "
        f"first broken entry {_point(report.first_broken)}; last verified head {_point(report.verified_head)}"
    )
