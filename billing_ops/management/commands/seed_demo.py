"""Build the demo environments and the demo logins (`make run` calls this on every start).

An environment already holding the current seed is left alone, so restarting the demo
keeps whatever operators did in it; ``--reset`` rebuilds it from scratch. Only
environments marked ``demo = true`` are touched. The logic is in ``billing_ops.demo``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from billing_ops.demo import SeedResult, demo_users_ensure, reconciliation_samples_ensure, seed_environment
from billing_ops.environments import UnknownEnvironment, environments_named


class Command(BaseCommand):
    help = "Seed the demo environments (demo = true) and, in demo mode, the demo users."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--reset", action="store_true", help="Rebuild even if already seeded.")
        parser.add_argument(
            "--env",
            action="append",
            dest="env_keys",
            metavar="KEY",
            help="Seed only this environment (repeatable). Default: all of them.",
        )

    def handle(self, *args: Any, reset: bool, env_keys: list[str] | None, **options: Any) -> None:
        try:
            envs = environments_named(env_keys)
        except UnknownEnvironment as exc:
            raise CommandError(str(exc)) from None
        failed = []
        for env in envs:
            # One unreachable environment must not keep the others from being seeded.
            try:
                result = seed_environment(env, reset=reset)
            except DatabaseError as exc:
                failed.append(env.key)
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                self.stderr.write(f"{env.key} ({env.label}): failed, nothing changed: {first_line}")
                continue
            self.stdout.write(self._describe(result))

        if settings.DEMO_MODE:
            users = demo_users_ensure()
            changes = [f"created {', '.join(users.created)}"] if users.created else []
            changes += [f"updated {', '.join(users.updated)}"] if users.updated else []
            self.stdout.write(f"demo users: {'; '.join(changes) or 'unchanged'} (passwords in {users.path})")
            samples = reconciliation_samples_ensure()
            self.stdout.write(
                f"sample run folders: {'copied ' + ', '.join(samples) if samples else 'unchanged'} "
                f"(in {settings.RECONCILIATIONS_DIR})"
            )
        else:
            self.stdout.write("demo users: skipped (BILLING_OPS_DEMO is off)")
        if failed:
            raise CommandError(f"seeding failed for: {', '.join(failed)}")

    def _describe(self, result: SeedResult) -> str:
        head = f"{result.env.key} ({result.env.label}): {result.outcome}"
        if result.outcome == "skipped":
            return f"{head}: {result.message}"
        return (
            f"{head}: {result.runs:,} runs, {result.locks:,} locks, {result.stuck_runs:,} completed runs "
            f"holding locks, {result.invoice_lines:,} invoice lines, {result.audit_rows:,} audit rows "
            f"in {result.elapsed_s:.1f} s"
        )
