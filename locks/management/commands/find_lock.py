"""Who holds this lock? The search box of every page, from the command line.

    manage.py find_lock QUERY [--env KEY ...] [--format text|json]

QUERY is an entity id, a lock key, a billing number or a run id; every environment (or
each ``--env``) is searched at once by ``locks.lookup.lock_lookup``, as the web page does.
The text is a table per environment; the JSON is a stable interface (see README).

Exit codes, so that a script can tell "free" from "don't know":

* 0 - at least one lock or billing run found (an environment that did not answer is
  named on stderr);
* 1 - nothing found, and every environment answered;
* 2 - usage error: an empty or unusable query, an unknown ``--env``;
* 3 - nothing found, but some environment did not answer: the answer is incomplete.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing_ops.environments import Environment, UnknownEnvironment, environments_named
from locks.lookup import (
    EnvironmentLookup,
    FoundLock,
    FoundRun,
    HoldingRun,
    LockLookup,
    lock_lookup,
    lookup_query_clean,
)

EXIT_FOUND, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3
FORMATS = ("text", "json")


class Command(BaseCommand):
    help = "Find the locks on an entity (id or lock key) or of a billing run, in every environment at once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "query", metavar="QUERY", help="An entity id, lock key, billing number or run id."
        )
        parser.add_argument(
            "--env",
            action="append",
            dest="env_keys",
            metavar="KEY",
            help="Search only this environment (repeatable). Default: all of them.",
        )
        parser.add_argument("--format", choices=FORMATS, default="text", dest="output_format")

    def handle(
        self, *args: Any, query: str, env_keys: list[str] | None, output_format: str, **options: Any
    ) -> None:
        if not lookup_query_clean(query):
            raise CommandError("the query is empty, too long or holds a NUL character", returncode=EXIT_USAGE)
        try:
            envs = environments_named(env_keys)
        except UnknownEnvironment as exc:
            raise CommandError(str(exc), returncode=EXIT_USAGE) from None
        result = lock_lookup(query, envs)
        if output_format == "json":
            self.stdout.write(json.dumps(lookup_json(result), indent=2))
        else:
            self.stdout.write(lookup_text(result), ending="")
        for env in result.unreachable:
            self.stderr.write(f"warning: {env.env.key} ({env.env.label}) did not answer: {env.error}")
        if not result.found:
            raise SystemExit(EXIT_INCOMPLETE if result.unreachable else EXIT_NOT_FOUND)


# --- Output ----------------------------------------------------------------------------------


def _run_json(run: HoldingRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "billing_number": run.billing_number,
        "status": run.status,
        "process_stage": run.process_stage,
        "create_date": run.create_date.isoformat() if run.create_date else None,
        "modify_date": run.modify_date.isoformat() if run.modify_date else None,
        "stuck": run.stuck,
        "problem": run.problem or None,
    }


def _lock_json(lock: FoundLock) -> dict[str, Any]:
    return {
        "id": lock.id,
        "lock_key": lock.lock_key,
        "entity_type": lock.entity_type,
        "entity_id": lock.entity_id,
        "system_lock": lock.system_lock,
        "create_date": lock.created.isoformat() if lock.created else None,
        "billing_id": lock.billing_id,
        "holder": lock.holder,
        "run": _run_json(lock.run) if lock.run else None,
        "matched": lock.matched,
    }


def _found_run_json(found: FoundRun) -> dict[str, Any]:
    return {
        **_run_json(found.run),
        "matched": found.matched,
        "lock_count": found.total,
        "system_locks": found.system,
        "user_locks": found.user,
        "locks_by_entity_type": [
            {"entity_type": g.entity_type, "system_lock": g.system_lock, "count": g.count}
            for g in found.groups
        ],
    }


def _environment_json(e: EnvironmentLookup) -> dict[str, Any]:
    return {
        "key": e.env.key,
        "label": e.env.label,
        "reachable": e.reachable,
        "timed_out": e.timed_out,
        "error": e.error or None,
        "lock_count": e.lock_total,
        "locks": [_lock_json(lock) for lock in e.locks],
        "runs": [_found_run_json(found) for found in e.runs],
        "duration_ms": e.duration_ms,
    }


def lookup_json(result: LockLookup) -> dict[str, Any]:
    return {
        "query": result.query,
        "found": result.found,
        "environments": [_environment_json(e) for e in result.environments],
    }


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _release_hint(env: Environment, run: HoldingRun) -> str:
    return f"manage.py release_locks --env {env.key} --run {run.id} --actor USERNAME --dry-run"


def lookup_text(result: LockLookup) -> str:
    lines: list[str] = []
    for e in result.environments:
        if not e.reachable:
            lines.append(
                f"{e.env.label} ({e.env.key}): {'timed out' if e.timed_out else 'unreachable'}: {e.error}"
            )
            continue
        if not e.found:
            lines.append(f"{e.env.label} ({e.env.key}): nothing found")
            continue
        lines.append(f"{e.env.label} ({e.env.key}):")
        for found in e.runs:
            run = found.run
            lines.append(
                f"  run #{run.id} {run.billing_number} ({found.matched.replace('_', ' ')}): {run.status}, "
                f"stage {run.process_stage}, created {run.create_date:%Y-%m-%d %H:%M:%S %Z}; "
                f"{found.total:,} locks ({found.system:,} system, {found.user:,} user)"
            )
            for g in found.groups:
                lines.append(
                    f"    {g.entity_type:<28} {'system' if g.system_lock else 'user':<6} {g.count:>10,}"
                )
            if run.stuck:
                lines.append(f"    stuck: {run.problem}; release: {_release_hint(e.env, run)}")
        if e.locks:
            lines.append(f"  showing {len(e.locks)} of {e.lock_total:,} locks:")
            rows = [
                [
                    "ENTITY TYPE",
                    "ENTITY ID",
                    "LOCK KEY",
                    "LOCK",
                    "CREATED",
                    "HELD BY",
                    "STATUS",
                    "STAGE",
                    "STUCK",
                ]
            ]
            for lock in e.locks:
                created = f"{lock.created:%Y-%m-%d %H:%M}" if lock.created else "-"
                kind = "system" if lock.system_lock else "user"
                if lock.run:
                    held = [
                        f"#{lock.run.id} {lock.run.billing_number}",
                        lock.run.status,
                        lock.run.process_stage,
                    ]
                    stuck = lock.run.problem or "no"
                elif lock.billing_id is not None:
                    held, stuck = [f"#{lock.billing_id} (not in billing.billings)", "-", "-"], "-"
                else:
                    held, stuck = [f"{lock.holder or kind} (billing_id NULL)", "-", "-"], "-"
                rows.append([lock.entity_type, lock.entity_id, lock.lock_key, kind, created, *held, stuck])
            lines.extend(_table(rows))
            for run in e.stuck_holders:
                lines.append(f"  release #{run.id}: {_release_hint(e.env, run)}")
    return "\n".join(lines) + "\n"
